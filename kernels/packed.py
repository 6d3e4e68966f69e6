"""The packed split-K GEMV, and the skinny GEMM it becomes with more tokens a program.

Serves every M below ``DECODE_MIN_M`` (ops.route), W2A16 and W2A8. At a few tokens the linear is
memory bound: the kernel must touch each 2-bit weight with as few instructions as it can. It
computes ``Y^T = W X^T`` with ``tl.dot`` (tokens padded to ``TOKENS`` columns, 16 to 128 by M:
``tokens_per_program``): the multiply-adds cost a fraction of an instruction per weight and the
reduction over K happens inside the MMA accumulators, never as shuffles. One dot a K step: a
program's weight tile is decoded once for all its TOKENS tokens (the in-register GEMMs it replaced
chained four dots a K step, one per bit plane, and on sm80 decoded the tile in every warp; W2A8
loses their int8 MMAs, see docs/KERNELS.md). What is left per weight is the decode:

- **Sign-bit decode.** A packed word holds 16 fields u (byte b = lane 4 l + b, plane p at bit
  ``8 b + 2 p``). ``r_s = ~(w << 2 s) & 0xC000C000`` puts fields ``7 - s`` and ``15 - s`` at bits
  15:14 and 31:30, i.e. two bf16/fp16 weights ``±2`` (u = 0, 2) or ``-0`` (u = 1): one shift and one
  ``lop3`` per two weights. The scale and the factor 1/2 go into the epilogue.
- **Permuted activations.** The 16 weights of a word come out in the order ``(s, half)``, not in
  K order; a dot does not care, so x is gathered once per call into that order (``permute_x``:
  xp[m, 16 wc + 2 s + h] = x[m, k(field 7 - s + 8 h)], zeros past K) in the dot's dtype: bf16 or
  fp16 as x, fp32 x as fp32 (``ieee`` dot), W2A8's int8 q as bf16 (exact: |q| <= 127; the sums of
  q x ±2 stay integers below 2^24, exact in the fp32 accumulators), its fp8 e4m3 q as bf16 (exact:
  e4m3 is a subset of bf16). W2A8's q is written in that order by act_quant itself (``permuted``),
  so the activations take one pass, not two.
- **Split-K.** FLUX's modulation linears have N = 9216 / 18432 but its MLP-out K = 12288 / 15360
  at N = 3072: too few N tiles to fill the GPU. ``SPLIT`` programs share a row tile, each over a
  contiguous run of words; they write fp32 partials [SPLIT, M, N] and ``reduce_kernel`` sums them
  in a fixed order (deterministic) and applies ``acc * scale / 2 (* sx) + bias``. With one split
  the GEMV kernel applies that epilogue itself.
"""

import torch
import triton
import triton.language as tl

from .act_quant import act_quant
from .common import Space, interpreting, launch, launch_fixed, output_for, packed_k

SPLIT_GRAIN = 16  # words: every split but the last covers a multiple of this (and of any BLOCK_W)
REDUCE_META = {"BLOCK_N": 256, "num_warps": 4}
PERMUTE_META = {"BLOCK": 1024, "num_warps": 4}


GEMV_CONFIGS = ((128, 8, 4, 4), (128, 8, 4, 3), (64, 8, 4, 4), (256, 8, 8, 3))  # TOKENS = 16, 32
GEMM_CONFIGS = ((128, 4, 4, 3), (128, 8, 8, 3), (256, 4, 8, 3), (128, 2, 4, 4))  # TOKENS = 64, 128
# each family's smallest, kept by every prune: with fp32 x (an fp32 decoded tile) several configs need
# more than the 99 KB of shared memory of an A10 / L4 (sm86/89), which the autotuner skips only
# when it has another candidate; these fit (tests/test_kernels_compile.py)
SMALLEST = {GEMV_CONFIGS: GEMV_CONFIGS[2], GEMM_CONFIGS: GEMM_CONFIGS[3]}


def _configs():
    """(BLOCK_N, BLOCK_W words a row a step, num_warps, num_stages), the GEMV's and the GEMM's.

    BLOCK_W divides 8, and so every split's run of words (KW = Kp/16 and WPS are multiples of 8):
    the K loop needs no mask (16-word steps would need one: 2.15 -> 1.89 instructions a weight
    without it, GEMV on sm90).
    """
    return [triton.Config({"BLOCK_N": bn, "BLOCK_W": bw}, num_warps=w, num_stages=s)
            for bn, bw, w, s in GEMV_CONFIGS + GEMM_CONFIGS]


def _prune(configs, named_args, **kwargs):
    """The GEMV's configs at TOKENS <= 32, the GEMM's above; row tiles that fit N, dividing it if any
    do; and always the family's smallest (``SMALLEST``), so that a GPU with little shared memory
    keeps one that launches; with fp32 x that one first (bf16/fp16 x fit every sm80+ GPU in all of them), for
    ``Space.kept`` with tuning off."""
    tokens = kwargs.get("TOKENS", named_args.get("TOKENS"))
    shape = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"], c.num_warps, c.num_stages): c for c in configs}
    family = GEMV_CONFIGS if tokens <= 32 else GEMM_CONFIGS
    mine = [shape[t] for t in family if t in shape] or configs
    fit = [c for c in mine if c.kwargs["BLOCK_N"] <= max(64, triton.next_power_of_2(named_args["N"]))]
    kept = [c for c in fit if named_args["N"] % c.kwargs["BLOCK_N"] == 0] or fit
    smallest = shape.get(SMALLEST[family])
    if smallest is None:
        return kept or mine[:1]
    rest = [c for c in kept if c is not smallest]
    return [smallest, *rest] if getattr(named_args.get("xp_ptr"), "dtype", None) == torch.float32 else [*rest, smallest]


SPACE = Space(_configs, _prune, key=("N", "KW", "WPS", "TOKENS"), interp={"BLOCK_N": 16, "BLOCK_W": 8})


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, sx_ptr, scale_ptr, bias_ptr, y_ptr, stride_ym,
              HAS_XSCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """y[m, n] = acc[m, n] * scale[n] / 2 (* sx[m]) (+ bias[n]) in fp32, stored in y's dtype; acc: [BM, BN]."""
    mask_n = offs_n < N
    s = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0) * 0.5  # the decoded weights are ±2
    y = acc * s[None, :]
    if HAS_XSCALE:
        y *= tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])


@triton.jit
def packed_kernel(xp_ptr, w_ptr, part_ptr, sx_ptr, scale_ptr, bias_ptr, y_ptr, M, N, KW, WPS, stride_wn, stride_ym,
                ONE_SPLIT: tl.constexpr, HAS_XSCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
                PATTERN: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, TOKENS: tl.constexpr):
    """Row tile ``pid 0`` of Y^T over the words [pid1 * WPS, + WPS) of split ``pid 1``.

    xp: [M, 16 KW] permuted x (permute_x); w: [N, 4 KW] uint8 read as uint32 words; part:
    [SPLIT, M, N] fp32 (not ONE_SPLIT) or y: [M, N] with the epilogue (ONE_SPLIT). PATTERN is
    the 16-bit float type of the ±2 patterns (bf16 or fp16), DOT the dot operand type.
    Grid (cdiv(N, BLOCK_N), SPLIT, cdiv(M, TOKENS)). No mask in the loop: BLOCK_W divides the
    split's words, and rows past N and tokens past M are wrapped (their outputs are not stored).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.program_id(1) * WPS
    end = tl.minimum(start + WPS, KW)
    offs_w = tl.arange(0, BLOCK_W)
    offs_t = tl.arange(0, 16 * BLOCK_W)
    offs_m = tl.program_id(2) * TOKENS + tl.arange(0, TOKENS)
    w_ptrs = w_ptr.to(tl.pointer_type(tl.uint32)) + (offs_n % N)[:, None].to(tl.int64) * stride_wn + offs_w[None, :]
    x_ptrs = xp_ptr + (offs_m % M)[None, :].to(tl.int64) * (16 * KW) + offs_t[:, None]  # [16 BLOCK_W, TOKENS]: x^T, tokens past M wrapped
    shifts = tl.reshape(2 * tl.arange(0, 8), (1, 1, 8))  # fields 7 - s and 15 - s to bits 15:14 and 31:30
    acc = tl.zeros((BLOCK_N, TOKENS), dtype=tl.float32)
    for w0 in range(start, end, BLOCK_W):
        words = tl.load(w_ptrs + w0)  # [BLOCK_N, BLOCK_W]
        r = ~(tl.expand_dims(words, 2) << shifts) & 0xC000C000  # [BLOCK_N, BLOCK_W, 8]: weight pairs (s, h)
        halves = tl.join((r & 0xFFFF).to(tl.uint16), (r >> 16).to(tl.uint16))  # [BLOCK_N, BLOCK_W, 8, 2]
        wt = tl.reshape(halves, (BLOCK_N, 16 * BLOCK_W)).to(PATTERN, bitcast=True).to(DOT)
        xt = tl.load(x_ptrs + 16 * w0)
        acc = tl.dot(wt, xt.to(DOT), acc, input_precision=PRECISION)  # [BLOCK_N, TOKENS]
    acc = tl.trans(acc)  # [TOKENS, BLOCK_N]: tokens x rows
    if ONE_SPLIT:
        _epilogue(acc, offs_m, offs_n, M, N, sx_ptr, scale_ptr, bias_ptr, y_ptr, stride_ym, HAS_XSCALE, HAS_BIAS)
    else:
        ptrs = part_ptr + (tl.program_id(1) * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def reduce_kernel(part_ptr, sx_ptr, scale_ptr, bias_ptr, y_ptr, M, N, SPLIT, stride_ym,
                  HAS_XSCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """part: [SPLIT, M, N] fp32 summed in split order, then the epilogue. Grid (M, cdiv(N, BLOCK_N))."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + (s * M + m).to(tl.int64) * N + offs_n, mask=offs_n < N, other=0.0)
    offs_m = m + tl.arange(0, 1)
    _epilogue(acc[None, :], offs_m, offs_n, M, N, sx_ptr, scale_ptr, bias_ptr, y_ptr, stride_ym, HAS_XSCALE, HAS_BIAS)


@triton.jit
def permute_x_kernel(x_ptr, xp_ptr, K, KP, stride_xm, stride_xk, BLOCK: tl.constexpr):
    """xp[m, t] = x[m, packed_k(t)] (0 past K) in xp's dtype. Grid (cdiv(KP, BLOCK), M)."""
    m = tl.program_id(1)
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    k = packed_k(t)
    v = tl.load(x_ptr + m.to(tl.int64) * stride_xm + k * stride_xk, mask=(k < K) & (t < KP), other=0)
    tl.store(xp_ptr + m.to(tl.int64) * KP + t, v.to(xp_ptr.dtype.element_ty), mask=t < KP)


def _dot_types(dtype: torch.dtype):
    """(xp dtype, PATTERN, DOT, PRECISION) for activations of ``dtype`` (bf16 too for W2A8's q)."""
    if dtype == torch.float16:
        return torch.float16, tl.float16, tl.float32 if interpreting() else tl.float16, "tf32"
    if dtype == torch.float32:
        return torch.float32, tl.bfloat16, tl.float32, "ieee"
    # bf16 x, or W2A8's q (exact in bf16); Triton 3.9's interpreter multiplies the raw bits of bf16
    # operands in tl.dot, so there they are upcast to fp32 (bf16 x ±2 products are exact in fp32)
    return torch.bfloat16, tl.bfloat16, tl.float32 if interpreting() else tl.bfloat16, "tf32"


def permute_x(x2: torch.Tensor, kp: int, dtype: torch.dtype) -> torch.Tensor:
    """x2 [M, K] -> xp [M, kp] in ``dtype``, in the order packed_kernel decodes a word's weights."""
    m, k = x2.shape
    xp = torch.empty(m, kp, dtype=dtype, device=x2.device)
    launch_fixed(permute_x_kernel, (triton.cdiv(kp, PERMUTE_META["BLOCK"]), m), PERMUTE_META,
                 x2, xp, k, kp, x2.stride(0), x2.stride(1))
    return xp


def tokens_per_program(m: int) -> int:
    """TOKENS for M rows: the next power of two from 16 (the MMA's narrowest) up to 128."""
    return min(max(16, triton.next_power_of_2(m)), 128)


def split_count(n: int, kw: int, device: torch.device, m: int = 1) -> int:
    """Splits of K so that about two programs per SM run (fewer when the N x M tiles already fill it)."""
    programs = 2 * (torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132)
    tiles = triton.cdiv(n, 128) * triton.cdiv(m, tokens_per_program(m))
    return max(1, min(kw // SPLIT_GRAIN, round(programs / tiles)))


def packed_gemm(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
         in_features: int, out: torch.Tensor | None = None, activations: str = "none",
         split: int | None = None) -> torch.Tensor:
    """x2 [M, K] float, packed [N, Kp/4] uint8, scale [N] fp32 -> y [M, N] in x's dtype.

    ``activations="int8"`` or ``"fp8"`` quantizes x2 per token first (act_quant.py; fp8's e4m3 q
    written as bf16), as the large-M W2A8 paths do.
    ``split`` forces the number of K splits (default: ``split_count``). Any M works
    (``tokens_per_program(M)`` tokens a program); the op sends it M < DECODE_MIN_M.
    """
    y = output_for(x2, packed, scale, bias, in_features, out)
    m, n = y.shape
    if m == 0:
        return y
    if packed.stride(0) % 4 or packed.data_ptr() % 4:
        raise ValueError("packed_gemm reads 32-bit words: packed rows must be 4-byte aligned")
    kq = packed.shape[1]
    kw = kq // 4
    sx = None
    if activations == "none":
        xp = permute_x(x2, 4 * kq, _dot_types(x2.dtype)[0])  # [M, Kp]
    else:  # q of x2 (int8 or e4m3 values) as bf16, permuted and zero-padded in the same pass; sx: [M] fp32
        xp, sx = act_quant(x2, 4 * kq, activations=activations, dtype=torch.bfloat16, permuted=True)
    _, pattern, dot, precision = _dot_types(xp.dtype)
    split = split_count(n, kw, y.device, m) if split is None else max(1, min(split, triton.cdiv(kw, 8)))
    wps = triton.cdiv(triton.cdiv(kw, split), SPLIT_GRAIN) * SPLIT_GRAIN if split > 1 else kw
    split = triton.cdiv(kw, wps)
    part = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=y.device)
    flags = {"HAS_XSCALE": sx is not None, "HAS_BIAS": bias is not None}
    tokens = tokens_per_program(m)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split, triton.cdiv(m, tokens))  # noqa: E731
    launch(packed_kernel, SPACE, grid, xp, packed, part, sx, scale, bias, y, m, n, kw, wps, packed.stride(0) // 4,
           y.stride(0), ONE_SPLIT=split == 1, PATTERN=pattern, DOT=dot, PRECISION=precision, TOKENS=tokens, **flags)
    if split > 1:
        launch_fixed(reduce_kernel, (m, triton.cdiv(n, REDUCE_META["BLOCK_N"])), REDUCE_META,
                     part, sx, scale, bias, y, m, n, split, y.stride(0), **flags)
    return y
