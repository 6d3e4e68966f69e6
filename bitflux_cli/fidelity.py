"""How far the 1.58-bit transformer is from full precision: block, velocity and image errors."""

import numpy as np
import torch
from rich.table import Table

from .config import Config
from .teacher import psnr, record_transformer_calls, run_pipeline

# Fixed prompts of the report, varied on purpose; held out from calibration sets.
REPORT_PROMPTS = [
    "a red circle above a blue square",
    "a green triangle left of a yellow circle",
    "three blue squares",
    "a photo of a cat sitting on a windowsill at sunset",
    "a yellow square and a red triangle",
    "an astronaut riding a horse on the moon, oil painting",
    "two green circles",
    "a bowl of ramen with chopsticks, studio lighting",
]


# {block: [flattened output per call]} and the velocities; ``streams`` picks from a block's
# (text, image) outputs: both, ``IMAGE`` or ``TEXT``
IMAGE, TEXT = slice(-1, None), slice(0, 1)


def _block_outputs(transformer, calls, streams: slice = slice(None)):
    outs, handles = {}, []
    blocks = [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]
    blocks += [(f"single_transformer_blocks.{i}", b) for i, b in enumerate(transformer.single_transformer_blocks)]
    for name, block in blocks:
        def hook(_m, _a, out, name=name):
            out = out if isinstance(out, tuple) else (out,)
            out = out[streams]
            outs.setdefault(name, []).append(torch.cat([o.float().flatten() for o in out]))
        handles.append(block.register_forward_hook(hook))
    velocities = []
    try:
        with torch.no_grad():
            for kw in calls:
                velocities.append(transformer(**kw)[0].float())
    finally:
        for h in handles:
            h.remove()
    return outs, velocities


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def fidelity_report(cfg: Config, pipe, student: torch.nn.Module) -> dict:
    """Errors of ``student`` against ``pipe.transformer`` (the FP teacher) on held-out prompts.

    Per block and for the predicted velocity: mean relative L2 error over recorded denoising calls
    of the teacher's own trajectories; for images: PSNR vs FP with the same seeds.
    """
    prompts = REPORT_PROMPTS[: cfg.quantization.eval_prompts]
    teacher = pipe.transformer
    calls = record_transformer_calls(pipe, prompts, cfg.generate, seed=10_000, keep=4)
    fp_blocks, fp_vel = _block_outputs(teacher, calls)
    q_blocks, q_vel = _block_outputs(student, calls)
    blocks = {name: float(np.mean([_rel(q, f) for q, f in zip(q_blocks[name], fp_blocks[name])])) for name in fp_blocks}
    velocity = [_rel(q, f) for q, f in zip(q_vel, fp_vel)]

    fp_images = run_pipeline(pipe, prompts, cfg.generate, seed=10_000)
    pipe.transformer = student
    try:
        q_images = run_pipeline(pipe, prompts, cfg.generate, seed=10_000)
    finally:
        pipe.transformer = teacher
    psnrs = [psnr(a, b) for a, b in zip(q_images, fp_images)]
    return {
        "prompts": len(prompts),
        "velocity_rel_error": float(np.mean(velocity)),
        "block_rel_error": blocks,
        "image_psnr_db": float(np.mean(psnrs)),
        "image_psnr_db_per_prompt": psnrs,
    }


def fidelity_table(report: dict) -> Table:
    """The fidelity report as a table: one row per block, then the velocity error and image PSNR."""
    table = Table(title=f"1.58-bit vs full precision on {report['prompts']} held-out prompts")
    table.add_column("block")
    table.add_column("relative error", justify="right")
    for name, err in report["block_rel_error"].items():
        table.add_row(name, f"{err:.4f}")
    table.add_row("[bold]velocity[/bold]", f"[bold]{report['velocity_rel_error']:.4f}[/bold]", end_section=True)
    table.add_row("[bold]image PSNR[/bold]", f"[bold]{report['image_psnr_db']:.2f} dB[/bold]")
    return table
