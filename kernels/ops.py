"""The Triton kernels as ``torch.library`` custom ops (``torch.ops.bitflux.*``).

Registered with fake (meta) implementations, so ``torch.compile(fullgraph=True)`` traces through
them without a graph break. Each op allocates its output (and, for W2A8, the int8 activations and
their scales) with ``torch.empty`` only, which is safe under CUDA graph capture; autotuning is
not: run every shape once before capturing.
"""

import torch

from .gemv import GEMV_MAX_M, gemv
from .w2a8 import w2a8 as _w2a8
from .w2a16 import w2a16 as _w2a16


def _run(gemm, x, packed, scale, bias, in_features, activations):
    x2 = x.reshape(-1, in_features)  # [M, K]
    y = x.new_empty(*x.shape[:-1], packed.shape[0])  # [..., N]
    y2 = y.view(-1, packed.shape[0])  # [M, N]
    if x2.shape[0] <= GEMV_MAX_M:
        gemv(x2, packed, scale, bias, in_features, out=y2, activations=activations)
    else:
        gemm(x2, packed, scale, bias, in_features, out=y2)
    return y


@torch.library.custom_op("bitflux::w2a16", mutates_args=())
def w2a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
          in_features: int) -> torch.Tensor:
    """W2A16 ternary linear: x [..., K] float, packed [N, Kp/4] uint8, scale [N] fp32 -> [..., N] in x's dtype."""
    return _run(_w2a16, x, packed, scale, bias, in_features, "none")


@torch.library.custom_op("bitflux::w2a8", mutates_args=())
def w2a8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
         in_features: int) -> torch.Tensor:
    """W2A8 ternary linear (per-token int8 activations): same operands and result as ``w2a16``."""
    return _run(_w2a8, x, packed, scale, bias, in_features, "int8")


def _fake(x, packed, scale, bias, in_features):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


w2a16.register_fake(_fake)
w2a8.register_fake(_fake)
