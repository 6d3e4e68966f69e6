"""Block-wise distillation: the end-to-end velocity loss, one block's latent weights trainable at a time.

Every in-scope linear of the student starts frozen ternary (absmean, or the ``distill.init``
state), held packed as a ``FrozenTernary`` (2-bit codes and a scale per row: 1/16 of fp32 latent
weights). The blocks are
visited in execution order (double, then single), ``distill.rounds`` times over; a visit turns the
block's linears into ``STELinear`` (latent weights from the FP teacher on the first round, else
those its previous visit left), trains them and their scales with Adam for ``distill.block_steps``
steps against the velocity loss, and freezes them back to ternary. Only that block's latent
weights and Adam state are ever held.

The end of a visit writes the block's latent state to
``<workdir>/distill/blocks/<block>.r<round>.safetensors`` (where its next visit starts, and from
which a resumed run rebuilds finished blocks; the run's fingerprint in its JSON header), then
``state.safetensors``, then drops the block's file of the round before. Steps count globally over
visits; ``state.safetensors`` records the step, the round and block it falls in, and mid-visit the
block's latent and Adam state. No file is pickle (see ``distill``).
"""

import copy
from pathlib import Path

import torch
from bitflux_kernels import ternary_linear_torch, unpack_2bit

from ..calibrate import _blocks
from ..console import progress
from ..errors import ArtifactError
from ..ternary import TernaryLinear, _set_submodule, scoped_linears, ternarize
from .act_aware import threshold_codes
from .ste import STELinear, absmean_init, attach_ste, check_fits, optimizer, read_saved, ste_state, write_saved


class FrozenTernary(TernaryLinear):
    """A ``TernaryLinear`` that passes gradients to its input on any device: decode, then one matmul.

    The Triton ops have no backward; frozen codes need only the input's gradient, which this has.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        return ternary_linear_torch(x, self.packed, self.scale, self.bias, self.in_features)


def _freeze(student: torch.nn.Module, ste: dict[str, STELinear]) -> None:
    for name, m in ste.items():
        _set_submodule(student, name, FrozenTernary.from_codes(*m.export(), m.bias))


def _start_codes(init_state: dict[str, torch.Tensor], name: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, K] int8, scale [N]) of linear ``name`` in a start state (latent weight, threshold, log scale)."""
    codes = threshold_codes(init_state[f"{name}.weight"].float(), init_state[f"{name}.threshold"])
    return codes.to(device, torch.int8), init_state[f"{name}.log_scale"].exp().to(device)


def _latents(run, block: str, rnd: int) -> Path:  # the block's latent state after its visit in round ``rnd``
    return run.path / "blocks" / f"{block}.r{rnd}.safetensors"


# STE linears in place of the block's frozen ones: from the FP weights or ``init_state`` (first
# visit), or from the latent state that the block's visit in ``last_round`` saved.
def _thaw(run, student, teacher, block: str, last_round: int, init_state: dict | None) -> dict[str, STELinear]:
    lins = scoped_linears(teacher.get_submodule(block), lambda _n, m: isinstance(m, torch.nn.Linear))
    init = {f"{block}.{sub}": absmean_init(lin.weight) for sub, lin in lins}
    ste = attach_ste(student, init, run.dc.weight_lr > 0, teacher)
    if last_round < 0 and init_state is not None:
        run.load(student, {k: v for k, v in init_state.items() if k.startswith(f"{block}.")})
    if last_round >= 0:
        file = _latents(run, block, last_round)
        if not file.is_file():
            raise ArtifactError(f"{file} is missing, and the distill state resumes from it: delete {run.path} to start over")
        saved = read_saved(file)
        if saved["fingerprint"] != run.fingerprint:
            raise ArtifactError(f"{file} comes from another distill run: delete {run.path} to start over")
        check_fits(saved, ste)
        run.load(student, saved["model"])
    return ste


def blockwise(run, teacher: torch.nn.Module) -> dict:
    """Train ``teacher``'s ternary student block by block against the end-to-end velocity loss.

    ``run`` is the ``distill.Run`` (calls, loss, checkpoint); returns every linear's codes and scales.
    """
    dc = run.dc
    init_state = None if run.init is None else run.init()
    student = copy.deepcopy(teacher).requires_grad_(False)
    for name, lin in list(scoped_linears(student)):
        codes = ternarize(lin.weight) if init_state is None else _start_codes(init_state, name, lin.weight.device)
        _set_submodule(student, name, FrozenTernary.from_codes(*codes, lin.bias))
    if dc.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    blocks = [name for name, _ in _blocks(student)]
    visits = dc.rounds * len(blocks)

    def where(step: int) -> dict:
        rnd, b = divmod(step // dc.block_steps, len(blocks))
        return {"round": rnd, "block": blocks[b], "block_step": step % dc.block_steps}

    saved = run.checkpoint(visits * dc.block_steps)
    start = 0 if saved is None else saved["step"]
    first_round, first_block = divmod(start // dc.block_steps, len(blocks))
    for b, block in enumerate(blocks):  # the blocks finished before the resumed step, as their last visit left them
        done = first_round if b < first_block else first_round - 1
        if done >= 0:
            _freeze(student, _thaw(run, student, teacher, block, done, init_state))
    with progress("distill", visits * dc.block_steps - start, "steps") as advance:
        for visit in range(start // dc.block_steps, visits):
            rnd, b = divmod(visit, len(blocks))
            ste = _thaw(run, student, teacher, blocks[b], rnd - 1, init_state)
            opt = optimizer(ste, dc.weight_lr, dc.scale_lr)
            lo, hi = visit * dc.block_steps, (visit + 1) * dc.block_steps
            if start > lo:
                run.restore(saved, student, ste, opt)
            for step in range(max(start, lo), hi):
                run.train_step(student, opt, step)
                advance()
                if (step + 1) % dc.save_every == 0 and step + 1 < hi:
                    run.save(step + 1, student, ste, opt, **where(step + 1))
            write_saved(_latents(run, blocks[b], rnd), {"fingerprint": run.fingerprint}, ste_state(ste))
            _freeze(student, ste)
            run.save(hi, student, {}, None, **where(hi))
            _latents(run, blocks[b], rnd - 1).unlink(missing_ok=True)
            del ste, opt  # before the next visit builds its own: one block's fp32 latents and Adam state at a time
    return {name: (unpack_2bit(m.packed, m.in_features).cpu(), m.scale.cpu())  # the codes on the host, one linear at a time
            for name, m in student.named_modules() if isinstance(m, FrozenTernary)}
