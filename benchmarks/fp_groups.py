"""Where the 1.58-bit model loses its points: the packed model of a workdir with one group of its block
linears put back to FP (the base model's), scored by ``bitflux eval``'s own harness (mini suite).

A diagnostic, not a method: block-recon trained every block on the ternary blocks before it, so an FP
group also breaks what the other layers learnt around it (putting the modulation linears back lowers
the score). Usage (about 1 min a group on 2 CPU cores, after ``make demo``):
    python benchmarks/fp_groups.py runs/demo benchmarks/results/fp-groups.json
"""

import argparse
import json
import re
import sys

from bitflux_cli.config import load_config, parse_assignments
from bitflux_cli.evaluate import score_pipeline
from bitflux_cli.loader import pipeline_for
from bitflux_cli.teacher import fp_pipeline
from bitflux_cli.ternary import _set_submodule, scoped_linears

GROUPS = {  # full module names of the linears a group puts back to FP
    "text stream (double blocks' add_q/k/v, to_add_out, ff_context, norm1_context)":
        r"^transformer_blocks\.\d+\.(attn\.add_[qkv]_proj|attn\.to_add_out|ff_context\..*|norm1_context\.linear)$",
    "modulation (every block's AdaLayerNorm linear)": r"\.(norm1|norm1_context|norm)\.linear$",
    "double blocks": r"^transformer_blocks\.",
    "single blocks": r"^single_transformer_blocks\.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a workdir with a packed checkpoint of the embedded model (make demo's: runs/demo)")
    parser.add_argument("out", help="JSON file to write")
    args = parser.parse_args()
    cfg = load_config(None, {"workdir": args.workdir}, parse_assignments([]))
    report = {"command": f"python benchmarks/fp_groups.py {' '.join(sys.argv[1:])}", "groups": {}}
    with fp_pipeline(cfg) as (fp, _):
        report["full precision"] = _summary(score_pipeline(cfg, fp, "fp"))
        fp_linears = dict(scoped_linears(fp.transformer))
        with pipeline_for(cfg) as (pipe, _):
            report["1.58-bit"] = _summary(score_pipeline(cfg, pipe, "ternary"))
        for group, pattern in GROUPS.items():
            with pipeline_for(cfg) as (pipe, _):  # a fresh packed model for each group
                swapped = [n for n in fp_linears if re.search(pattern, n)]
                for name in swapped:
                    _set_submodule(pipe.transformer, name, fp_linears[name])
                got = score_pipeline(cfg, pipe, "fp-group")
            report["groups"][group] = _summary(got) | {"fp_linears": len(swapped), "minus_ternary_paired": _paired(report["1.58-bit"], got)}
            print(f"{group}: {len(swapped)} linears FP, {got['overall']:.4f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def _summary(score: dict) -> dict:
    return {k: score[k] for k in ("overall", "overall_stderr", "categories", "per_prompt")}


def _paired(base: dict, other: dict) -> tuple[float, float]:  # mean difference over prompts, its standard error
    d = [b - a for a, b in zip(base["per_prompt"], other["per_prompt"])]
    mean = sum(d) / len(d)
    return round(mean, 4), round((sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5, 4)


if __name__ == "__main__":
    main()
