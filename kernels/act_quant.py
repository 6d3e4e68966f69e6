"""Per-token int8 activation quantization, bit-exact with ``reference.quantize_activations_int8``.

``scale[m] = max(|x[m]|, 1e-12) / 127``, ``q[m, k] = round_half_even(x[m, k] / scale[m])``,
both divisions IEEE-rounded (``div_rn``) and rounding to nearest even like ``torch.round``.
q is written K-padded to Kp with zeros so the W2A8 GEMM reads it without K masks. With HAS_SUM the
kernel also writes ``sum_k q[m, k]`` (int32), which the large-M path's epilogue subtracts (large_m.py).
"""

import torch
import triton
import triton.language as tl

from .common import Space, launch, m_bucket

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
def act_quant_kernel(x_ptr, q_ptr, s_ptr, sum_ptr, M, K, KP, stride_xm, stride_xk, stride_qm, M_BUCKET,
                     HAS_SUM: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """ROWS tokens: x: [M, K] float -> q: [M, KP] int8 (zeros past K), s: [M] fp32, (HAS_SUM) sum: [M] int32."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # [ROWS, 1]
    amax = tl.zeros((ROWS,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        xs = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        amax = tl.maximum(amax, tl.max(tl.abs(xs.to(tl.float32)), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, 1e-12), 127.0)  # [ROWS]
    tl.store(s_ptr + offs_m, scale, mask=mask_m)
    q_rows = q_ptr + offs_m[:, None].to(tl.int64) * stride_qm
    total = tl.zeros((ROWS,), dtype=tl.int32)
    for k0 in range(0, KP, BLOCK_K):
        k = k0 + offs_k
        xs = tl.load(x_rows + k[None, :] * stride_xk, mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
        v = tl.math.div_rn(xs.to(tl.float32), scale[:, None])
        v = tl.minimum(tl.maximum((v + _RNE) - _RNE, -127.0), 127.0)
        tl.store(q_rows + k[None, :], v.to(tl.int8), mask=mask_m[:, None] & (k < KP)[None, :])
        if HAS_SUM:
            total += tl.sum(v.to(tl.int32), axis=1)  # exact: |q| <= 127
    if HAS_SUM:
        tl.store(sum_ptr + offs_m, total, mask=mask_m)


def act_quant(x2: torch.Tensor, kp: int, sums: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x2 [M, K] per token -> (q [M, kp] int8 zero-padded past K, s [M] fp32); with ``sums``
    ([M] int32) also writes each token's ``q.sum()`` there."""
    m, k = x2.shape
    q = torch.empty(m, kp, dtype=torch.int8, device=x2.device)
    s = torch.empty(m, dtype=torch.float32, device=x2.device)
    if m == 0:
        return q, s
    grid = lambda meta: (triton.cdiv(m, meta["ROWS"]),)  # noqa: E731
    launch(act_quant_kernel, SPACE, grid, x2, q, s, sums, m, k, kp, x2.stride(0), x2.stride(1), q.stride(0),
           m_bucket(m), HAS_SUM=sums is not None)
    return q, s
