"""The randomized Hadamard rotation ``x R`` as one Triton kernel: x read once, ``x R`` written once.

A program takes ROWS tokens and one Hadamard block of b = A * C columns (``hadamard.factors``): it loads
the [ROWS, b] tile and the block's signs, views each token's b values as an [A, C] matrix X and computes
``H_A X H_C / sqrt(b)`` with two tensor-core dots (``X @ H_C``, then a transpose, ``@ H_A``, and back;
H symmetric). The factors are Sylvester's ±1 matrices, exact in bf16 and fp16; the products accumulate
in fp32, the middle result is rounded once to x's dtype for the second dot (as the torch path rounds
it), and 1/sqrt(b) is applied in fp32 before the single rounding of the output. Triton's dot needs
every dimension >= 16, so blocks narrower than 256 (A or C < 16: none of FLUX's, whose blocks are 1024
and 4096) take the torch path (``hadamard.rotate_torch``).
"""

import torch
import triton
import triton.language as tl

from .common import check_device, interpreting, launch_fixed
from .hadamard import factor, factors

MIN_FACTOR = 16  # tl.dot's smallest dimension
_TL = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def hadamard_kernel(x_ptr, s_ptr, ha_ptr, hc_ptr, y_ptr, M, stride_xm, stride_ym, norm,
                    A: tl.constexpr, C: tl.constexpr, ROWS: tl.constexpr, DOT: tl.constexpr, PRECISION: tl.constexpr):
    """x: [M, K] (unit stride along K), signs s: [K] int8, H_A: [A, A], H_C: [C, C] ±1 in x's dtype
    -> y = x R: [M, K]. Program (i, j): rows i * ROWS.., block j (columns j * A * C..). DOT: the dot
    operands' type (x's, or fp32 under the interpreter, which multiplies the raw bits of bf16 operands)."""
    offs_m = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs_b = tl.program_id(1) * (A * C) + tl.arange(0, A * C)
    mask = (offs_m < M)[:, None]
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_b[None, :], mask=mask, other=0.0)  # [ROWS, A C]
    signs = tl.load(s_ptr + offs_b).to(tl.float32)  # int8 -> fp32 -> x's dtype: the interpreter mis-casts int8 -> bf16
    x = (x.to(tl.float32) * signs[None, :]).to(x_ptr.dtype.element_ty)  # exact: signs are ±1
    h_c = tl.load(hc_ptr + tl.arange(0, C)[:, None] * C + tl.arange(0, C)[None, :]).to(DOT)  # [C, C]
    h_a = tl.load(ha_ptr + tl.arange(0, A)[:, None] * A + tl.arange(0, A)[None, :]).to(DOT)  # [A, A]
    z = tl.dot(tl.reshape(x.to(DOT), (ROWS * A, C)), h_c, input_precision=PRECISION)  # X H_C: [ROWS A, C] fp32
    z = z.to(x_ptr.dtype.element_ty).to(DOT)  # rounded once to x's dtype, as the torch path rounds it
    z = tl.permute(tl.reshape(z, (ROWS, A, C)), (0, 2, 1))  # (X H_C)^T per token: [ROWS, C, A]
    y = tl.dot(tl.reshape(z, (ROWS * C, A)), h_a, input_precision=PRECISION)  # (H_A X H_C)^T: [ROWS C, A] fp32
    y = tl.reshape(tl.permute(tl.reshape(y * norm, (ROWS, C, A)), (0, 2, 1)), (ROWS, A * C))  # [ROWS, A C]
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_b[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def fits(k: int) -> bool:
    """Whether width ``k`` runs in the kernel: both Kronecker factors at least ``MIN_FACTOR`` wide."""
    return min(factors(k)) >= MIN_FACTOR


def hadamard_triton(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x R``: x [..., K] bf16/fp16/fp32 on CUDA (or under TRITON_INTERPRET=1), signs [K] int8, K with
    ``fits(K)`` -> [..., K] in x's dtype."""
    k = x.shape[-1]
    if not fits(k):
        raise ValueError(f"hadamard_triton: width {k} has a Hadamard block below {MIN_FACTOR ** 2}; use rotate_torch")
    check_device(x, signs)
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y = torch.empty_like(x2)  # [M, K]
    m, (a, c) = x2.shape[0], factors(k)
    if m == 0:
        return y.view(x.shape)
    rows = 1 if interpreting() or a * c > 1024 else 4  # a [ROWS, b] tile of at most 4096 values a program
    grid = (triton.cdiv(m, rows), k // (a * c))
    launch_fixed(hadamard_kernel, grid, {"ROWS": rows, "num_warps": 4}, x2, signs.to(torch.int8).contiguous(),
                 factor(a, x2, unit=True), factor(c, x2, unit=True), y, m, x2.stride(0), y.stride(0), (a * c) ** -0.5,
                 A=a, C=c, DOT=tl.float32 if interpreting() or x2.dtype == torch.float32 else _TL[x2.dtype],
                 PRECISION="ieee" if x2.dtype == torch.float32 else "tf32")  # fp32 x: exact ±1 products
    return y.view(x.shape)
