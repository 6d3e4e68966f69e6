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
from contextlib import contextmanager

import torch

from bitflux_cli.config import load_config, parse_assignments
from bitflux_cli.evaluate import score_pipeline
from bitflux_cli.loader import pipeline_for
from bitflux_cli.miniworld.scorer import paired_stderr
from bitflux_cli.miniworld.world import balanced_prompts
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
    specs = balanced_prompts(cfg.eval.split, cfg.eval.seed, cfg.eval.per_category)  # the prompts score_pipeline scores
    with fp_pipeline(cfg) as (fp, _):
        report["full precision"] = _summary(score_pipeline(cfg, fp, "fp"))
        fp_linears = dict(scoped_linears(fp.transformer))
        with pipeline_for(cfg) as (pipe, _):
            report["1.58-bit"] = _summary(score_pipeline(cfg, pipe, "ternary"))
            for group, pattern in GROUPS.items():
                with fp_group(pipe.transformer, fp_linears, pattern) as swapped:
                    got = score_pipeline(cfg, pipe, "fp-group")
                diff = got["overall"] - report["1.58-bit"]["overall"]
                report["groups"][group] = _summary(got) | {
                    "fp_linears": swapped, "minus_ternary": round(diff, 4),
                    "minus_ternary_paired_stderr": round(paired_stderr(specs, got["per_prompt"], report["1.58-bit"]["per_prompt"]), 4)}
                print(f"{group}: {swapped} linears FP, {got['overall']:.4f}", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


@contextmanager
def fp_group(transformer: torch.nn.Module, fp_linears: dict[str, torch.nn.Module], pattern: str):
    """The packed ``transformer`` with the FP linears whose names match ``pattern`` in place of its
    ternary ones (yields how many), and its ternary ones back afterwards."""
    swapped = [n for n in fp_linears if re.search(pattern, n)]
    packed = {name: transformer.get_submodule(name) for name in swapped}
    for name in swapped:
        _set_submodule(transformer, name, fp_linears[name])
    try:
        yield len(swapped)
    finally:
        for name, module in packed.items():
            _set_submodule(transformer, name, module)


def _summary(score: dict) -> dict:
    return {k: score[k] for k in ("overall", "overall_stderr", "categories", "per_prompt")}


if __name__ == "__main__":
    main()
