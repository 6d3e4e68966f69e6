#!/usr/bin/env bash
# The optional rotation (quantization.rotation=hadamard) against the default, both block-recon, at several
# training seeds on one calibration:
#   [SEEDS='0 1'] [RESIDUAL_RANK=r] benchmarks/rotation_seeds.sh [RUNS] [OUT.json]   (after make demo: its calibration is copied)
# For each seed s in $SEEDS, RUNS/rot-seeds/{plain,hadamard}-s<s> quantize (block_recon.seed=s), pack 2bit and
# are scored by `bitflux eval --suite mini` (192 prompts x 4 images). OUT gets per seed both scores and their
# paired difference (same prompts and image seeds), then the mean difference over seeds with its standard
# error across seeds, the storage each costs and the commit ("+changes" when tracked files differed).
# RESIDUAL_RANK > 0 runs both sides with a low-rank residual of that rank (quantization.residual_rank), in
# RUNS/rot-seeds/{plain,hadamard}-r<r>-s<s>: does the rotation add to the residual?
# About 3.5 min a run on 2 CPU cores: 35 min for the default five seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
BITFLUX=${BITFLUX:-.venv/bin/bitflux}
RUNS=${1:-runs}/rot-seeds
OUT=${2:-benchmarks/results/rotation-seeds.json}
SEEDS=${SEEDS:-0 1 2 3 4}
RESIDUAL=${RESIDUAL_RANK:-0}  # not RANK: torchrun's variable
TAG=$([[ $RESIDUAL == 0 ]] || echo "-r$RESIDUAL")
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo "+changes")
test -d runs/demo/calib || { echo "rotation_seeds.sh: run make demo first (its calibration is reused)" >&2; exit 2; }
mkdir -p "$RUNS"
for s in $SEEDS; do
    for kind in plain hadamard; do
        w="$RUNS/$kind$TAG-s$s"
        [[ -f "$w.eval.json" ]] && continue  # resumable: a finished run is kept
        rm -rf "$w"; mkdir -p "$w"; cp -r runs/demo/calib "$w/"
        rot=$([[ $kind == plain ]] && echo none || echo hadamard)
        "$BITFLUX" quantize --workdir "$w" --set "quantization.rotation=$rot" --set "quantization.block_recon.seed=$s" \
            --set "quantization.residual_rank=$RESIDUAL" --json > "$w.quantize.json"
        "$BITFLUX" pack --workdir "$w" --json > "$w.pack.json"
        "$BITFLUX" eval --workdir "$w" --json > "$w.eval.json.tmp" && mv "$w.eval.json.tmp" "$w.eval.json"
    done
done
"${PYTHON:-.venv/bin/python}" - "$RUNS" "$OUT" "$COMMIT" "$TAG" $SEEDS <<'PY'
import json, statistics, sys
from pathlib import Path
from bitflux_cli.miniworld.scorer import paired_stderr
from bitflux_cli.miniworld.world import balanced_prompts
runs, out, commit, tag, seeds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
load = lambda name: json.loads((runs / name.replace("-s", f"{tag}-s", 1)).read_text())
rows, deltas = {}, []
for s in seeds:
    e = {k: load(f"{k}-s{s}.eval.json") for k in ("plain", "hadamard")}
    specs = balanced_prompts(e["plain"]["split"], e["plain"]["seeds"][0], e["plain"]["prompts"] // len(e["plain"]["categories"]))
    delta = e["hadamard"]["overall"] - e["plain"]["overall"]
    deltas.append(delta)
    rows[s] = {k: {"overall": v["overall"], "overall_stderr": v["overall_stderr"], "categories": v["categories"],
                   "velocity_rel_error": load(f"{k}-s{s}.quantize.json")["fidelity"]["velocity_rel_error"],
                   "bits_per_weight": load(f"{k}-s{s}.pack.json")["bits_per_weight"]} for k, v in e.items()}
    rows[s]["difference"] = {"overall": delta, "paired_stderr": paired_stderr(specs, e["hadamard"]["per_prompt"], e["plain"]["per_prompt"])}
mean = {k: statistics.mean(rows[s][k]["overall"] for s in seeds) for k in ("plain", "hadamard")}
spread = statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else None
rank = f"RESIDUAL_RANK={tag[2:]} " if tag else ""
report = {"command": f"SEEDS='{' '.join(seeds)}' {rank}benchmarks/rotation_seeds.sh {runs.parent} {out}", "commit": commit,
          "seeds": rows, "mean": {**mean, "difference": statistics.mean(deltas), "difference_stderr_across_seeds": spread,
                                  "seeds_rotation_wins": sum(d > 0 for d in deltas)}}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=1) + "\n")
for s in seeds:
    print(f"seed {s}: plain {rows[s]['plain']['overall']:.4f}  hadamard {rows[s]['hadamard']['overall']:.4f}  "
          f"difference {rows[s]['difference']['overall']:+.4f} ± {rows[s]['difference']['paired_stderr']:.4f}")
print(f"mean: plain {mean['plain']:.4f}  hadamard {mean['hadamard']:.4f}  difference {statistics.mean(deltas):+.4f}"
      + (f" ± {spread:.4f} across seeds" if spread else ""))
PY
