"""Large-M path (M >= DECODE_MIN_M): decode the packed weight into scratch, then a cuBLAS GEMM.

At thousands of tokens a linear is compute-bound, so the decode-in-register GEMMs can at best
tie cuBLAS; here cuBLAS does the GEMM and the only extra work is the decode (decode.py), a
bandwidth-bound pass over one layer's weight (about 2.25 bytes a weight for bf16).

- W2A16: ``W' = codes * scale * lift`` decoded in x's dtype (one rounding per weight; ``lift`` is
  2^64 for bf16, decode.py), then ``addmm(bias, x, W'^T, alpha=1 / lift)``: the lift and the bias in
  cuBLAS's fp32 epilogue, nothing after it.
- W2A8: per-token int8 ``q`` and its sums ``sum_k q`` (act_quant.py), the raw fields ``u = codes + 1``
  decoded into [N8, Kp] (N8 = N rounded up to 8, what ``torch._int_mm`` needs; half the decode's
  work of ``u - 1``), ``torch._int_mm`` -> int32 [M, N8] ``= q @ codes^T + sum_k q``, and one epilogue
  kernel ``y = (acc - sum_k q) * sx[m] * scale[n] + bias[n]`` (exact integers, then fp32), stored in
  x's dtype.
- W2A8 with fp8 activations (sm89+: Ada, Hopper; and the CPU): per-token e4m3 ``q`` (act_quant.py,
  bit-exact with ``reference.quantize_activations_fp8``), ``2 * codes`` decoded into e4m3 [N16, Kp] (N16 = N rounded
  up to 16, what fp8 GEMMs need), and one ``torch._scaled_mm`` with row-wise scales ``sx[m]`` and
  ``scale[n] / 2`` and the bias in cuBLAS's epilogue: no int32 pass, nothing after the GEMM.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .act_quant import act_quant
from .common import interpreting, launch_fixed, output_for, store_scaled
from .decode import decode, lift

DECODE_MIN_M = 512  # the text stream of a FLUX double block runs at 512; a guess until measured on a GPU
INT_MM_MIN_M = 16  # CUDA's torch._int_mm refuses 16 rows or fewer
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
    w = decode(packed, x2.dtype, scale=scale)[:, :in_features]  # [N, K] view of [N, Kp] scratch, x lift
    alpha = 1.0 / lift(x2.dtype)
    if bias is None:
        return torch.addmm(y, x2, w.t(), beta=0, alpha=alpha, out=y)  # beta 0: y's contents are never read
    return torch.addmm(bias.to(x2.dtype), x2, w.t(), alpha=alpha, out=y)


def w2a8_cublas(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token int8 x, then ``torch._int_mm`` against the decoded fields u = codes + 1 -> y [M, N] in x's dtype."""
    y = output_for(x2, packed, scale, bias, in_features, out)
    m, n = y.shape
    if m == 0:
        return y
    kq = packed.shape[1]
    qsum = torch.empty(m, dtype=torch.int32, device=x2.device)
    q, sx = act_quant(x2, 4 * kq, sums=qsum)  # q: [M, Kp] int8 zero-padded, sx: [M] fp32, qsum: [M] int32
    if q.is_cuda and m <= INT_MM_MIN_M:  # CUDA's _int_mm takes more than 16 rows (the op routes M >= 512 here)
        q = F.pad(q, (0, 0, 0, INT_MM_MIN_M + 1 - m))  # [17, Kp]: zero tokens, never read back
    u = decode(packed, torch.uint8, rows=-(-n // 8) * 8).view(torch.int8)  # [N8, Kp] in {0, 1, 2}
    acc = torch._int_mm(q, u.t())  # [M, N8] int32: q @ codes^T + qsum
    grid = (triton.cdiv(m, EPILOGUE_META["BLOCK_M"]), triton.cdiv(n, EPILOGUE_META["BLOCK_N"]))
    launch_fixed(int_epilogue_kernel, grid, EPILOGUE_META, acc, qsum, sx, scale, bias, y, m, n, acc.stride(0), y.stride(0),
                 HAS_BIAS=bias is not None)
    return y


def fp8_gemm_ok(x2: torch.Tensor) -> bool:
    """``torch._scaled_mm`` can serve x2: on CUDA sm89+ with bf16 activations (its row-wise scaling
    writes bf16 only), or on the CPU under the interpreter (the tests)."""
    if x2.device.type != "cuda":
        return interpreting()
    return torch.cuda.get_device_capability(x2.device) >= (8, 9) and x2.dtype == torch.bfloat16


def w2fp8_cublas(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token fp8 e4m3 x, then ``torch._scaled_mm`` against the decoded ``2 * codes`` -> y [M, N] in x's dtype.
    Only where ``fp8_gemm_ok(x2)``; the packed kernel serves fp8 everywhere else (``ops.launcher``)."""
    y = output_for(x2, packed, scale, bias, in_features, out)
    if not fp8_gemm_ok(x2):
        raise ValueError(f"torch._scaled_mm's row-wise fp8 GEMM needs bf16 x on an sm89+ GPU, got {x2.dtype} on "
                         f"{x2.device}: use packed.packed_gemm(..., activations='fp8')")
    m, n = y.shape
    if m == 0:
        return y
    n16 = -(-n // 16) * 16
    q, sx = act_quant(x2, 4 * packed.shape[1], activations="fp8")  # q: [M, Kp] e4m3 zero-padded, sx: [M] fp32
    w = decode(packed, torch.float8_e4m3fn, rows=n16)  # [N16, Kp]: 2 * codes
    col_scale = F.pad(scale * 0.5, (0, n16 - n), value=1.0)[None, :]  # [1, N16]: the decoded weights are ±2
    b = None if bias is None else F.pad(bias.to(x2.dtype), (0, n16 - n))  # [N16]
    direct = n16 == n and y.is_contiguous()
    acc = torch._scaled_mm(q, w.t(), scale_a=sx[:, None], scale_b=col_scale, bias=b, out_dtype=x2.dtype,
                           **({"out": y} if direct else {}))  # [M, N16]
    if not direct:
        y.copy_(acc[:, :n])
    return y
