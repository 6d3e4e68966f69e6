"""The ternary linear as ``torch.library`` custom ops: ``torch.ops.bitflux.w2a16`` / ``w2a8``.

Both take the backend as a string argument ("reference", "torch" or "triton"), chosen outside
the traced region (``TernaryLinear`` resolves it per module). Each backend runs on every device
it supports: "torch" (decode by lookup + one matmul) and "reference" (float64) on CPU and CUDA,
"triton" on CUDA or in Triton's CPU interpreter. The fake impls make ``torch.compile``
(``fullgraph=True``, inductor) treat the ops as opaque calls without a graph break.

The triton route picks a kernel by M = tokens: M <= ``GEMV_MAX_M`` the packed GEMV;
M >= ``DECODE_MIN_M`` decode the weight into scratch, then cuBLAS (large_m.py); in between the
decode-in-register tensor-core GEMMs. Kernel modules are imported on first use, because Triton
decides between compiling and interpreting when a kernel is defined. Every buffer is made with
``torch.empty`` inside the op (capture-safe); autotuning is not: run each shape once before a
CUDA graph capture.
"""

import torch

from .reference import ternary_linear_reference, ternary_linear_torch


def route(m: int) -> str:
    """The kernel that serves ``m`` rows: "gemv" (M <= GEMV_MAX_M), "cublas" (decode + cuBLAS,
    M >= DECODE_MIN_M) or "gemm" (the decode-in-register tensor-core GEMM)."""
    from .gemv import GEMV_MAX_M
    from .large_m import DECODE_MIN_M

    return "gemv" if m <= GEMV_MAX_M else "cublas" if m >= DECODE_MIN_M else "gemm"


def _triton(x, packed, scale, bias, in_features, activations):
    from .gemv import gemv
    from .large_m import w2a8_cublas, w2a16_cublas
    from .w2a8 import w2a8 as w2a8_gemm
    from .w2a16 import w2a16 as w2a16_gemm

    x2 = x.reshape(-1, in_features)  # [M, K]
    m, n = x2.shape[0], packed.shape[0]
    y = x.new_empty(*x.shape[:-1], n)  # [..., N]
    y2 = y.view(-1, n)  # [M, N]
    scale = scale.float()
    kernel = route(m)
    if kernel == "gemv":
        gemv(x2, packed, scale, bias, in_features, out=y2, activations=activations)
    elif kernel == "cublas":
        (w2a8_cublas if activations == "int8" else w2a16_cublas)(x2, packed, scale, bias, in_features, out=y2)
    else:
        (w2a8_gemm if activations == "int8" else w2a16_gemm)(x2, packed, scale, bias, in_features, out=y2)
    return y


def _run(x, packed, scale, bias, in_features, activations, backend):
    if backend == "triton":
        return _triton(x, packed, scale, bias, in_features, activations)
    if backend == "torch":
        return ternary_linear_torch(x, packed, scale, bias, in_features, activations)
    if backend == "reference":
        return ternary_linear_reference(x, packed, scale, bias, in_features, activations)
    raise ValueError(f"unknown bitflux backend {backend!r} (reference, torch or triton)")


@torch.library.custom_op("bitflux::w2a16", mutates_args=())
def w2a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
          in_features: int, backend: str = "triton") -> torch.Tensor:
    """W2A16 ternary linear: x [..., K] float, packed [N, Kp/4] uint8, scale [N] -> [..., N] in x's dtype."""
    return _run(x, packed, scale, bias, in_features, "none", backend)


@torch.library.custom_op("bitflux::w2a8", mutates_args=())
def w2a8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
         in_features: int, backend: str = "triton") -> torch.Tensor:
    """W2A8 ternary linear (per-token int8 activations): same operands and result as ``w2a16``."""
    return _run(x, packed, scale, bias, in_features, "int8", backend)


def _fake(x, packed, scale, bias, in_features, backend="triton"):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


w2a16.register_fake(_fake)
w2a8.register_fake(_fake)
