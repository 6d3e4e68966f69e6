"""Self-distillation: the ternary student learns the FP teacher's velocity on the teacher's own trajectories.

The data are the transformer calls that calibration recorded (noisy latents, timesteps, guidance,
text embeddings) with the teacher's velocity at each: no images and no teacher forward during
training. The student is a copy of the transformer whose in-scope linears are ``STELinear`` (latent
FP weights through a straight-through estimator, per-channel scales in log space), started from
absmean; everything else stays frozen. Loss: ||v_student - v_teacher||^2 / mean(v_teacher^2).

Checkpoints (latent weights, scales, Adam state, step) go to ``<workdir>/distill/state.pt`` every
``save_every`` steps and at the end; a rerun with the same calibration and distill settings resumes
from it (``steps`` may be raised to train on; a checkpoint past ``steps`` is not used). Batches are drawn from a generator seeded by the
step, so a resumed run equals an uninterrupted one.
"""

import copy
import hashlib
import json

import torch

from ..artifacts import atomic_file
from ..calibrate import Calibration, teacher_kwargs
from ..config import Config
from ..console import info, progress
from ..ternary import scoped_linears
from .ste import absmean_init, attach_ste, optimizer


def _fingerprint(cfg: Config, calib: Calibration) -> str:
    settings = cfg.quantization.distill.model_dump(mode="json", exclude={"steps", "save_every"})
    key = {"calibration": json.loads((calib.path / "manifest.json").read_text())["fingerprint"], "distill": settings}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def distill(cfg: Config, pipe, calib: Calibration) -> dict:
    """Train the ternary student on the recorded teacher velocities; return its codes and scales."""
    dc = cfg.quantization.distill
    records = calib.records(lambda k: k.startswith("calls."))
    n = len(records["calls.step"])
    student = copy.deepcopy(pipe.transformer).requires_grad_(False)
    ste = attach_ste(student, {name: absmean_init(lin.weight) for name, lin in scoped_linears(student)}, dc.weight_lr > 0)
    if dc.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    opt = optimizer(ste, dc.weight_lr, dc.scale_lr)
    ckpt, fp, start = cfg.workdir / "distill" / "state.pt", _fingerprint(cfg, calib), 0
    saved = torch.load(ckpt, map_location=student.device) if ckpt.is_file() else None
    if saved is not None and saved["fingerprint"] == fp and saved["step"] <= dc.steps:
        for name, m in ste.items():
            m.load_state_dict(saved["ste"][name])
        opt.load_state_dict(saved["optimizer"])
        start = saved["step"]
        info(f"distill: resuming from step {start} ({ckpt})")

    def save(step: int) -> None:
        state = {"fingerprint": fp, "step": step, "optimizer": opt.state_dict(),
                 "ste": {name: m.state_dict() for name, m in ste.items()}}
        with atomic_file(ckpt) as tmp:
            torch.save(state, tmp)

    with progress("distill", max(dc.steps - start, 0), "steps") as advance:
        for step in range(start, dc.steps):
            idx = torch.randint(n, (min(dc.batch, n),), generator=torch.Generator().manual_seed(dc.seed * 1_000_003 + step))
            target = records["calls.velocity"][idx].to(student.device).float()  # [B, L, C]
            pred = student(**teacher_kwargs(records, idx, student.device))[0].float()
            loss = (pred - target).square().mean() / target.square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            advance()
            if (step + 1) % dc.save_every == 0 or step + 1 == dc.steps:
                save(step + 1)
    return {name: m.export() for name, m in ste.items()}
