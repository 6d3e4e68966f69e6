"""The optional rotation in front of the ternary codes (``quantization.rotation``; "none", the default).

With "hadamard" each quantized linear's codes and scales quantize ``W R`` instead of ``W`` and the
layer computes ``(x R) (s q)^T``: R [K, K] is the randomized Hadamard transform of
``bitflux_kernels.hadamard`` (random signs [K], then Sylvester blocks), one per input width K, so every
linear that reads the same width (fused Q/K/V included) shares it. A rotation spreads each code's
error over every input direction; on the miniature world it keeps more of the FP score across training
seeds (README). The signs come from a fixed seed per width and are stored in the file beside each
linear's codes (``<m>.rotation``, format version 3), so a reader never has to reproduce a generator.

A linear with a low-rank residual keeps it in the rotated basis too: ``W R ≈ s q + up @ down``.
Methods see the rotated weight and the rotated inputs' second moments: with the input channels taken
as uncorrelated (as act-aware does), ``E[(x R)_j^2] = sum_i R_ij^2 d_i``, the mean of d over j's block.
"""

import torch

import bitflux_kernels as bk

KINDS = ("none", "hadamard")
SEED = 0x5EED  # the sign vector of width K is drawn from a generator seeded with SEED + K


def signs(k: int) -> torch.Tensor:
    """The random signs [K] int8 in {-1, +1} of the rotation of width ``k``."""
    gen = torch.Generator().manual_seed(SEED + k)
    return (torch.randint(2, (k,), generator=gen) * 2 - 1).to(torch.int8)


def rotation_signs(kind: str, k: int) -> torch.Tensor | None:
    """``signs(k)`` when ``kind`` rotates ("hadamard"), None for "none"."""
    return None if kind == "none" else signs(k)


def rotated_weight(weight: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """``W R`` [N, K] fp32 (each row rotated as an input is), or W itself without a rotation."""
    w = weight.detach().float()
    return w if rotation is None else bk.rotate_torch(w, rotation.to(w.device))


def rotated_moment(d: torch.Tensor, rotation: torch.Tensor | None) -> torch.Tensor:
    """Second moments [K] of the rotated inputs ``x R`` from those of x, d [K] (module docstring)."""
    if rotation is None:
        return d
    b = bk.block_size(d.shape[0])
    return d.float().reshape(-1, b).mean(1).repeat_interleave(b)


def rotated_inputs(kind: str, linear, d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [N, K] fp32, input second moments [K] or None) of ``linear`` in the basis its codes quantize:
    ``W R`` and the rotated inputs' moments for ``kind`` "hadamard", W and d for "none"."""
    rotation = rotation_signs(kind, linear.in_features)
    return rotated_weight(linear.weight, rotation), None if d is None else rotated_moment(d, rotation)
