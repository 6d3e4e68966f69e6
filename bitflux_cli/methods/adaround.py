"""AdaRound on the ternary grid (``block_recon.rounding: adaround``), for all the STE linears of a block at once.

Each weight's code is ``f + h``, a choice between the two grid points f and f + 1 around
r = clamp(w / s0, -1, 1) (f = -1 for r < 0, else 0: r = 1 may still become 0, as r = -1 may), with h AdaRound's
rectified sigmoid of a learned v, ``clamp(sigmoid(v) (ZETA - GAMMA) + GAMMA, 0, 1)``: soft while it trains,
pushed to 0 or 1 by the penalty ``mean(1 - |2h - 1|^beta)``, then fixed to ``[v >= 0]``.

The block's v live in one flat tensor, and the soft codes and the penalty come from one autograd function
with its own backward: done linear by linear through autograd, the dozen weight-sized elementwise ops
and their backward were most of a block-recon step on the CPU (the activations of a step are small).
"""

import math

import torch
from torch import nn

from .ste import STELinear

GAMMA, ZETA = -0.1, 1.1  # AdaRound's stretch of the sigmoid, so that h reaches 0 and 1 exactly
EDGE = math.log((1 - GAMMA) / (ZETA - 1))  # h is 0 below -EDGE, 1 above EDGE (log 11)


class _SoftCodes(torch.autograd.Function):
    """(codes [P], penalty []) from v [P], floor [P] int8 in {-1, 0}, the linears' sizes (summing to P)
    and beta (None: no penalty, it is 0). The penalty is the mean over linears of each one's mean.
    Float arithmetic only: on the CPU, ops that make or read bool masks are several times slower."""

    @staticmethod
    def forward(ctx, v, floor, sizes, beta):
        s = torch.sigmoid(v)  # [P]
        h = s.mul(ZETA - GAMMA).add_(GAMMA).clamp_(0, 1)
        slope = torch.ops.aten.hardtanh_backward(s.sub_(s * s).mul_(ZETA - GAMMA), v, -EDGE, EDGE)  # dh / dv
        codes = h + floor
        if beta is None:
            ctx.save_for_backward(slope, None)
            return codes, v.new_zeros(())
        y = h.mul_(2).sub_(1)  # 2h - 1
        t = y.abs()
        grad_h = t.pow(beta - 1)  # becomes d penalty / dv below
        kept = torch.stack([part.sum() / n for part, n in zip((grad_h * t).split(sizes), sizes)]).mean()
        grad_h = torch.copysign(grad_h, y).mul_(-2 * beta / len(sizes)).mul_(slope)
        for part, n in zip(grad_h.split(sizes), sizes):
            part.div_(n)
        ctx.save_for_backward(slope, grad_h)
        return codes, 1 - kept

    @staticmethod
    def backward(ctx, grad_codes, grad_penalty):
        slope, grad_pen = ctx.saved_tensors
        grad = grad_codes * slope
        if grad_pen is not None:
            grad.addcmul_(grad_pen, grad_penalty)
        return grad, None, None, None


class AdaRound(nn.Module):
    """The learned rounding of ``modules`` ({name: STELinear}, one block's): their latent weights are
    frozen, v [P] (all their weights, flat) starts where the soft code is w / s0, clipped to [-1, 1]."""

    def __init__(self, modules: dict[str, STELinear]):
        super().__init__()
        self.linears = list(modules.values())
        self.shapes = [m.weight.shape for m in self.linears]
        self.sizes = [m.weight.numel() for m in self.linears]
        r = torch.cat([(m.weight.detach() / m.log_scale.detach().exp()[:, None]).clamp(-1, 1).flatten()
                       for m in self.linears])  # [P]
        self.register_buffer("floor", r.floor().clamp(max=0).to(torch.int8))  # [P]
        frac = ((r - self.floor - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
        self.v = nn.Parameter(torch.log(frac / (1 - frac)))  # [P]
        for m in self.linears:
            m.weight.requires_grad_(False)

    def soft(self, beta: float | None) -> torch.Tensor:
        """Give each linear its soft codes for one training step; return the penalty at exponent
        ``beta`` (0 for None)."""
        codes, penalty = _SoftCodes.apply(self.v, self.floor, self.sizes, beta)
        for m, part, shape in zip(self.linears, codes.split(self.sizes), self.shapes):
            m.codes = part.view(shape)
        return penalty

    def fix(self) -> None:
        """Fix every linear to its hard codes ``floor + [v >= 0]``."""
        with torch.no_grad():
            hard = self.floor + (self.v >= 0).to(torch.int8)  # [P]
            for m, part, shape in zip(self.linears, hard.split(self.sizes), self.shapes):
                m.fix_codes(part.view(shape))
