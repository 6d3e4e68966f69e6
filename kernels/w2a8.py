"""W2A8 GEMM: per-token int8 activations x 2-bit packed ternary weights on int8 tensor cores.

``y = (q @ codes^T) * sx[m] * scale[n] + bias`` where (q, sx) come from act_quant.py. Ternary
codes decode exactly to int8 (u - 1); products accumulate exactly in int32.
"""

import torch
import triton
import triton.language as tl

from .act_quant import act_quant
from .common import gemm_space, launch, m_bucket, operand_ptrs, output_for, plane_codes, plane_k, store_scaled, tile_ids


SPACE = gemm_space("q_ptr",
                   big=((128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 3)),
                   small=((16, 64, 128, 4, 4), (32, 64, 128, 4, 4), (32, 128, 128, 4, 3), (16, 128, 128, 4, 3)))


@triton.jit
def w2a8_kernel(q_ptr, sx_ptr, w_ptr, scale_ptr, bias_ptr, y_ptr, M, N, KQ,
                stride_qm, stride_wn, stride_ym, stride_yn, M_BUCKET, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr, GROUP_M: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] tile of y.

    q: [M, Kp = 4 KQ] int8 (zero past K), sx: [M] fp32, w: [N, KQ] uint8 (bitplane128),
    scale: [N] fp32, bias: [N] (read only if HAS_BIAS), y: [M, N]. M_BUCKET is the autotune key only.
    """
    pid_m, pid_n = tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    q_rows, w_ptrs, offs_c = operand_ptrs(q_ptr, w_ptr, offs_m, offs_n, M, N, stride_qm, stride_wn, BLOCK_KQ)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kq in range(0, KQ, BLOCK_KQ):
        mask_c = (kq + offs_c < KQ)[None, :]
        wb = tl.load(w_ptrs, mask=mask_c, other=0)  # [BLOCK_N, BLOCK_KQ] uint8
        for p in tl.static_range(4):
            xs = tl.load(q_rows + plane_k(kq, offs_c, p)[None, :], mask=mask_c, other=0)  # [BLOCK_M, BLOCK_KQ] int8
            acc = tl.dot(xs, tl.trans(plane_codes(wb, p)), acc)
        w_ptrs += BLOCK_KQ
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)  # [BLOCK_M] fp32
    store_scaled(acc.to(tl.float32) * sx[:, None], offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr,
                 stride_ym, stride_yn, HAS_BIAS)


def w2a8(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
         in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """W2A8 launcher: quantize x2 [M, K] per token, then the int8 GEMM -> y [M, N] in x's dtype (into ``out`` if given)."""
    y = output_for(x2, packed, scale, bias, in_features, out)
    m, n = y.shape
    if m == 0:
        return y
    kq = packed.shape[1]
    q, sx = act_quant(x2, 4 * kq)  # q: [M, Kp] int8, sx: [M] fp32
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    launch(w2a8_kernel, SPACE, grid, q, sx, packed, scale, bias, y, m, n, kq,
           q.stride(0), packed.stride(0), y.stride(0), y.stride(1), m_bucket(m), HAS_BIAS=bias is not None)
    return y
