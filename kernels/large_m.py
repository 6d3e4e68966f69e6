"""Large-M path (M >= DECODE_MIN_M): decode the packed weight into scratch, then a cuBLAS GEMM.

At thousands of tokens a linear is compute-bound, so the decode-in-register GEMMs can at best
tie cuBLAS; here cuBLAS does the GEMM and the only extra work is the decode (decode.py), a
bandwidth-bound pass over one layer's weight (about 2.25 bytes a weight for bf16).

- W2A16: ``W' = codes * scale`` decoded in x's dtype (one rounding per weight), then
  ``addmm(bias, x, W'^T)``: bias in cuBLAS's epilogue, nothing after it.
- W2A8: per-token int8 ``q`` and its sums ``sum_k q`` (act_quant.py), the raw fields ``u = codes + 1``
  decoded into [N8, Kp] (N8 = N rounded up to 8, what ``torch._int_mm`` needs; half the decode's
  work of ``u - 1``), ``torch._int_mm`` -> int32 [M, N8] ``= q @ codes^T + sum_k q``, and one epilogue
  kernel ``y = (acc - sum_k q) * sx[m] * scale[n] + bias[n]`` (exact integers, then fp32), stored in
  x's dtype.
"""

import torch
import triton
import triton.language as tl

from .act_quant import act_quant
from .common import launch_fixed, output_for, store_scaled
from .decode import decode

DECODE_MIN_M = 512  # the text stream of a FLUX double block runs at 512; a guess until measured on a GPU
EPILOGUE_META = {"BLOCK_M": 32, "BLOCK_N": 128, "num_warps": 4}


@triton.jit
def int_epilogue_kernel(acc_ptr, qsum_ptr, sx_ptr, scale_ptr, bias_ptr, y_ptr, M, N, stride_am, stride_ym,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc: [M, >= N] int32, qsum: [M] int32, sx: [M] fp32, scale: [N] fp32, bias: [N] ->
    y: [M, N] = (acc - qsum) * sx * scale + bias."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    acc = tl.load(acc_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :],
                  mask=mask_m[:, None] & (offs_n < N)[None, :], other=0)  # [BLOCK_M, BLOCK_N] int32
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)  # [BLOCK_M] fp32
    qsum = tl.load(qsum_ptr + offs_m, mask=mask_m, other=0)  # [BLOCK_M] int32
    store_scaled((acc - qsum[:, None]).to(tl.float32) * sx[:, None], offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr,
                 stride_ym, 1, HAS_BIAS)


def w2a16_cublas(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """x2 [M, K] float, packed [N, Kp/4] uint8, scale [N] fp32 -> y [M, N] in x's dtype (into ``out`` if given)."""
    y = output_for(x2, packed, scale, bias, in_features, out)
    w = decode(packed, x2.dtype, scale=scale)[:, :in_features]  # [N, K] view of [N, Kp] scratch
    if bias is None:
        return torch.mm(x2, w.t(), out=y)
    return torch.addmm(bias.to(x2.dtype), x2, w.t(), out=y)


def w2a8_cublas(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token int8 x, then ``torch._int_mm`` against the decoded fields u = codes + 1 -> y [M, N] in x's dtype."""
    y = output_for(x2, packed, scale, bias, in_features, out)
    m, n = y.shape
    if m == 0:
        return y
    kq = packed.shape[1]
    qsum = torch.empty(m, dtype=torch.int32, device=x2.device)
    q, sx = act_quant(x2, 4 * kq, qsum)  # q: [M, Kp] int8 zero-padded, sx: [M] fp32, qsum: [M] int32
    u = decode(packed, torch.uint8, rows=-(-n // 8) * 8).view(torch.int8)  # [N8, Kp] in {0, 1, 2}
    acc = torch._int_mm(q, u.t())  # [M, N8] int32: q @ codes^T + qsum
    grid = (triton.cdiv(m, EPILOGUE_META["BLOCK_M"]), triton.cdiv(n, EPILOGUE_META["BLOCK_N"]))
    launch_fixed(int_epilogue_kernel, grid, EPILOGUE_META, acc, qsum, sx, scale, bias, y, m, n, acc.stride(0), y.stride(0),
                 HAS_BIAS=bias is not None)
    return y
