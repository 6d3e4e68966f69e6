"""How much velocity error can the mini world's score afford? The FP model with seeded Gaussian noise
added to its 52 in-scope block linears (each row's noise ``eps`` times that row's RMS), at several
``eps``: the relative velocity error against FP on the teacher's own calls for the held-out prompts
(as ``velocity_gap.py`` measures it) and the score, by ``bitflux eval``'s harness; the packed model of
the workdir on the same footing.

Then two controls made of the packed model's own weight error E = W - s*q (per linear): W - E with each
element's sign drawn at random (the same magnitudes), and W - E with each row's entries permuted (the
same values, elsewhere in the row). If those score like FP, what costs the points is where the ternary
error points, not how large it is.

A diagnostic, not a method. Usage (about 5 min on 2 CPU cores, after ``make demo``):
    python benchmarks/noise_curve.py runs/demo benchmarks/results/noise-curve.json
"""

import argparse
import copy
import json
import sys

import numpy as np
import torch
from fp_groups import _summary  # benchmarks/, the script's own folder
from velocity_gap import per_prompt_errors

from bitflux_cli.checkpoint import CheckpointFile
from bitflux_cli.config import load_config, parse_assignments
from bitflux_cli.evaluate import score_pipeline
from bitflux_cli.export import dequantized
from bitflux_cli.loader import packed_checkpoint, pipeline_for
from bitflux_cli.miniworld.scorer import paired_stderr
from bitflux_cli.miniworld.world import CATEGORIES, balanced_prompts
from bitflux_cli.teacher import fp_pipeline, record_transformer_calls
from bitflux_cli.ternary import scoped_linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a workdir with a packed checkpoint of the embedded model (make demo's: runs/demo)")
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2, 0.4], help="noise levels")
    parser.add_argument("--calls", type=int, default=4, help="denoising steps compared, evenly spaced")
    args = parser.parse_args()
    cfg = load_config(None, {"workdir": args.workdir}, parse_assignments([]))
    report = {"command": f"python benchmarks/noise_curve.py {' '.join(sys.argv[1:])}", "levels": {}}
    specs = balanced_prompts(cfg.eval.split, cfg.eval.seed, cfg.eval.per_category)  # the prompts score_pipeline scores
    with fp_pipeline(cfg) as (fp, _):
        calls = {}  # {category: the FP run's calls on the held-out prompts}
        for category in CATEGORIES:
            captions = [s.caption for s in specs if s.category == category]
            calls[category], _ = record_transformer_calls(fp, captions, cfg.generate, seed=0, keep=args.calls)
        student = _copy(fp)
        report["full precision"] = _summary(score_pipeline(cfg, fp, "fp"))
        linears = dict(scoped_linears(student.transformer))
        clean = {name: m.weight.detach().clone() for name, m in linears.items()}  # [N, K] each
        with pipeline_for(cfg) as (packed, _):
            report["1.58-bit"] = _row(cfg, packed, fp, calls, specs, report["full precision"])
        ckpt = CheckpointFile(packed_checkpoint(cfg))
        error = {name: w - dequantized(ckpt, name, torch.float32) for name, w in clean.items()}
        print("1.58-bit", _brief(report["1.58-bit"]), flush=True)
        for eps in args.eps:
            gen = torch.Generator().manual_seed(0)
            _perturb(linears, clean, lambda name, w: weight_noise(w, eps, gen))
            report["levels"][str(eps)] = _row(cfg, student, fp, calls, specs, report["full precision"])
            print(f"eps {eps}", _brief(report["levels"][str(eps)]), flush=True)
        gen = torch.Generator().manual_seed(0)
        controls = {
            "ternary error, signs at random": lambda name, w: -error[name].abs() * (torch.randint(2, w.shape, generator=gen) * 2 - 1),
            "ternary error, permuted within rows": lambda name, w: -torch.gather(
                error[name], 1, torch.rand(w.shape, generator=gen).argsort(1)),
        }
        report["controls"] = {}
        for control, noise in controls.items():
            _perturb(linears, clean, noise)
            report["controls"][control] = _row(cfg, student, fp, calls, specs, report["full precision"])
            print(control, _brief(report["controls"][control]), flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


def _copy(pipe):
    """``pipe`` with its own copy of the transformer (the text encoders and VAE shared)."""
    out = copy.copy(pipe)
    out.transformer = copy.deepcopy(pipe.transformer)
    return out


def weight_noise(w: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """Gaussian noise [N, K] for a weight [N, K]: ``eps`` times each row's RMS, drawn from ``gen``."""
    return eps * w.square().mean(1, keepdim=True).sqrt() * torch.randn(w.shape, generator=gen)


@torch.no_grad()
def _perturb(linears: dict, clean: dict, noise) -> None:
    """Each linear's weight set to its clean weight plus ``noise(name, weight)`` [N, K]."""
    for name, m in linears.items():
        m.weight.copy_(clean[name] + noise(name, clean[name]))


def _row(cfg, pipe, fp, calls: dict, specs, fp_score: dict) -> dict:
    errors = {c: per_prompt_errors(fp.transformer, pipe.transformer, calls[c]) for c in CATEGORIES}  # [calls, prompts]
    score = score_pipeline(cfg, pipe, "noise")
    return _summary(score) | {
        "x_fp": round(score["overall"] / fp_score["overall"], 4),
        "minus_fp_paired_stderr": round(paired_stderr(specs, score["per_prompt"], fp_score["per_prompt"]), 4),
        "velocity_error": round(float(np.mean([e.mean() for e in errors.values()])), 4),
        "velocity_error_categories": {c: round(float(e.mean()), 4) for c, e in errors.items()}}


def _brief(row: dict) -> str:
    return f"velocity error {row['velocity_error']:.4f}, score {row['overall']:.4f} ({row['x_fp']:.3f}x)"


if __name__ == "__main__":
    main()
