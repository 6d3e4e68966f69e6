"""Would an incoherent ternary error keep more of the FP score? Block-recon run on rotated weights: each
linear's ternary codes and scales quantize ``U^T W R`` (R [K, K] one seeded orthogonal matrix per input
width; U [N, N] the identity unless the outputs rotate too), and the layer computes
``(x @ R) @ (s * q)^T`` (then ``@ U^T``), as QuaRot/QuIP#-style kernels do with an online rotation of the
activations. The rotation spreads each code's error over every input direction, as the Gaussian weight
noise that ``noise_curve.py`` found harmless is spread. The latents, scales and thresholds train as
block-recon's ever do (its act-aware start from the rotated weights and the rotated inputs' diagonal
second moments); the trained layer's dense weight ``U (s * q) R^T`` goes into a copy of the FP model, which
is scored by ``bitflux eval``'s harness, its velocity error measured as ``noise_curve.py`` does, and
compared (same prompts and seeds) with the workdir's packed model and with the same run at R = U = I
(``control``: block-recon itself in dense weights, which scores as the packed model does at the same
settings).

Variants: ``inputs`` (R Haar-random), ``both`` (R and U Haar-random), ``hadamard`` (R a randomized
Hadamard transform, the kind a kernel runs in K log K), ``control``. ``--set`` changes block-recon's
settings (its seed, its steps) for every variant; the packed row stays the workdir's.

The ``hadamard`` variant is what the product builds as ``quantization.rotation: hadamard`` (format v3, the
``bitflux::hadamard`` op, one sign vector per input width seeded differently from this script's); the others
(Haar-random, output rotations) have no kernel. The script runs block-recon unrotated underneath, so it
refuses a config that sets ``quantization.rotation`` or a residual.
Usage (after ``make demo``, on its calibration; about 2.5 min a variant on 2 CPU cores, + 1.5 min):
    python benchmarks/rotated_ternary.py runs/demo OUT.json [--variants ...] [--rotation-seed S] [--set K=V]
"""

import argparse
import importlib
import json
import sys

import torch
from noise_curve import _copy, _row  # benchmarks/, the script's own folder

from bitflux_cli.calibrate import load_calibration
from bitflux_cli.config import load_config, parse_assignments
from bitflux_cli.evaluate import score_pipeline
from bitflux_cli.loader import pipeline_for
from bitflux_cli.methods.ste import STELinear
from bitflux_cli.miniworld.scorer import paired_stderr
from bitflux_cli.miniworld.world import CATEGORIES, balanced_prompts
from bitflux_cli.teacher import fp_pipeline, record_transformer_calls
from bitflux_cli.ternary import _set_submodule, scoped_linears

# the modules, not the functions of the same names that bitflux_cli.methods exports
act_aware = importlib.import_module("bitflux_cli.methods.act_aware")
block_recon = importlib.import_module("bitflux_cli.methods.block_recon")


class RotatedSTE(STELinear):
    """``STELinear`` whose latent weight, codes and scales live in a rotated basis: weight = ``U^T W R``
    (U [N, N] the identity unless the outputs rotate too), the layer's weight ``U (s * q) R^T``."""

    def __init__(self, linear, threshold, scale, train_weight, rotation: torch.Tensor, out_rotation: torch.Tensor):
        super().__init__(linear, threshold, scale, train_weight)  # no product rotation: its forward rotates nothing
        self.register_buffer("in_rotation", rotation)  # R [K, K] orthogonal
        self.register_buffer("out_rotation", out_rotation)  # U [N, N] orthogonal
        with torch.no_grad():
            self.weight.copy_(out_rotation.T @ self.weight @ rotation)

    def ternary_weight(self) -> torch.Tensor:  # [N, K] in the layer's own basis
        return self.out_rotation @ super().ternary_weight() @ self.in_rotation.T


def rotations(kind: str, seed: int = 0):
    """{size: R [size, size]}, made on first use from a seeded generator: "random", a Haar-random orthogonal
    matrix; "hadamard", a randomized Hadamard transform as a kernel would run it (random signs, then
    Sylvester Hadamard blocks of the largest power of two that divides the size: 640 is five blocks of
    128); "identity"."""
    cache, gen = {}, torch.Generator().manual_seed(seed)

    def get(k: int) -> torch.Tensor:
        if k not in cache:
            if kind == "random":
                q, r = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
                cache[k] = (q * r.diagonal().sign()).float()
            elif kind == "hadamard":
                b = k & -k  # the largest power of two dividing k
                h = torch.ones(1, 1)
                while h.shape[0] < b:
                    h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
                signs = torch.randint(2, (k,), generator=gen).float() * 2 - 1
                cache[k] = signs[:, None] * torch.block_diag(*[h / b ** 0.5] * (k // b))
            else:
                cache[k] = torch.eye(k)
        return cache[k]
    return get


def rotated_block_recon(cfg, fp, calib, in_rotation, out_rotation) -> dict[str, torch.Tensor]:
    """{linear: dense trained weight [N, K]} of block-recon with every linear's codes in its rotated basis."""
    q = cfg.quantization
    if q.rotation != "none" or q.residual_rank:
        raise SystemExit("rotated_ternary.py: run it with quantization.rotation=none and residual_rank=0; "
                         "it applies its own rotations")

    def search(weight, d, grid):  # the act-aware start of U^T W R, from the rotated inputs' second moments
        r, u = in_rotation(weight.shape[1]), out_rotation(weight.shape[0])
        return act_aware.search(u.T @ weight.detach().float() @ r, r.square().T @ d.float(), grid)

    def attach(block, init, train_weight, residuals=None, rotation="none"):  # block-recon's call; both unused
        out = {}
        for name, (threshold, scale) in init.items():
            linear = block.get_submodule(name)
            out[name] = RotatedSTE(linear, threshold, scale, train_weight, in_rotation(linear.in_features),
                                   out_rotation(linear.out_features))
            _set_submodule(block, name, out[name])
        return out

    saved = block_recon.search, block_recon.attach_ste
    block_recon.search, block_recon.attach_ste = search, attach
    try:
        return block_recon.reconstruct(cfg, fp, calib, lambda m: m.ternary_weight().detach())
    finally:
        block_recon.search, block_recon.attach_ste = saved


VARIANTS = {  # name: (input rotation, output rotation)
    "control": ("identity", "identity"),  # block-recon itself, in dense weights: equals the packed model
    "inputs": ("random", "identity"),
    "both": ("random", "random"),
    "hadamard": ("hadamard", "identity"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="make demo's workdir: its calibration and packed checkpoint")
    parser.add_argument("out", help="JSON file to write")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--rotation-seed", type=int, default=0)
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value for the block-recon runs (e.g. quantization.block_recon.seed=1)")
    parser.add_argument("--calls", type=int, default=4, help="denoising steps compared, evenly spaced")
    args = parser.parse_args()
    cfg = load_config(None, {"workdir": args.workdir}, parse_assignments(args.assignments))
    calib = load_calibration(cfg)
    report = {"command": f"python benchmarks/rotated_ternary.py {' '.join(sys.argv[1:])}", "runs": {}}
    specs = balanced_prompts(cfg.eval.split, cfg.eval.seed, cfg.eval.per_category)
    with fp_pipeline(cfg) as (fp, _):
        calls = {c: record_transformer_calls(fp, [s.caption for s in specs if s.category == c], cfg.generate,
                                             seed=0, keep=args.calls)[0] for c in CATEGORIES}
        fp_score = score_pipeline(cfg, fp, "fp")
        with pipeline_for(cfg) as (packed, _):
            report["runs"]["packed"] = packed_row = _row(cfg, packed, fp, calls, specs, fp_score)
        print("packed", packed_row["overall"], packed_row["velocity_error"], flush=True)
        for label in args.variants:
            inputs, outputs = VARIANTS[label]
            weights = rotated_block_recon(cfg, fp, calib, rotations(inputs, args.rotation_seed),
                                          rotations(outputs, args.rotation_seed + 1))
            student = _copy(fp)
            with torch.no_grad():
                for name, m in scoped_linears(student.transformer):
                    m.weight.copy_(weights[name])
            row = _row(cfg, student, fp, calls, specs, fp_score)
            row["minus_packed"] = round(row["overall"] - packed_row["overall"], 4)
            row["minus_packed_paired_stderr"] = round(paired_stderr(specs, row["per_prompt"], packed_row["per_prompt"]), 4)
            if "control" in report["runs"]:  # the default block-recon at this run's settings
                control = report["runs"]["control"]
                row["minus_control"] = round(row["overall"] - control["overall"], 4)
                row["minus_control_paired_stderr"] = round(paired_stderr(specs, row["per_prompt"], control["per_prompt"]), 4)
            report["runs"][label] = row
            print(label, row["overall"], row["velocity_error"], row["minus_packed"], row["minus_packed_paired_stderr"], flush=True)
    report["full precision"] = {k: fp_score[k] for k in ("overall", "overall_stderr", "categories")}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
