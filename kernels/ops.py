"""The ternary linear as ``torch.library`` custom ops: ``torch.ops.bitflux.w2a16`` / ``w2a8`` / ``w2fp8``.

Both take the backend as a string argument ("reference", "torch" or "triton"), chosen outside
the traced region (``TernaryLinear`` resolves it per module). Each backend runs on every device
it supports: "torch" (decode by lookup + one matmul) and "reference" (float64) on CPU and CUDA,
"triton" on CUDA or in Triton's CPU interpreter. The fake impls make ``torch.compile``
(``fullgraph=True``, inductor) treat the ops as opaque calls without a graph break.

The triton route picks a kernel by M = tokens: M < ``DECODE_MIN_M`` the packed split-K kernel
(packed.py: a GEMV at a few tokens, a skinny tensor-core GEMM of up to 128 tokens a program above);
M >= ``DECODE_MIN_M`` decode the weight into scratch, then cuBLAS (large_m.py). Kernel modules are imported on first use, because Triton
decides between compiling and interpreting when a kernel is defined. Every buffer is made with
``torch.empty`` inside the op (capture-safe); autotuning is not: run each shape once before a
CUDA graph capture.
"""

import functools

import torch

from .reference import ternary_linear_reference, ternary_linear_torch

if __name__ != "bitflux_kernels.ops":  # a second registration would leave the first one's op handles dangling
    raise ImportError(f"bitflux's ops imported as {__name__!r}: import them as bitflux_kernels.ops")


def route(m: int) -> str:
    """The kernel that serves ``m`` rows: "packed" (packed.py, M < DECODE_MIN_M) or "cublas" (decode + cuBLAS)."""
    from .large_m import DECODE_MIN_M

    return "cublas" if m >= DECODE_MIN_M else "packed"


def launcher(x2: torch.Tensor, activations: str):
    """The Triton launcher that serves x2 [M, K] in ``activations`` mode:
    ``f(x2, packed, scale, bias, in_features, out=None) -> y [M, N]`` (``kernels/bench.py`` checks it
    into a NaN-filled ``out``)."""
    from .large_m import fp8_gemm_ok, w2a8_cublas, w2a16_cublas, w2fp8_cublas
    from .packed import packed_gemm

    cublas = {"none": w2a16_cublas, "int8": w2a8_cublas, "fp8": w2fp8_cublas if fp8_gemm_ok(x2) else None}
    if route(x2.shape[0]) == "cublas" and cublas[activations] is not None:
        return cublas[activations]
    # fp8 where torch._scaled_mm cannot run (pre-Ada GPUs, fp16/fp32 x) takes the packed kernel at every M
    return functools.partial(packed_gemm, activations=activations)


def _triton(x, packed, scale, bias, in_features, activations):
    x2 = x.reshape(-1, in_features)  # [M, K]
    n = packed.shape[0]
    y = x.new_empty(*x.shape[:-1], n)  # [..., N]
    launcher(x2, activations)(x2, packed, scale.float(), bias, in_features, out=y.view(-1, n))
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


@torch.library.custom_op("bitflux::w2fp8", mutates_args=())
def w2fp8(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
          in_features: int, backend: str = "triton") -> torch.Tensor:
    """W2A8 ternary linear with per-token float8 e4m3 activations: same operands and result as ``w2a16``."""
    return _run(x, packed, scale, bias, in_features, "fp8", backend)


def _fake(x, packed, scale, bias, in_features, backend="triton"):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


w2a16.register_fake(_fake)
w2a8.register_fake(_fake)
w2fp8.register_fake(_fake)
OPS = {"none": w2a16, "int8": w2a8, "fp8": w2fp8}  # activation mode -> op
