"""Per-token activation quantization, bit-exact with ``reference.quantize_activations_int8`` / ``_fp8``.

int8: ``scale[m] = max(|x[m]|, 1e-12) / 127``, ``q[m, k] = round_half_even(x[m, k] / scale[m])``,
both divisions IEEE-rounded (``div_rn``) and rounding to nearest even like ``torch.round``.
fp8 (``FP8``): ``scale[m] = max(|x[m]|, 1e-12) / 448``, ``q = e4m3(clamp(x / scale, ±448))`` rounded to
nearest even with integer ops on the fp32 bits (``_round_e4m3``), the rounding torch's cast does; q
is written as e4m3 bytes (``BYTES``, for ``torch._scaled_mm``) or as its values in bf16 (exact, for
the packed kernel), never through Triton's own fp8 cast, which the interpreter does not round to
nearest even.
q is written K-padded to Kp with zeros so the GEMMs read it without K masks. With HAS_SUM the
kernel also writes ``sum_k q[m, k]`` (int32, int8 only), which the large-M path's epilogue subtracts
(large_m.py).
"""

import torch
import triton
import triton.language as tl

from .common import Space, launch, m_bucket, packed_k

_RNE = tl.constexpr(12582912.0)  # 1.5 * 2**23: adding and subtracting it rounds |v| < 2**22 half-to-even in fp32


def _configs():
    return [triton.Config({"ROWS": r, "BLOCK_K": bk}, num_warps=w) for r, bk, w in ((1, 1024, 4), (4, 1024, 8), (1, 2048, 8))]


def _prune(configs, named_args, **kwargs):
    """Row tiles no taller than M, column tiles no wider than Kp."""
    kp, bucket = named_args["KP"], named_args["M_BUCKET"]
    fit = [c for c in configs if c.kwargs["ROWS"] <= bucket and c.kwargs["BLOCK_K"] <= max(512, kp)]
    return fit or configs[:1]


SPACE = Space(_configs, _prune, key=("M_BUCKET", "KP"), interp={"ROWS": 16, "BLOCK_K": 128})


@triton.jit
def _round_e4m3(v, BYTES: tl.constexpr):
    """fp32 v, |v| <= 448 -> the nearest e4m3 (ties to even): its byte (BYTES, uint8) or its value (fp32).
    Normals (|v| >= 2**-6) keep 3 of fp32's 23 mantissa bits; subnormals are multiples of 2**-9,
    whose byte is the multiple itself (8, at 2**-6, is the smallest normal's byte too)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = bits & -0x80000000
    mag = bits & 0x7FFFFFFF
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & 0x7FF00000  # fp32 bits, 3 mantissa bits left
    ticks = (tl.abs(v) * 512.0 + _RNE) - _RNE  # subnormal: |v| in units of 2**-9, rounded half-even
    small = mag < 0x3C800000  # |v| < 2**-6
    if BYTES:
        byte = tl.where(small, ticks.to(tl.int32), (normal >> 20) - (120 << 3))  # fp32 exponent 127 -> e4m3's 7
        q = (byte | (sign >> 24) & 0x80).to(tl.uint8)
    else:
        q = (tl.where(small, (ticks * (1.0 / 512.0)).to(tl.int32, bitcast=True), normal) | sign).to(tl.float32, bitcast=True)
    return q


@triton.jit
def act_quant_kernel(x_ptr, q_ptr, s_ptr, sum_ptr, M, K, KP, stride_xm, stride_xk, stride_qm, M_BUCKET,
                     FP8: tl.constexpr, BYTES: tl.constexpr, HAS_SUM: tl.constexpr, PERMUTED: tl.constexpr,
                     ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """ROWS tokens: x: [M, K] float -> q: [M, KP] (int8, or its values in bf16; FP8: e4m3 bytes or bf16)
    zeros past K, s: [M] fp32, (HAS_SUM) sum: [M] int32. PERMUTED: q column t holds x's column
    ``packed_k(t)``, the order in which the packed kernel decodes a word's weights (packed.permute_x)."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    qmax = 448.0 if FP8 else 127.0
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [ROWS, 1]
    amax = tl.zeros((ROWS,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        xs = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(xs.to(tl.float32)), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), qmax)  # [ROWS]
    tl.store(s_ptr + offs_m, scale, mask=mask_m)
    q_rows = q_ptr + offs_m[:, None].to(tl.int64) * stride_qm
    total = tl.zeros((ROWS,), dtype=tl.int32)
    for k0 in range(0, KP, BLOCK_K):
        t = k0 + offs_k  # q's column
        k = packed_k(t) if PERMUTED else t  # x's column (a gather within t's group of 128)
        xs = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        v = tl.math.div_rn(xs.to(tl.float32), scale[:, None])
        if FP8:
            q = _round_e4m3(tl.minimum(tl.maximum(v, -448.0), 448.0), BYTES)
        else:
            v = tl.minimum(tl.maximum((v + _RNE) - _RNE, -127.0), 127.0)
            q = v if q_ptr.dtype.element_ty == tl.bfloat16 else v.to(tl.int8)  # fp32 -> bf16: the interpreter mis-casts int8 -> bf16
            if HAS_SUM:
                total += tl.sum(v.to(tl.int32), axis=1)  # exact: |q| <= 127
        tl.store(q_rows + t[None, :], q.to(q_ptr.dtype.element_ty), mask=mask_m[:, None] & (t < KP)[None, :])
    if HAS_SUM:
        tl.store(sum_ptr + offs_m, total, mask=mask_m)


def act_quant(x2: torch.Tensor, kp: int, sums: torch.Tensor | None = None, activations: str = "int8",
              dtype: torch.dtype | None = None, permuted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x2 [M, K] per token -> (q [M, kp] zero-padded past K, s [M] fp32).

    ``activations="int8"``: q int8; with ``sums`` ([M] int32) also writes each token's ``q.sum()`` there.
    ``"fp8"``: q float8_e4m3fn. ``dtype=torch.bfloat16``: the same values in bf16 (exact), for the
    packed kernel, and with ``permuted`` in its column order (``packed.permute_x`` of that q, in one pass)."""
    m, k = x2.shape
    fp8 = activations == "fp8"
    dtype = dtype or (torch.float8_e4m3fn if fp8 else torch.int8)
    if dtype not in ((torch.float8_e4m3fn if fp8 else torch.int8), torch.bfloat16) or (fp8 and sums is not None) \
            or (permuted and dtype != torch.bfloat16):
        raise ValueError(f"act_quant: no {activations} q in {dtype} (sums: int8 only; permuted: bf16 only)")
    q = torch.empty(m, kp, dtype=dtype, device=x2.device)
    s = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m == 0:
        return q, s
    bytes_out = dtype == torch.float8_e4m3fn
    grid = lambda meta: (triton.cdiv(m, meta["ROWS"]),)  # noqa: E731
    launch(act_quant_kernel, SPACE, grid, x2, q.view(torch.uint8) if bytes_out else q, s, sums, m, k, kp,
           x2.stride(0), x2.stride(1), q.stride(0), m_bucket(m), FP8=fp8, BYTES=bytes_out, HAS_SUM=sums is not None,
           PERMUTED=permuted)
    return q, s
