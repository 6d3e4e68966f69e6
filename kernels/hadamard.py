"""The randomized Hadamard rotation in front of a rotated ternary linear: ``torch.ops.bitflux.hadamard``.

A file quantized with ``quantization.rotation: hadamard`` holds the codes of ``W R``, and its layers
compute ``(x R) (s q)^T``. R [K, K] = diag(signs) @ blockdiag(H_b / sqrt(b), ...): signs [K] in
{-1, +1}, b the largest power of two dividing K (FLUX.1-dev: 3072 = 3 x 1024, 12288 = 3 x 4096,
15360 = 15 x 1024), H_b Sylvester's Hadamard matrix. R is orthogonal and H_b symmetric, so
``w R^T = blocks(w) * signs`` undoes it (``unrotate``).

Backends: "reference" forms the blocks' product in float64; "torch" runs ``hadamard_blocks`` in x's
dtype, with H_b = H_a (x) H_c (a * c = b, a <= c) as two small batched matmuls,
``H_a @ x[..., K/b, a, c] @ H_c``: 2 (a + c) multiply-adds an element (128 at b = 1024) instead of 2 b,
in three passes over x (signs, then each product). "triton" runs the same two products in one kernel
(``hadamard_triton.py``: x read once, x R written once) on CUDA or under TRITON_INTERPRET=1, for widths
whose Hadamard block is at least 256 (FLUX's all are); narrower ones, and CPU tensors, take the torch
path. The op is opaque to ``torch.compile`` (its fake impl keeps the shape).
"""

import math

import torch

if __name__ != "bitflux_kernels.hadamard":  # a second registration would leave the first one's op handle dangling
    raise ImportError(f"bitflux's Hadamard op imported as {__name__!r}: import it as bitflux_kernels.hadamard")

_FACTORS: dict[tuple[int, torch.device, torch.dtype, bool], torch.Tensor] = {}  # H / sqrt(size), or H (±1)


def block_size(k: int) -> int:
    """The Hadamard block of width ``k``: the largest power of two dividing it."""
    return k & -k


def factors(k: int) -> tuple[int, int]:
    """(a, c), a <= c, powers of two with a * c = ``block_size(k)``: the Kronecker factors ``hadamard_blocks``
    multiplies by (32 x 32 at b = 1024)."""
    b = block_size(k)
    a = 1 << (b.bit_length() - 1) // 2
    return a, b // a


def sylvester(size: int, dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> torch.Tensor:
    """H_size / sqrt(size) [size, size]: Sylvester's Hadamard matrix (size a power of two), orthonormal."""
    idx = torch.arange(size)
    bits = idx[:, None] & idx[None, :]  # H[i, j] = (-1)^popcount(i & j)
    parity = torch.zeros_like(bits)
    for shift in range(max(1, size.bit_length())):
        parity ^= (bits >> shift) & 1
    return ((1 - 2 * parity).to(torch.float64) / math.sqrt(size)).to(device=device, dtype=dtype)


def _interpreting() -> bool:
    from .common import interpreting  # imports triton: only when the triton backend is asked for

    return interpreting()


def factor(size: int, like: torch.Tensor, unit: bool = False) -> torch.Tensor:
    """H_size / sqrt(size) [size, size] (``unit``: H_size itself, ±1, exact in any float dtype) on
    ``like``'s device and dtype, made once per (size, device, dtype)."""
    key = (size, like.device, like.dtype, unit)
    if key not in _FACTORS:
        h = sylvester(size)  # float64, orthonormal
        _FACTORS[key] = ((h * math.sqrt(size)).round() if unit else h).to(device=like.device, dtype=like.dtype)
    return _FACTORS[key]


def hadamard_blocks(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x @ blockdiag(H_b / sqrt(b), ...) [..., K] in x's dtype (b = ``block_size(K)``)."""
    shape, (a, c) = x.shape, factors(x.shape[-1])
    y = x.reshape(-1, shape[-1] // (a * c), a, c)  # [M, K/b, a, c]
    h_a, h_c = factor(a, x), factor(c, x)
    del x  # a caller's temporary (rotate_torch's x * signs) is freed after the first product: x + 2 copies at peak
    y = h_a @ y  # H_a is symmetric: rows and columns alike
    return (y @ h_c).reshape(shape)


def rotate_reference(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x R`` in float64 with the dense blocks (the ground truth), returned in x's dtype."""
    k = x.shape[-1]
    b = block_size(k)
    h = sylvester(b, device=x.device)
    y = (x.double() * signs.double()).reshape(-1, k // b, b) @ h  # [M, K/b, b]
    return y.reshape(x.shape).to(x.dtype)


def rotate_torch(x: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``x R`` in x's dtype: the signs, then ``hadamard_blocks``."""
    return hadamard_blocks(x * signs.to(x.dtype))


def unrotate(w: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """``w R^T`` [..., K]: the rows of a rotated weight back in the layer's own input basis."""
    return hadamard_blocks(w) * signs.to(w.dtype)


@torch.library.custom_op("bitflux::hadamard", mutates_args=())
def hadamard(x: torch.Tensor, signs: torch.Tensor, backend: str = "triton") -> torch.Tensor:
    """``x R``: x [..., K] float, signs [K] int8 in {-1, +1} -> [..., K] in x's dtype."""
    if backend == "reference":
        return rotate_reference(x, signs)
    if backend == "triton" and (x.is_cuda or _interpreting()):
        from .hadamard_triton import fits, hadamard_triton  # Triton decides compile or interpret at definition

        if fits(x.shape[-1]):
            return hadamard_triton(x, signs)
    if backend in ("torch", "triton"):
        return rotate_torch(x, signs)
    raise ValueError(f"unknown bitflux backend {backend!r} (reference, torch or triton)")


@hadamard.register_fake
def _fake(x, signs, backend="triton"):
    return torch.empty_like(x)
