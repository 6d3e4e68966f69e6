"""Self-distillation: the ternary student learns the FP teacher's velocity on the teacher's own trajectories.

The data are the transformer calls that calibration recorded (noisy latents, timesteps, guidance,
text embeddings) with the teacher's velocity at each: no images and no teacher forward during
training. In-scope linears train as ``STELinear`` (latent FP weights through a straight-through
estimator, per-channel scales in log space) started from absmean; everything else stays frozen.
Loss: the batch mean of ||v_student - v_teacher||^2 / E[v_teacher^2], the normaliser one constant
over all recorded calls, so a batch split across ranks gives the gradient of the whole batch.

``distill.mode``:

- ``full``: every in-scope linear trains at once. Under ``torchrun`` (``WORLD_SIZE`` > 1) the
  student is sharded with FSDP2 (``fully_shard`` per block, then the root; the frozen parameters
  are left out and replicated), and each rank takes its contiguous slice of the step's global
  batch of ``distill.batch`` calls, which must divide by the number of ranks.
- ``blockwise``: one block's linears train at a time, the others frozen ternary (``distill_blockwise``).

``distill.init``: the student starts from absmean (thresholds mean|w| / 2, the FP weights as
latents), or from ``block-recon``: block reconstruction (``quantization.block_recon``) runs first
and its trained latent weights, thresholds and scales are the start, so the end-to-end loss only
has to correct what block-local targets could not see. Under torchrun every rank runs it (it is
deterministic); a resumed full run skips it.

The student is pure ternary: with ``quantization.residual_rank`` > 0 its block-recon start trains no
residual either, and quantize fits the residual after distill (``residual``), as for act-aware.

Checkpoints go to ``<workdir>/distill/state.safetensors`` every ``save_every`` steps and at the end,
written by rank 0 in one atomic rename, with no pickle: the tensors are the full (gathered) latent
weights, scales and thresholds (``model.<parameter>``) and the full Adam state keyed by parameter
name (``optimizer.<parameter>.<exp_avg|exp_avg_sq|step>``, from
``torch.distributed.checkpoint.state_dict``); the header holds the scalars as JSON (fingerprint,
step, position, Adam's param groups) and each tensor's sha256 (``tensorfile.write_state``). The file
is the same at any world size, so a run resumes at another. A rerun with the same calibration,
settings and bitflux version resumes (``steps`` or ``rounds`` may be raised to train on; a
checkpoint past the end is not used); a state of another run is not used, and a damaged one, or one
whose tensors do not fit the model, is refused naming the file. Batches come from a generator seeded
by the step, so a resumed run equals an uninterrupted one. A ``state.pt`` of an earlier bitflux
(pickle) is never opened.
"""

import copy
import hashlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..calibrate import Calibration, _blocks, teacher_kwargs
from ..checkpoint import TOOL_VERSION
from ..config import Config, DistillConfig
from ..console import info, progress
from ..distributed import init_distributed
from ..errors import UsageError
from ..streaming import BLOCK_LISTS
from ..ternary import scoped_linears
from .block_recon import reconstruct
from .distill_blockwise import blockwise
from .ste import FULL, STELinear, absmean_init, attach_ste, check_fits, optimizer, read_saved, ste_state, write_saved

STATE = "state.safetensors"


@dataclass
class Run:
    """What both modes share: the recorded calls, the loss normaliser, this rank's batches, the checkpoint."""

    dc: DistillConfig
    records: dict[str, torch.Tensor]
    norm: float  # E[v_teacher^2] over every recorded call
    device: torch.device
    rank: int
    world: int
    path: Path  # <workdir>/distill
    fingerprint: str
    init: Callable[[], dict[str, torch.Tensor]] | None = None  # the start state by parameter name; None: absmean

    def batch(self, step: int) -> torch.Tensor:
        """This rank's contiguous slice [batch / world] of the step's global batch of call indices."""
        gen = torch.Generator().manual_seed(self.dc.seed * 1_000_003 + step)
        idx = torch.randint(len(self.records["calls.step"]), (self.dc.batch,), generator=gen)  # [batch]
        per = self.dc.batch // self.world
        return idx[self.rank * per:(self.rank + 1) * per]

    def train_step(self, student: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
        """One Adam step on this rank's calls of ``step`` (FSDP averages the gradients over ranks)."""
        idx = self.batch(step)
        target = self.records["calls.velocity"][idx].to(self.device).float()  # [b, L, C]
        pred = student(**teacher_kwargs(self.records, idx, self.device))[0].float()  # [b, L, C]
        loss = (pred - target).square().mean() / self.norm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def checkpoint(self, total: int) -> dict | None:
        """The saved state of this run when it is at or before step ``total``, else None."""
        for legacy in [self.path / "state.pt", *sorted(self.path.glob("blocks/*.pt"))]:
            if legacy.is_file():  # pickle: loading it could run any code
                info(f"distill: {legacy} is an earlier bitflux's pickle state: not read (delete it)")
        file = self.path / STATE
        if not file.is_file():
            return None
        saved = read_saved(file)
        if saved["fingerprint"] != self.fingerprint:
            info(f"distill: {file} comes from another run (calibration, settings or bitflux version): starting over")
            return None
        if saved["step"] > total:
            return None
        info(f"distill: resuming from step {saved['step']} ({file})")
        return saved

    def load(self, student: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Set the STE linears of ``student`` from full tensors by parameter name (sharded again under FSDP)."""
        set_model_state_dict(student, state, options=StateDictOptions(full_state_dict=True, strict=False))

    def restore(self, saved: dict, student: torch.nn.Module, ste: dict[str, STELinear], opt: torch.optim.Optimizer) -> None:
        """The latent weights, scales and Adam state of a checkpoint, at this run's world size."""
        check_fits(saved, ste)
        self.load(student, saved["model"])
        set_optimizer_state_dict(student, opt, saved["optimizer"], options=StateDictOptions(full_state_dict=True))

    def save(self, step: int, student: torch.nn.Module, ste: dict[str, STELinear],
             opt: torch.optim.Optimizer | None, **where) -> None:
        """Checkpoint at ``step`` (every rank calls it, rank 0 writes); ``where`` records the position."""
        model = ste_state(ste)
        optim = {"state": {}, "param_groups": []} if opt is None else get_optimizer_state_dict(student, opt, options=FULL)
        if self.rank == 0:
            write_saved(self.path / STATE, {"fingerprint": self.fingerprint, "step": step, **where}, model, optim)


def _fingerprint(cfg: Config, calib: Calibration) -> str:
    dc = cfg.quantization.distill
    unused = {"steps", "save_every", "rounds"} | ({"block_steps"} if dc.mode == "full" else set())
    key = {"calibration": json.loads((calib.path / "manifest.json").read_text())["fingerprint"],
           "distill": dc.model_dump(mode="json", exclude=unused), "tool_version": TOOL_VERSION}
    if dc.init == "block-recon":
        key["block_recon"] = cfg.quantization.block_recon.model_dump(mode="json")
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _latent_state(m: STELinear) -> dict[str, torch.Tensor]:  # weight, log_scale, threshold, bias, on the CPU
    return {k: v.detach().cpu() for k, v in m.state_dict().items()}


def _frozen(module: torch.nn.Module) -> set[torch.nn.Parameter]:
    # replicated, not sharded: they never change, and FSDP2 wants one dtype per group (fp32 latents, bf16 rest)
    return {p for m in module.modules() if not isinstance(m, STELinear) for p in m.parameters(recurse=False)}


# A frozen copy of the teacher whose in-scope linears are STE linears from absmean, FSDP2-sharded when world > 1.
def _student(teacher: torch.nn.Module, dc: DistillConfig, world: int) -> tuple[torch.nn.Module, dict[str, STELinear]]:
    student = copy.deepcopy(teacher).requires_grad_(False)
    if dc.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    mesh = init_device_mesh(teacher.device.type, (world,)) if world > 1 else None
    # diffusers' blocks return slices of one tensor; nothing writes to them in place, which is what FSDP2 warns of
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    ste = {}
    for name, block in _blocks(student):  # attach, then shard, block by block: one block's fp32 latents are whole at a time
        init = {sub: absmean_init(lin.weight)
                for sub, lin in scoped_linears(block, lambda _n, m: isinstance(m, torch.nn.Linear))}
        ste |= {f"{name}.{sub}": m for sub, m in attach_ste(block, init, dc.weight_lr > 0).items()}
        if mesh is not None:
            fully_shard(block, mesh=mesh, ignored_params=_frozen(block))
    if mesh is not None:
        fully_shard(student, mesh=mesh, ignored_params=_frozen(student))
    return student.train(), ste


def _full(run: Run, teacher: torch.nn.Module, release_teacher: bool) -> dict:
    dc = run.dc
    student, ste = _student(teacher, dc, run.world)
    opt = optimizer(ste, dc.weight_lr, dc.scale_lr)
    saved = run.checkpoint(dc.steps)
    start = 0 if saved is None else saved["step"]
    if saved is not None:
        run.restore(saved, student, ste, opt)
    elif run.init is not None:
        run.load(student, run.init())
    if release_teacher:
        for lst in BLOCK_LISTS:
            getattr(teacher, lst).to("meta")
    with progress("distill", dc.steps - start, "steps") as advance:
        for step in range(start, dc.steps):
            run.train_step(student, opt, step)
            advance()
            if (step + 1) % dc.save_every == 0 or step + 1 == dc.steps:
                run.save(step + 1, student, ste, opt)
    return {name: _host(m.export()) for name, m in ste.items()}  # 11.8 GB of int8 codes at FLUX size: not on the GPU


def _host(t):
    """An export's tensors (nested in tuples) moved to the host."""
    return t.cpu() if torch.is_tensor(t) else tuple(map(_host, t))


def distill(cfg: Config, pipe, calib: Calibration, release_teacher: bool = False) -> dict:
    """Train the ternary student on the recorded teacher velocities; return its codes and scales.

    Under torchrun every rank takes part (full mode only) and all return the same codes.
    ``release_teacher`` (full mode): once the student is built and started, the teacher's blocks go
    to the meta device, since training never runs them (23.8 GB a rank at FLUX size); ``quantize``,
    which reads them from the files again afterwards, asks for it.
    """
    dc = cfg.quantization.distill
    rank, world = init_distributed()
    if dc.batch % world:
        raise UsageError(f"quantization.distill.batch ({dc.batch}) must be divisible by the number of ranks ({world})")
    if dc.mode == "blockwise" and world > 1:
        raise UsageError("quantization.distill.mode blockwise runs on one process: under torchrun use mode full")
    records = calib.records(lambda k: k.startswith("calls."))
    norm = records["calls.velocity"].double().square().mean().item()
    run = Run(dc, records, norm, pipe.transformer.device, rank, world, cfg.workdir / "distill", _fingerprint(cfg, calib))
    if cfg.quantization.residual_rank:
        info(f"distill: the student trains pure ternary; the rank-{cfg.quantization.residual_rank} residual is fitted after it")
    if dc.init == "block-recon":
        run.init = lambda: {f"{name}.{k}": v for name, state in reconstruct(cfg, pipe, calib, _latent_state).items()
                            for k, v in state.items()}
    return blockwise(run, pipe.transformer) if dc.mode == "blockwise" else _full(run, pipe.transformer, release_teacher)
