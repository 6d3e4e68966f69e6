"""Small-M path (M <= GEMV_MAX_M): a reduction kernel that streams the packed weights once.

At a few tokens the linear is memory bound and ``tl.dot``'s 16-row minimum would waste most of
the tensor core, so each program keeps [BLOCK_M, BLOCK_N, BLOCK_KQ] products in registers and
reduces along K on CUDA cores. Serves W2A16 (float x) and W2A8 (int8 q with per-token sx).
"""

import torch
import triton
import triton.language as tl

from .act_quant import act_quant
from .common import Space, keep_fitting, launch, m_bucket, operand_ptrs, output_for, plane_codes, plane_k, store_scaled

GEMV_MAX_M = 4  # above this, the tensor-core GEMMs win (to be confirmed by bench on a GPU)


def _configs():
    """(BLOCK_M, BLOCK_N, BLOCK_KQ, num_warps, num_stages): a few tiles of <= 16k live products."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KQ": bkq}, num_warps=w, num_stages=s)
            for bm, bn, bkq, w, s in ((1, 64, 128, 4, 3), (1, 128, 64, 4, 3), (2, 64, 64, 4, 3),
                                      (4, 32, 64, 4, 3), (4, 64, 32, 4, 2), (2, 128, 32, 8, 2))]


def _prune(configs, named_args, **kwargs):
    """BLOCK_M up to the M bucket; at most 16k live products per program (register budget)."""
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_KQ"] <= 16384]
    return keep_fitting(small, named_args["N"], named_args["KQ"], named_args["M_BUCKET"])


SPACE = Space(_configs, _prune, key=("M_BUCKET", "N", "KQ"), interp={"BLOCK_M": 4, "BLOCK_N": 32, "BLOCK_KQ": 32})


@triton.jit
def gemv_kernel(x_ptr, sx_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K, KQ,
                stride_xm, stride_xk, stride_wn, stride_ym, stride_yn, M_BUCKET,
                HAS_XSCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y; grid (cdiv(N, BLOCK_N), cdiv(M, BLOCK_M)).

    x: [M, K] float, or int8 with sx: [M] fp32 when HAS_XSCALE; w: [N, KQ = Kp/4] uint8
    (bitplane128); scale: [N] fp32; bias: [N] (read only if HAS_BIAS); y: [M, N].
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows, w_ptrs, offs_c = operand_ptrs(x_ptr, w_ptr, offs_m, offs_n, M, N, stride_xm, stride_wn, BLOCK_KQ)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kq in range(0, KQ, BLOCK_KQ):
        wb = tl.load(w_ptrs, mask=(kq + offs_c < KQ)[None, :], other=0)  # [BLOCK_N, BLOCK_KQ] uint8
        for p in tl.static_range(4):
            k = plane_k(kq, offs_c, p)  # [BLOCK_KQ]
            xs = tl.load(x_rows + k[None, :] * stride_xk, mask=(k < K)[None, :], other=0).to(tl.float32)
            w = plane_codes(wb, p).to(tl.float32)  # [BLOCK_N, BLOCK_KQ]
            acc += tl.sum(xs[:, None, :] * w[None, :, :], axis=2)
        w_ptrs += BLOCK_KQ
    if HAS_XSCALE:
        acc *= tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    store_scaled(acc, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS)


def gemv(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
         in_features: int, out: torch.Tensor | None = None, activations: str = "none") -> torch.Tensor:
    """Small-M launcher: x2 [M, K] float, packed [N, Kp/4] uint8, scale [N] fp32 -> y [M, N] in x's dtype.

    ``activations="int8"`` quantizes x2 per token first (act_quant.py), as the W2A8 GEMM does.
    """
    y = output_for(x2, packed, scale, bias, in_features, out)
    m, n = y.shape
    if m == 0:
        return y
    kq = packed.shape[1]
    sx, k = None, in_features
    if activations == "int8":
        x2, sx = act_quant(x2, 4 * kq)  # x2: [M, Kp] int8 zero-padded, sx: [M] fp32
        k = 4 * kq
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, meta["BLOCK_M"]))  # noqa: E731
    launch(gemv_kernel, SPACE, grid, x2, sx, packed, scale, bias, y, m, n, k, kq,
           x2.stride(0), x2.stride(1), packed.stride(0), y.stride(0), y.stride(1), m_bucket(m),
           HAS_XSCALE=sx is not None, HAS_BIAS=bias is not None)
    return y
