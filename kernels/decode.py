"""Decode the 2-bit packed weight into a dense [rows, Kp] scratch matrix (large-M path, large_m.py).

A bandwidth-bound elementwise kernel (reads 2 bits, writes 8 or 16 per weight). Both fast
variants work on 32-bit words: packed row n, word column ``wc`` = (group ``g = wc // 8``, lane
word ``l = wc % 8``) holds bytes ``b0..b3`` = lanes ``4 l .. 4 l + 3`` of group g, each byte with
the four planes at shifts 0, 2, 4, 6. A program loads [BLOCK_N, BLOCK_G, 8] words (128-bit
loads) and writes each plane's outputs as contiguous 16-byte vectors.

- **raw fields** (W2A8): for plane p, ``(w >> 2p) & 0x03030303`` is four fields ``u`` in {0, 1, 2},
  one a byte (a shift and an ``and`` for four weights), landing at byte word ``32 g + 8 p + l``. The
  GEMM then runs on ``u = codes + 1`` and its epilogue subtracts the per-token sum of q
  (large_m.py): ``q @ u^T = q @ codes^T + sum_k q``.
- **float8 e4m3** (W2A8 with fp8 activations), the sign-bit trick on bytes: ``~(w << (6 - 2p)) &
  0xC0C0C0C0`` puts each byte's field of plane p at bits 7:6 inverted, which read as e4m3 ``-2``
  (u = 0: 0xC0), ``-0`` (u = 1: 0x80) or ``+2`` (u = 2: 0x40): again a shift and a ``lop3`` for four
  weights; the GEMM's per-column scale takes the factor 1/2.
- **bf16** (W2A16), one ``lop3`` per two weights and no float op: with u's two bits at bits 15:14
  of a 16-bit half, ``S ^ (bits & 0xC000)``, where S is the bf16 of ``-scale * 2^64``, flips the
  sign for u = 2 (``+scale``), keeps ``-scale`` for u = 0, and for u = 1 clears the exponent's top
  bit: ``-scale * 2^-64`` (exponent - 128), a zero weight to 2^-128 of its row's other weights,
  below anything bf16 resolves. The lift 2^64 (``LIFT``) puts every scale in [2^-63, 2^64) at an
  exponent >= 128, so that bit is set; the GEMM takes it back exactly in its epilogue
  (``addmm(..., alpha=2^-64)``: a power of two, in fp32). Rows with ``|scale| < 2^-63`` decode to
  +0 (S = 0 and a zero mask). One byte permute puts lanes (0, 1) in bytes 1, 3 and lanes (2, 3) in
  bytes 0, 2; then each output register (two weights, adjacent in K) is one shift and one ``lop3``:
  ``S ^ ((y << (6 - 2p)) & M)`` (lanes 0, 1) and ``S ^ ((y << (14 - 2p)) & M)`` (lanes 2, 3).
- **fp16**: its 5-bit exponent leaves no room for the lift, so its sign-bit trick takes a float op:
  ``~bits & 0xC000`` is 0xC000 (u = 0: -2.0), 0x8000 (u = 1: -0.0) or 0x4000 (u = 2: +2.0), and one
  packed ``fma.rn.f16x2`` by ``scale / 2`` gives ``(u - 1) * scale`` exactly as ``±round(scale)``
  (rounding is odd-symmetric), and ``±0`` for zeros. Under the interpreter the permute and the fma
  run as plain integer and fp32 ops (same bits); the shifts and masks are the same code.
- **fp32** (rare at large M): per byte and plane ``(u - 1) * scale`` in fp32.

The K padding decodes as zero codes do: -0 (fp16, e4m3), a zero weight (bf16) or u = 1 (raw fields).
Rows past N (``rows`` > N, byte outputs only: N rounded up to 8 for ``torch._int_mm``, 16 for
``torch._scaled_mm``) repeat rows ``n % N``; the GEMM's columns past N are never read.
"""

import torch
import triton
import triton.language as tl

from .common import interpreting, launch_fixed
from .layout import MAX_SCALE

ZERO_BYTE = tl.constexpr(0x55)  # four fields of u = 1: four zero weights
# a trip: 8 rows x 64 words (8 groups: 8k weights, 64 a thread), unrolled twice; every FLUX Kp/16 is a multiple of 64
FIELDS_META = {"BLOCK_N": 8, "BLOCK_W": 64, "UNROLL": 2, "num_warps": 4}
HALF_META = {"BLOCK_N": 8, "BLOCK_W": 64, "UNROLL": 2, "num_warps": 4}
FLOAT_META = {"BLOCK_N": 32, "BLOCK_KQ": 128, "num_warps": 4}
BYTE_DTYPES = (torch.uint8, torch.float8_e4m3fn)  # one byte a weight, from decode_fields_kernel
LIFT = tl.constexpr(MAX_SCALE)  # the bf16 decode writes weights x LIFT (module docstring); the GEMM takes alpha = 1 / LIFT


@triton.jit
def _tile(N, ROWS, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, PAIRS: tl.constexpr):
    """(rows [BLOCK_N, 1] int64, word columns [1, BLOCK_W] of the first chunk, mask of rows < N, store mask).

    With PAIRS the columns are written ``c // 2 * 2 + c % 2`` (the same numbers) so that the
    compiler sees runs of 2 contiguous words: each thread then holds 2 words, and the bf16
    decode's join of its two outputs gives runs of 4 pairs, a 16-byte store, with no layout change.
    """
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    c = tl.arange(0, BLOCK_W)
    if PAIRS:
        c = c // 2 * 2 + c % 2
    return n.to(tl.int64), c[None, :], n < N, n < ROWS


@triton.jit
def _src(w_ptr, n, c, N, ROWS, stride_wn):
    """Word pointers [BLOCK_N, BLOCK_W] of the first chunk. Rows past N wrap around (to rows their
    stores mask or nobody reads), so the loads need no mask."""
    return w_ptr.to(tl.pointer_type(tl.uint32)) + (n % N) * stride_wn + c


@triton.jit
def decode_fields_kernel(w_ptr, out_ptr, N, ROWS, KW, stride_wn, stride_on, FP8: tl.constexpr, EVEN: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, UNROLL: tl.constexpr):
    """w: [N, 4 KW] uint8 read as [N, KW] uint32 -> out: [ROWS, 16 KW] bytes, written as uint32 words:
    the fields u, or (FP8) the e4m3 bits of ``2 (u - 1)``.

    Word column wc, plane p lands at byte word ``32 (wc // 8) + 8 p + wc % 8``. Strides in 32-bit
    words. Grid (cdiv(ROWS, BLOCK_N),): a program walks its rows' words BLOCK_W (a multiple of 8
    dividing KW) at a time, so addresses are computed once. Rows past N read row ``n % N`` (no load
    mask); EVEN: BLOCK_N divides ROWS, so no store needs a mask.
    """
    n, c, _, mask = _tile(N, ROWS, BLOCK_N, BLOCK_W, False)
    src = _src(w_ptr, n, c, N, ROWS, stride_wn)  # [BLOCK_N, BLOCK_W]
    dst = out_ptr.to(tl.pointer_type(tl.uint32)) + n * stride_on + (c // 8 * 32 + c % 8)
    for _ in tl.range(0, KW, BLOCK_W, loop_unroll_factor=UNROLL):
        words = tl.load(src)
        for p in tl.static_range(4):
            if FP8:
                fields = ~(words << (6 - 2 * p)) & 0xC0C0C0C0  # four e4m3 -2 / -0 / +2, one a byte
            else:
                fields = (words >> (2 * p)) & 0x03030303  # four u in {0, 1, 2}, one a byte
            if EVEN:
                tl.store(dst + 8 * p, fields)
            else:
                tl.store(dst + 8 * p, fields, mask=mask)
        src += BLOCK_W
        dst += 4 * BLOCK_W


@triton.jit
def _lanes_01_23(words, INTERPRET: tl.constexpr):
    """Byte permute [b0, b1, b2, b3] -> [b2, b0, b3, b1] (PTX ``prmt`` selector 0x1302)."""
    if INTERPRET:
        return (((words >> 16) & 0xFF) | ((words & 0xFF) << 8) | (((words >> 24) & 0xFF) << 16)
                | (((words >> 8) & 0xFF) << 24))
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, 0, 0x1302;", "=r,r", [words],
                                         dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _fp16_pairs(r, mult, mult_f32, INTERPRET: tl.constexpr):
    """Both fp16 halves of r times ``mult`` (fp16 bits in both halves; ``mult_f32`` the same value in
    fp32): one packed ``fma.rn.f16x2`` with -0.0 added, exact here (±2 x mult, or ±0)."""
    if INTERPRET:
        lo = (r & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * mult_f32
        hi = (r >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * mult_f32
        lo = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        hi = hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        return lo | (hi << 16)
    else:
        return tl.inline_asm_elementwise("{ .reg .b32 z; mov.b32 z, 0x80008000; fma.rn.f16x2 $0, $1, $2, z; }",
                                         "=r,r,r", [r, mult], dtype=tl.uint32, is_pure=True, pack=1)


@triton.jit
def _both_halves(v, DT: tl.constexpr):
    """[BLOCK_N, 1] fp32 -> the DT bits of v in both 16-bit halves of a uint32."""
    bits = v.to(DT).to(tl.uint16, bitcast=True).to(tl.uint32)
    return bits | (bits << 16)


@triton.jit
def decode_half_kernel(w_ptr, scale_ptr, out_ptr, N, ROWS, KW, stride_wn, stride_on, HAS_SCALE: tl.constexpr,
                       INTERPRET: tl.constexpr, EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                       UNROLL: tl.constexpr):
    """w: [N, 4 KW] uint8 -> out: [ROWS, 16 KW] bf16 ``(u - 1) * scale[n] * LIFT`` or fp16
    ``(u - 1) * scale[n]`` (scale 1 without HAS_SCALE).

    Written as uint32 pairs: word column wc, plane p, lanes (2h, 2h + 1) land at pair column
    ``64 (wc // 8) + 16 p + 2 (wc % 8) + h``. Strides in 32-bit words. Grid (cdiv(ROWS, BLOCK_N),),
    BLOCK_W words (a multiple of 8 dividing KW) a trip. EVEN: BLOCK_N divides ROWS, so no store
    needs a mask. (With ROWS a multiple of 16, as the JIT sees every FLUX N, a masked store's
    predicate is uniform per program and ptxas wraps each plane's stores in a branch: +27 SASS
    instructions a trip on sm90.)
    """
    DT: tl.constexpr = out_ptr.dtype.element_ty
    n, c, load_mask, mask = _tile(N, ROWS, BLOCK_N, BLOCK_W, True)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + n, mask=load_mask, other=0.0)  # [BLOCK_N, 1] fp32
    else:
        scale = tl.full((BLOCK_N, 1), 1.0, tl.float32)
    if DT == tl.bfloat16:
        lifted = (scale * LIFT).to(DT).to(tl.float32)  # [BLOCK_N, 1]: a power of two, exact
        normal = tl.abs(lifted) >= 2.0  # the exponent's top bit is set
        flip = tl.where(normal, _both_halves(-lifted, DT), 0)  # S, both halves
        keep = tl.where(normal, 0xC000C000, 0).to(tl.uint32)  # M: the bits u may flip
    else:
        half = (scale * 0.5).to(DT).to(tl.float32)  # rounded once: ±2 x half is then exact
        mult = _both_halves(half, DT)
    src = _src(w_ptr, n, c, N, ROWS, stride_wn)  # [BLOCK_N, BLOCK_W]
    e = tl.arange(0, 2 * BLOCK_W)[None, :]  # 2 wc + h
    dst = out_ptr.to(tl.pointer_type(tl.uint32)) + n * stride_on + (e // 16 * 64 + e % 16)  # [BLOCK_N, 2 BLOCK_W]
    for _ in tl.range(0, KW, BLOCK_W, loop_unroll_factor=UNROLL):
        y = _lanes_01_23(tl.load(src), INTERPRET)  # ROWS == N: rows past N wrapped
        for p in tl.static_range(4):
            if DT == tl.bfloat16:
                lanes01 = flip ^ ((y << (6 - 2 * p)) & keep)  # [BLOCK_N, BLOCK_W]
                lanes23 = flip ^ ((y << (14 - 2 * p)) & keep)
            else:
                lanes01 = _fp16_pairs(~(y << (6 - 2 * p)) & 0xC000C000, mult, half, INTERPRET)
                lanes23 = _fp16_pairs(~(y << (14 - 2 * p)) & 0xC000C000, mult, half, INTERPRET)
            pairs = tl.reshape(tl.join(lanes01, lanes23), (BLOCK_N, 2 * BLOCK_W))  # column 2 wc + h
            if EVEN:
                tl.store(dst + 16 * p, pairs)
            else:
                tl.store(dst + 16 * p, pairs, mask=mask)
        src += BLOCK_W
        dst += 8 * BLOCK_W


@triton.jit
def decode_float_kernel(w_ptr, scale_ptr, out_ptr, N, ROWS, KQ, stride_wn, stride_on, HAS_SCALE: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_KQ: tl.constexpr):
    """w: [N, KQ] uint8 -> out: [ROWS, 4 KQ] float, ``(u - 1) * scale[n]`` (scale 1 without HAS_SCALE).

    Grid (cdiv(ROWS, BLOCK_N), cdiv(KQ, BLOCK_KQ)); BLOCK_KQ a multiple of 32.
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.program_id(1) * BLOCK_KQ + tl.arange(0, BLOCK_KQ)
    mask_c = (offs_c < KQ)[None, :]
    wb = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_c[None, :],
                 mask=(offs_n < N)[:, None] & mask_c, other=ZERO_BYTE)  # [BLOCK_N, BLOCK_KQ] uint8
    out = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + (offs_c // 32 * 128 + offs_c % 32)[None, :]
    mask = (offs_n < ROWS)[:, None] & mask_c
    if HAS_SCALE:
        s = tl.load(scale_ptr + offs_n, mask=offs_n < N, other=0.0)[:, None]  # [BLOCK_N, 1] fp32
    for p in tl.static_range(4):
        w = ((wb >> (2 * p)) & 3).to(tl.float32)  # u in {0, 1, 2}
        w = w * s - s if HAS_SCALE else w - 1.0
        tl.store(out + 32 * p, w.to(out_ptr.dtype.element_ty), mask=mask)


def lift(dtype: torch.dtype) -> float:
    """The factor ``decode`` writes ``dtype``'s weights with: 2^64 for bf16, 1 otherwise (undo it with
    the GEMM's ``alpha = 1 / lift``: a power of two, exact)."""
    return LIFT.value if dtype == torch.bfloat16 else 1.0


def _fit(meta: dict, kw: int) -> dict:
    """``meta`` with BLOCK_W halved until it divides the row's word count (a multiple of 8)."""
    bw = meta["BLOCK_W"]
    while kw % bw:
        bw //= 2
    return {**meta, "BLOCK_W": bw}


def decode(packed: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None,
           rows: int | None = None) -> torch.Tensor:
    """Dense weight [rows, Kp] in ``dtype`` from packed [N, Kp/4] uint8 (rows >= N, default N).

    uint8: the raw fields ``u = codes + 1`` in {0, 1, 2} (1 past K; rows past N repeat rows ``n % N``).
    float8_e4m3fn: ``2 * codes`` (-0 past K; rows past N as for uint8).
    float dtypes: ``(u - 1) * scale * lift(dtype)`` (scale: [N] fp32, optional), the same numbers as
    ``(codes * scale)`` in fp32 rounded once to ``dtype``, times ``lift(dtype)``; columns past K are
    zero weights. fp16/fp32 zeros are ±0; bf16 zeros are ±(lifted scale) x 2^-128 or smaller, and
    rows with ``|scale| < 2^-63`` are all +0 (module docstring). Allocated with ``torch.empty`` on
    every call (see docs/KERNELS.md, "Scratch").
    """
    n, kq = packed.shape
    rows = n if rows is None else rows
    if packed.dtype != torch.uint8 or packed.stride(1) != 1 or kq % 32 or rows < n:
        raise ValueError(f"packed must be a row-major [N, Kp/4] uint8 tensor with Kp/4 % 32 == 0 and rows >= N, "
                         f"got {tuple(packed.shape)} {packed.dtype}, rows={rows}")
    out = torch.empty(rows, 4 * kq, dtype=dtype, device=packed.device)  # [rows, Kp]
    if rows == 0 or kq == 0:
        return out
    if scale is not None and dtype not in BYTE_DTYPES and (
            scale.shape != (n,) or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError("scale must be a contiguous [N] float32 tensor")
    if dtype == torch.float32:
        meta = FLOAT_META
        grid = (triton.cdiv(rows, meta["BLOCK_N"]), triton.cdiv(kq, meta["BLOCK_KQ"]))
        launch_fixed(decode_float_kernel, grid, meta, packed, scale, out, n, rows, kq, packed.stride(0), out.stride(0),
                     HAS_SCALE=scale is not None)
        return out
    if packed.stride(0) % 4 or packed.data_ptr() % 4:
        raise ValueError("the decode reads 32-bit words: packed rows must be 4-byte aligned")
    kw = kq // 4  # words a row, a multiple of 8
    if dtype in BYTE_DTYPES:
        if scale is not None:
            raise ValueError(f"the {dtype} decode yields unscaled codes; apply the scale in the GEMM's epilogue")
        out = out.view(torch.uint8)  # the kernel writes bytes; fp8 is a view of them
        meta = _fit(FIELDS_META, kw)
        grid = (triton.cdiv(rows, meta["BLOCK_N"]),)
        launch_fixed(decode_fields_kernel, grid, meta, packed, out, n, rows, kw, packed.stride(0) // 4,
                     out.stride(0) // 4, FP8=dtype == torch.float8_e4m3fn, EVEN=rows % meta["BLOCK_N"] == 0)
        return out.view(dtype)
    if dtype not in (torch.bfloat16, torch.float16) or rows != n:
        raise ValueError(f"decode: unsupported dtype {dtype} (or rows != N, which only uint8 and float8 take)")
    meta = _fit(HALF_META, kw)
    grid = (triton.cdiv(rows, meta["BLOCK_N"]),)
    launch_fixed(decode_half_kernel, grid, meta, packed, scale, out, n, rows, kw, packed.stride(0) // 4,
                 out.stride(0) // 2, HAS_SCALE=scale is not None, INTERPRET=interpreting(), EVEN=rows % meta["BLOCK_N"] == 0)
    return out
