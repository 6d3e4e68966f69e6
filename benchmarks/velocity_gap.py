"""Is the 1.58-bit model's error larger on held-out compositions? The relative velocity error of the
packed model against FP on the teacher's own denoising calls, per prompt, for the training split's
captions (what calibration draws from) and the held-out test split's, by category and by step.

A diagnostic, not a method. Every prompt of ``bitflux eval``'s balanced list of each split is drawn by
the FP pipeline (seed 0, ``generate``'s settings); at ``--calls`` evenly spaced steps the packed
transformer gets the same inputs, and its velocity's error is ||v_q - v_fp|| / ||v_fp|| per prompt.
Usage (about 1 min on 2 CPU cores, after ``make demo``):
    python benchmarks/velocity_gap.py runs/demo benchmarks/results/velocity-gap.json
"""

import argparse
import json
import sys

import numpy as np
import torch

from bitflux_cli.config import load_config, parse_assignments
from bitflux_cli.loader import pipeline_for
from bitflux_cli.miniworld.world import CATEGORIES, balanced_prompts
from bitflux_cli.teacher import fp_pipeline, record_transformer_calls


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
    report = {"command": f"python benchmarks/velocity_gap.py {' '.join(sys.argv[1:])}", "splits": {}}
    with fp_pipeline(cfg) as (fp, _), pipeline_for(cfg) as (packed, _):
        for split in ("train", "test"):
            specs = balanced_prompts(split, cfg.eval.seed, cfg.eval.per_category)
            errors = {}  # {category: [calls, prompts]}
            for category in CATEGORIES:
                captions = [s.caption for s in specs if s.category == category]
                calls, _ = record_transformer_calls(fp, captions, cfg.generate, seed=0, keep=args.calls)
                errors[category] = per_prompt_errors(fp.transformer, packed.transformer, calls)
            report["splits"][split] = {
                "overall": _round(np.mean([e.mean() for e in errors.values()])),
                "categories": {c: _round(e.mean()) for c, e in errors.items()},
                "by_call": _round(np.mean([e.mean(1) for e in errors.values()], 0)),
                "categories_by_call": {c: _round(e.mean(1)) for c, e in errors.items()},
                "per_prompt": _round(np.concatenate([e.mean(0) for e in errors.values()])),  # in eval's prompt order
            }
            print(split, {k: v for k, v in report["splits"][split].items() if k != "per_prompt"}, flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def _round(x):
    return np.round(np.asarray(x, dtype=float), 4).tolist()


if __name__ == "__main__":
    main()
