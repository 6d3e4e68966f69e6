"""W2A16 GEMM: float activations x 2-bit packed ternary weights, decoded in registers.

``y = (x @ codes^T) * scale + bias`` with fp32 accumulation. Each K step loads one
[BLOCK_N, BLOCK_KQ] tile of packed bytes and runs four ``tl.dot``s, one per bit plane, against
the matching [BLOCK_M, BLOCK_KQ] activation slices (see common.py for the index map).
"""

import torch
import triton
import triton.language as tl

from .common import (dot_dtype, gemm_space, launch, m_bucket, operand_ptrs, output_for, plane_k, plane_weights,
                     store_scaled, tile_ids)


SPACE = gemm_space("x_ptr",
                   big=((128, 128, 32, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4)),
                   small=((16, 64, 64, 4, 4), (32, 64, 64, 4, 4), (32, 128, 64, 4, 3), (16, 128, 64, 4, 3)))


@triton.jit
def w2a16_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, K, KQ,
                 stride_xm, stride_xk, stride_wn, stride_ym, stride_yn, M_BUCKET,
                 HAS_BIAS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y.

    x: [M, K] bf16/fp16/fp32, w: [N, KQ = Kp/4] uint8 (bitplane128), scale: [N] fp32,
    bias: [N] (read only if HAS_BIAS), y: [M, N] in x's dtype. DOT: the dot operand type (x's
    dtype but on the interpreter, see ``dot_dtype``). M_BUCKET is the autotune key only.
    """
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows, w_ptrs, offs_c = operand_ptrs(x_ptr, w_ptr, offs_m, offs_n, M, N, stride_xm, stride_wn, BLOCK_KQ)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kq in range(0, KQ, BLOCK_KQ):
        wb = tl.load(w_ptrs, mask=(kq + offs_c < KQ)[None, :], other=0)  # [BLOCK_N, BLOCK_KQ] uint8
        for p in tl.static_range(4):
            k = plane_k(kq, offs_c, p)  # [BLOCK_KQ]
            xs = tl.load(x_rows + k[None, :] * stride_xk, mask=(k < K)[None, :], other=0.0)  # [BLOCK_M, BLOCK_KQ]
            w = plane_weights(wb, p, DOT)  # [BLOCK_N, BLOCK_KQ]
            acc = tl.dot(xs.to(DOT), tl.trans(w), acc, input_precision=PRECISION)
        w_ptrs += BLOCK_KQ
    store_scaled(acc, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, stride_yn, HAS_BIAS)


def w2a16(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
          in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """W2A16 GEMM launcher: x2 [M, K] float, packed [N, Kp/4] uint8, scale [N] fp32 -> y [M, N] (into ``out`` if given)."""
    y = output_for(x2, packed, scale, bias, in_features, out)
    m, n = y.shape
    if m == 0:
        return y
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    launch(w2a16_kernel, SPACE, grid, x2, packed, scale, bias, y, m, n, in_features, packed.shape[1],
           x2.stride(0), x2.stride(1), packed.stride(0), y.stride(0), y.stride(1), m_bucket(m),
           HAS_BIAS=bias is not None, DOT=dot_dtype(x2.dtype),
           PRECISION="ieee" if x2.dtype == torch.float32 else "tf32")
    return y
