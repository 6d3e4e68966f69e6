"""Decode the 2-bit packed weight into a dense [rows, Kp] scratch matrix (large-M path, large_m.py).

A bandwidth-bound elementwise kernel: it reads 2 bits and writes 8 (int8) or 16 (bf16/fp16) per
weight, so its instruction budget per weight is several times that of a kernel that only reads
2 bits. Two variants, picked by the output dtype:

- **int8 codes** (W2A8): works on 32-bit words. A word of packed row n at word column ``wc``
  holds the four bytes of lanes ``4 (wc % 8) .. + 3`` of group ``wc // 8``; for plane p,
  ``((w >> 2p) & 0x03030303) + 0x7F7F7F7F`` puts ``u + 127`` in each byte (no carry: u <= 2)
  and ``^ 0x80808080`` turns it into ``u - 1`` as int8: four weights per shift, and, add, xor.
  The word lands at word column ``32 (wc // 8) + 8 p + wc % 8`` of the output.
- **float** (W2A16: bf16/fp16/fp32): per byte and plane ``(u - 1) * scale[n]`` in fp32, rounded
  once to the output dtype. With ``scale`` folded in, a plain ``x @ W^T`` (cuBLAS, with the bias
  in its epilogue) finishes the linear, no extra pass over the output.

Rows past N (``rows`` > N, e.g. padding N to a multiple of 8 for ``torch._int_mm``) and the K
padding decode to 0.
"""

import torch
import triton
import triton.language as tl

from .common import launch_fixed

ZERO_BYTE = tl.constexpr(0x55)  # four fields of u = 1: four zero weights
ZERO_WORD = tl.constexpr(0x55555555)
INT8_META = {"BLOCK_N": 32, "BLOCK_W": 32, "num_warps": 4}  # 32 rows x 128 bytes of packed weight a program
FLOAT_META = {"BLOCK_N": 32, "BLOCK_KQ": 128, "num_warps": 4}


@triton.jit
def decode_int8_kernel(w_ptr, out_ptr, N, ROWS, KW, stride_wn, stride_on,
                       BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """w: [N, 4 KW] uint8 read as [N, KW] uint32 -> out: [ROWS, 16 KW] int8 written as uint32 words.

    Strides are in 32-bit words. Grid (cdiv(ROWS, BLOCK_N), cdiv(KW, BLOCK_W)).
    """
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    words = tl.load(w_ptr.to(tl.pointer_type(tl.uint32)) + offs_n[:, None].to(tl.int64) * stride_wn + offs_w[None, :],
                    mask=(offs_n < N)[:, None] & (offs_w < KW)[None, :], other=ZERO_WORD)  # [BLOCK_N, BLOCK_W]
    out = (out_ptr.to(tl.pointer_type(tl.uint32)) + offs_n[:, None].to(tl.int64) * stride_on
           + (offs_w // 8 * 32 + offs_w % 8)[None, :])
    mask = (offs_n < ROWS)[:, None] & (offs_w < KW)[None, :]
    for p in tl.static_range(4):
        codes = (((words >> (2 * p)) & 0x03030303) + 0x7F7F7F7F) ^ 0x80808080  # four int8 u - 1
        tl.store(out + 8 * p, codes, mask=mask)


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


def decode(packed: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None,
           rows: int | None = None) -> torch.Tensor:
    """Dense weight [rows, Kp] in ``dtype`` from packed [N, Kp/4] uint8 (rows >= N, default N).

    int8: the codes ``u - 1``. float dtypes: ``(u - 1) * scale`` (scale: [N] fp32, optional),
    computed in fp32 and rounded once. Rows past N and columns past K are zeros. Allocated with
    ``torch.empty`` on every call (see docs/KERNELS.md, "Scratch").
    """
    n, kq = packed.shape
    rows = n if rows is None else rows
    if packed.dtype != torch.uint8 or packed.stride(1) != 1 or kq % 32 or rows < n:
        raise ValueError(f"packed must be a row-major [N, Kp/4] uint8 tensor with Kp/4 % 32 == 0 and rows >= N, "
                         f"got {tuple(packed.shape)} {packed.dtype}, rows={rows}")
    out = torch.empty(rows, 4 * kq, dtype=dtype, device=packed.device)  # [rows, Kp]
    if rows == 0 or kq == 0:
        return out
    if dtype == torch.int8:
        if scale is not None:
            raise ValueError("int8 decode yields the codes; apply the scale in the GEMM's epilogue")
        if packed.stride(0) % 4 or packed.data_ptr() % 4:
            raise ValueError("int8 decode reads 32-bit words: packed rows must be 4-byte aligned")
        meta = INT8_META
        grid = (triton.cdiv(rows, meta["BLOCK_N"]), triton.cdiv(kq // 4, meta["BLOCK_W"]))
        launch_fixed(decode_int8_kernel, grid, meta, packed, out, n, rows, kq // 4, packed.stride(0) // 4, out.stride(0) // 4)
        return out
    if scale is not None and (scale.shape != (n,) or scale.dtype != torch.float32 or not scale.is_contiguous()):
        raise ValueError("scale must be a contiguous [N] float32 tensor")
    meta = FLOAT_META
    grid = (triton.cdiv(rows, meta["BLOCK_N"]), triton.cdiv(kq, meta["BLOCK_KQ"]))
    launch_fixed(decode_float_kernel, grid, meta, packed, scale, out, n, rows, kq, packed.stride(0), out.stride(0),
                 HAS_SCALE=scale is not None)
    return out
