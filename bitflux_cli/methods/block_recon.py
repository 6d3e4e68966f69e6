"""Block reconstruction: block by block, the ternary block learns to reproduce the FP block's outputs.

Blocks run in execution order (double, then single). The inputs of block i are those of the
already-quantized student (blocks 0..i-1 ternary), computed from the teacher calls recorded by
calibration (``block_recon.inputs: quantized``, the default), so each block also corrects the error
that reaches it; ``inputs: fp`` takes the FP chain's activations instead (each block then learns
only its own error); the targets are the FP
block's image-stream outputs that calibration recorded at a subsample of image tokens and
(``block_recon.context_weight``) its text-stream output on the same student inputs. Each linear
starts from act-aware codes and scales; Adam then trains the scales (log space) and, through the
straight-through estimator, the latent weights (``block_recon.rounding: ste``), or, with ``rounding: adaround``,
each weight's choice between the two ternary grid points around w / s (AdaRound, soft while training,
annealed to hard codes by its penalty). With ``quantization.rotation: hadamard`` all of
that happens in each linear's rotated basis (``rotation.py``): codes of ``W R``, inputs rotated in the
forward. With ``quantization.residual_rank`` r > 0 each linear also starts with its rank-r residual
fitted to those act-aware codes (``residual.low_rank_residual``), which stays in the forward and trains with the rest, so the codes learn around it (a residual fitted
after training would pull the trained codes back towards W). Only one FP block (streamed), its
trained copy and optimizer state, its targets and the student activations of the recorded calls are held;
the FP block's text-stream outputs are computed once a block on those activations, not at every step.
"""

import copy
from collections.abc import Callable
from typing import Any

import torch

from ..calibrate import Calibration, teacher_kwargs
from ..config import Config
from ..console import info, progress
from ..residual import block_residuals
from ..rotation import rotated_inputs
from ..streaming import advance, block_names, blocks, outputs, prelude_state, run_block
from ..ternary import block_linears
from .act_aware import alphas, search, threshold_codes
from .adaround import AdaRound
from .ste import STELinear, attach_ste, optimizer


def _gather(hidden: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # [B, L, D], [B, tokens] -> [B, tokens, D]
    return torch.gather(hidden, 1, idx[..., None].expand(-1, -1, hidden.shape[-1]))


def _rounding_beta(step: int, steps: int) -> float | None:
    """The exponent of AdaRound's penalty at ``step``: none for the first 20% of ``steps``, then annealed
    from 20 to 2."""
    warm = steps // 5
    return None if step < warm else 20 - 18 * (step - warm) / max(1, steps - warm - 1)


class BlockRecon:
    """The block-recon method over a walk of the blocks: called with each FP block in execution
    order, it trains that block's ternary copy (with a rank-``residual_rank`` residual in each linear
    when > 0) and returns {linear: ``keep(STELinear)``}.

    It holds the student's activations of the recorded calls on the host, in the model dtype (the
    inputs of the next block): as many calls as ``quantization.activation_budget_gb`` allows.
    """

    def __init__(self, cfg: Config, transformer, calib: Calibration, keep: Callable[[STELinear], Any] = STELinear.export,
                 residual_rank: int = 0):
        self.cfg, self.calib, self.keep, self.residual_rank = cfg, calib, keep, residual_rank
        rc = cfg.quantization.block_recon
        records = calib.records(lambda k: k.startswith("calls.") and k != "calls.velocity")
        n = len(records["calls.step"])
        text = records["calls.encoder_hidden_states"].shape[1]
        seq = records["calls.hidden_states"].shape[1] + text * (2 if rc.context_weight else 1)  # + the FP text target
        per_call = seq * transformer.x_embedder.out_features * records["calls.hidden_states"].element_size()
        self.calls = min(n, max(1, int(cfg.quantization.activation_budget_gb * 1e9 // per_call)))
        if self.calls < n:
            info(f"block-recon: {self.calls} of the {n} recorded calls fit in quantization.activation_budget_gb "
                 f"({cfg.quantization.activation_budget_gb} GB at {per_call / 1e6:.0f} MB a call)")
        self.device = transformer.x_embedder.weight.device
        self.state = prelude_state(transformer, (teacher_kwargs(records, idx, self.device)
                                                 for idx in torch.arange(self.calls).split(rc.batch)))
        self.token_idx = records["calls.token_idx"][:self.calls].to(self.device)  # [C, tokens]
        self.last = block_names(transformer)[-1]
        self.gen = torch.Generator().manual_seed(rc.seed)

    def __call__(self, name: str, fp_block: torch.nn.Module) -> dict[str, Any]:
        rc, device, n = self.cfg.quantization.block_recon, self.device, self.calls
        block = copy.deepcopy(fp_block)  # one block: the student's, with STE linears
        rotation = self.cfg.quantization.rotation
        init, start = {}, {}  # act-aware's thresholds and scales; its codes, which a residual starts by correcting
        for sub, lin in block_linears(block):  # one linear's fp32 weight (W R with a rotation) at a time
            weight, d = rotated_inputs(rotation, lin, self.calib.second_moment(f"{name}.{sub}"))
            init[sub] = search(weight, d, alphas(self.cfg))
            if self.residual_rank:
                start[sub] = (threshold_codes(weight, init[sub][0]), init[sub][1])
        residuals = block_residuals(name, block, start, self.residual_rank, self.calib, rotation)  # {} at rank 0
        del start
        ste = attach_ste(block, init, rc.weight_lr > 0, residuals=residuals, rotation=rotation)
        rounding = AdaRound(ste) if rc.rounding == "adaround" else None  # freezes the latent weights
        opt = optimizer(ste, rc.weight_lr, rc.scale_lr, rc.residual_lr, rounding.v if rounding else None,
                        rc.rounding_lr)
        key = f"blocks.{name}"
        target = self.calib.records(lambda k: k == key, limit=n)[key][:n]  # [C, tokens, D] on the host; a batch a step goes over
        norm = target.float().square().mean().to(device)
        context_weight = rc.context_weight if name != self.last else 0.0  # the last text output is unused
        # the FP block's text stream on the student's inputs [C, T, D], on the host: once a block, not at every step
        fp_context = outputs(fp_block, self.state, rc.batch, device, ("context",))["context"] if context_weight else None
        with progress(f"block-recon {name}", rc.steps, "steps") as step_done:
            for step in range(rc.steps):
                penalty = rounding.soft(_rounding_beta(step, rc.steps)) if rounding else 0.0  # sets the soft codes
                idx = torch.randint(n, (min(rc.batch, n),), generator=self.gen)
                context, hidden = run_block(block, self.state, idx, device)  # [B, T, D], [B, L, D]
                pred = _gather(hidden, self.token_idx[idx]).float()
                loss = (pred - target[idx].to(device).float()).square().mean() / norm
                if context_weight:
                    fp_text = fp_context[idx].to(device).float()
                    loss = loss + context_weight * (context.float() - fp_text).square().mean() / fp_text.square().mean()
                loss = loss + rc.rounding_weight * penalty
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step_done()
        if rounding:
            rounding.fix()
        out = {sub: self.keep(m) for sub, m in ste.items()}
        self.state = advance(block if rc.inputs == "quantized" else fp_block, self.state, rc.batch, device, in_place=True)
        return out


def block_recon(cfg: Config, transformer, calib: Calibration) -> BlockRecon:
    """Act-aware start, then per-block Adam on scales and latent weights (and the residual's factors
    when ``quantization.residual_rank`` > 0) to match the FP block outputs."""
    return BlockRecon(cfg, transformer, calib, residual_rank=cfg.quantization.residual_rank)


def reconstruct(cfg: Config, pipe, calib: Calibration, keep: Callable[[STELinear], Any],
                residual_rank: int = 0) -> dict[str, Any]:
    """{full module name: ``keep(m)``} for the trained ``STELinear`` m of every in-scope linear of the
    materialised ``pipe.transformer`` (where distill starts from block-recon's latent state, pure
    ternary: distill trains no residual), with a rank-``residual_rank`` residual when > 0."""
    run = BlockRecon(cfg, pipe.transformer, calib, keep, residual_rank)
    return {f"{name}.{sub}": v for name, block in blocks(pipe.transformer) for sub, v in run(name, block).items()}
