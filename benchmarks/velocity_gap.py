"""Is the 1.58-bit model's error larger on held-out compositions? The relative velocity error of the
packed model against FP on the teacher's own denoising calls, per prompt, for the training split's
captions (what calibration draws from) and the held-out test split's, by category and by step; then
again with each of ``fp_groups.py``'s groups of linears put back to FP.

A diagnostic, not a method. Every prompt of ``bitflux eval``'s balanced list of each split is drawn by
the FP pipeline (seed 0, ``generate``'s settings); at ``--calls`` evenly spaced steps the packed
transformer gets the same inputs, and its velocity's error is ||v_q - v_fp|| / ||v_fp|| per prompt.
Usage (about 2 min on 2 CPU cores, after ``make demo``):
    python benchmarks/velocity_gap.py runs/demo benchmarks/results/velocity-gap.json
"""

import argparse
import json
import sys

import numpy as np
import torch
from fp_groups import GROUPS, fp_group  # benchmarks/, the script's own folder

from bitflux_cli.config import load_config, parse_assignments
from bitflux_cli.loader import pipeline_for
from bitflux_cli.miniworld.world import CATEGORIES, balanced_prompts
from bitflux_cli.teacher import fp_pipeline, record_transformer_calls
from bitflux_cli.ternary import scoped_linears


@torch.no_grad()
def per_prompt_errors(fp: torch.nn.Module, student: torch.nn.Module, calls: list[dict]) -> np.ndarray:
    """[calls, prompts]: ||v_q - v_fp|| / ||v_fp|| of each prompt (a row of the batch) at each call."""
    out = []
    for kw in calls:
        v_fp, v_q = fp(**kw)[0].float(), student(**kw)[0].float()  # [B, L, C]
        out.append(((v_q - v_fp).flatten(1).norm(dim=1) / v_fp.flatten(1).norm(dim=1).clamp_min(1e-12)).numpy())
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a workdir with a packed checkpoint of the embedded model (make demo's: runs/demo)")
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--calls", type=int, default=4, help="denoising steps compared, evenly spaced")
    args = parser.parse_args()
    cfg = load_config(None, {"workdir": args.workdir}, parse_assignments([]))
    report = {"command": f"python benchmarks/velocity_gap.py {' '.join(sys.argv[1:])}", "fp_groups": {}}
    with fp_pipeline(cfg) as (fp, _), pipeline_for(cfg) as (packed, _):
        calls = {}  # {(split, category): the FP run's calls}, its prompts in eval's order
        for split in ("train", "test"):
            specs = balanced_prompts(split, cfg.eval.seed, cfg.eval.per_category)
            for category in CATEGORIES:
                captions = [s.caption for s in specs if s.category == category]
                calls[split, category], _ = record_transformer_calls(fp, captions, cfg.generate, seed=0, keep=args.calls)
        report["splits"] = _errors(fp.transformer, packed.transformer, calls)
        print("1.58-bit", _brief(report["splits"]), flush=True)
        fp_linears = dict(scoped_linears(fp.transformer))
        for group, pattern in GROUPS.items():  # the same with one group of linears back in FP
            with fp_group(packed.transformer, fp_linears, pattern):
                got = _errors(fp.transformer, packed.transformer, calls)
            report["fp_groups"][group] = {split: {k: v for k, v in r.items() if k != "per_prompt"} for split, r in got.items()}
            print(group, _brief(got), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def _errors(fp: torch.nn.Module, student: torch.nn.Module, calls: dict) -> dict:
    """Per split: the mean error overall, by category, by call, both, and per prompt (in eval's order)."""
    out = {}
    for split in ("train", "test"):
        errors = {c: per_prompt_errors(fp, student, calls[split, c]) for c in CATEGORIES}  # {category: [calls, prompts]}
        out[split] = {"overall": _round(np.mean([e.mean() for e in errors.values()])),
                      "categories": {c: _round(e.mean()) for c, e in errors.items()},
                      "by_call": _round(np.mean([e.mean(1) for e in errors.values()], 0)),
                      "categories_by_call": {c: _round(e.mean(1)) for c, e in errors.items()},
                      "per_prompt": _round(np.concatenate([e.mean(0) for e in errors.values()]))}
    return out


def _brief(errors: dict) -> str:
    return "; ".join(f"{split} {r['overall']:.4f}, counting {r['categories']['counting']:.4f}" for split, r in errors.items())


def _round(x):
    return np.round(np.asarray(x, dtype=float), 4).tolist()


if __name__ == "__main__":
    main()
