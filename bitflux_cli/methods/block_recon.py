"""Block reconstruction: block by block, the ternary block learns to reproduce the FP block's outputs.

Blocks run in execution order (double, then single). The inputs of block i are those of the
already-quantized student (blocks 0..i-1 ternary), computed from the teacher calls recorded by
calibration, so each block also corrects the error that reaches it; the targets are the FP
block's image-stream outputs that calibration recorded at a subsample of image tokens and
(``block_recon.context_weight``) its text-stream output on the same student inputs. Each linear
starts from act-aware codes and scales; Adam then trains the scales (log space) and, through the
straight-through estimator, the latent weights. Only one block, its optimizer state, its targets
and the student activations of the recorded calls are held besides the FP model.
"""

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..calibrate import Calibration, _blocks, teacher_kwargs
from ..config import Config
from ..console import progress
from ..ternary import scoped_linears
from .act_aware import alphas, search
from .ste import STELinear, attach_ste, optimizer


class _Stop(Exception):
    pass


@torch.no_grad()
def block_inputs(transformer, records: dict[str, torch.Tensor], batch: int) -> dict:
    """The first block's inputs for every recorded call: hidden [C, L, D], context [C, T, D], temb [C, E], rope."""
    parts: dict[str, list[torch.Tensor]] = {"hidden_states": [], "encoder_hidden_states": [], "temb": []}
    rope = None

    def hook(_m, _args, kwargs):
        nonlocal rope
        for k in parts:
            parts[k].append(kwargs[k])
        rope = kwargs["image_rotary_emb"]
        raise _Stop

    handle = transformer.transformer_blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for idx in torch.arange(len(records["calls.step"])).split(batch):
            try:
                transformer(**teacher_kwargs(records, idx, transformer.device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return {k: torch.cat(v) for k, v in parts.items()} | {"image_rotary_emb": rope}


def _gather(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # [B, L, D], [B, tokens] -> [B, tokens, D]
    return torch.gather(hidden, 1, idx[..., None].expand(-1, -1, hidden.shape[-1]))


def _run(block, state: dict, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, hidden) outputs of ``block`` for the calls ``idx``."""
    return block(hidden_states=state["hidden_states"][idx], encoder_hidden_states=state["encoder_hidden_states"][idx],
                 temb=state["temb"][idx], image_rotary_emb=state["image_rotary_emb"])


def block_recon(cfg: Config, pipe, calib: Calibration) -> dict:
    """Act-aware start, then per-block Adam on scales and latent weights to match the FP block outputs."""
    return reconstruct(cfg, pipe, calib, STELinear.export)


def reconstruct(cfg: Config, pipe, calib: Calibration, keep: Callable[[STELinear], Any]) -> dict[str, Any]:
    """{full module name: ``keep(m)``} for the trained ``STELinear`` m of every in-scope linear, kept
    as each block finishes (codes and scales for block-recon; latent state where distill starts from it)."""
    rc = cfg.quantization.block_recon
    records = calib.records(lambda k: k.startswith("calls.") and k != "calls.velocity")
    state = block_inputs(pipe.transformer, records, rc.batch)
    n = len(records["calls.step"])
    device = pipe.transformer.device
    token_idx = records["calls.token_idx"].to(device)  # [C, tokens]
    blocks = _blocks(pipe.transformer)
    gen = torch.Generator().manual_seed(rc.seed)
    out = {}
    with progress("block-recon", len(blocks) * rc.steps, "steps") as advance:
        for name, fp_block in blocks:
            block = copy.deepcopy(fp_block)
            init = {sub: search(lin.weight, calib.second_moment(f"{name}.{sub}"), alphas(cfg))
                    for sub, lin in scoped_linears(block, lambda _n, m: isinstance(m, torch.nn.Linear))}
            ste = attach_ste(block, init, rc.weight_lr > 0)
            opt = optimizer(ste, rc.weight_lr, rc.scale_lr)
            key = f"blocks.{name}"
            target = calib.records(lambda k: k == key)[key].to(device).float()  # [C, tokens, D]
            norm = target.square().mean()
            context_weight = rc.context_weight if name != blocks[-1][0] else 0.0  # the last text output is unused
            for _ in range(rc.steps):
                idx = torch.randint(n, (min(rc.batch, n),), generator=gen)
                context, hidden = _run(block, state, idx)  # [B, T, D], [B, L, D]
                pred = _gather(hidden, token_idx[idx]).float()
                loss = (pred - target[idx]).square().mean() / norm
                if context_weight:
                    with torch.no_grad():
                        fp_context = _run(fp_block, state, idx)[0].float()
                    loss = loss + context_weight * (context.float() - fp_context).square().mean() / fp_context.square().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                advance()
            out |= {f"{name}.{sub}": keep(m) for sub, m in ste.items()}
            with torch.no_grad():
                outs = [_run(block, state, idx) for idx in torch.arange(n).split(rc.batch)]
            state["encoder_hidden_states"] = torch.cat([o[0] for o in outs])
            state["hidden_states"] = torch.cat([o[1] for o in outs])
    return out
