"""Two series of variant runs compared seed by seed, on the same prompts and image seeds.

    python benchmarks/paired_seeds.py RUNS OUT.json --command CMD --base NAME=PATTERN --new NAME=PATTERN --seeds 0 1 ...

PATTERN is a run's name with ``{seed}`` in it: RUNS/<run>.eval.json and RUNS/<run>.quantize.json (and, when
it is there, RUNS/<run>.pack.json, for the bits a weight), as ``benchmarks/variants.sh`` or a script's own
loop leaves them. OUT gets, per seed, both scores, their velocity and block errors and their paired
difference (``scorer.paired_stderr``), then the means, the mean difference with its standard error across
seeds, how many seeds the new series is ahead, the command and the commit ("+changes" when tracked files
differed).
"""

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from bitflux_cli.miniworld.scorer import paired_stderr
from bitflux_cli.miniworld.world import balanced_prompts


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent)


def commit() -> str:
    """HEAD's short hash, with "+changes" when tracked files differ from it."""
    return _git("rev-parse", "--short", "HEAD").stdout.strip() + ("" if _git("diff", "--quiet", "HEAD").returncode == 0 else "+changes")


def _run(runs: Path, name: str) -> tuple[dict, dict]:  # (the row OUT keeps, the whole eval JSON)
    read = lambda kind: json.loads((runs / f"{name}.{kind}.json").read_text())
    e, q = read("eval"), read("quantize")["fidelity"]
    row = {"overall": e["overall"], "overall_stderr": e["overall_stderr"], "categories": e["categories"],
           "velocity_rel_error": q["velocity_rel_error"], "block_rel_error": q["block_rel_error"]}
    if (runs / f"{name}.pack.json").exists():
        row["bits_per_weight"] = read("pack")["bits_per_weight"]
    return row, e


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--command", required=True)
    p.add_argument("--base", required=True, help="NAME=PATTERN of the reference series")
    p.add_argument("--new", required=True, help="NAME=PATTERN of the series compared with it")
    p.add_argument("--seeds", nargs="+", required=True)
    a = p.parse_args()
    (base, base_run), (new, new_run) = (s.split("=", 1) for s in (a.base, a.new))
    rows, deltas = {}, []
    for s in a.seeds:
        (b, eb), (n, en) = _run(a.runs, base_run.format(seed=s)), _run(a.runs, new_run.format(seed=s))
        specs = balanced_prompts(eb["split"], eb["seeds"][0], eb["prompts"] // len(eb["categories"]))
        deltas.append(n["overall"] - b["overall"])
        rows[s] = {base: b, new: n, "difference": {"overall": deltas[-1],
                                                   "paired_stderr": paired_stderr(specs, en["per_prompt"], eb["per_prompt"])}}
        print(f"seed {s}: {base} {b['overall']:.4f}  {new} {n['overall']:.4f}  difference {deltas[-1]:+.4f} "
              f"± {rows[s]['difference']['paired_stderr']:.4f}  velocity error {b['velocity_rel_error']:.3f} / "
              f"{n['velocity_rel_error']:.3f}")
    spread = statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else None
    mean = {k: statistics.mean(r[k]["overall"] for r in rows.values()) for k in (base, new)}
    mean |= {"difference": statistics.mean(deltas), "difference_stderr_across_seeds": spread,
             "seeds_ahead": sum(d > 0 for d in deltas)}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"command": a.command, "commit": commit(), "seeds": rows, "mean": mean}, indent=1) + "\n")
    print(f"mean: {base} {mean[base]:.4f}  {new} {mean[new]:.4f}  difference {mean['difference']:+.4f}"
          + (f" ± {spread:.4f} across seeds" if spread is not None else ""))


if __name__ == "__main__":
    main()
