"""The optional low-rank residual of a ternary linear (``quantization.residual_rank``; 0, the default: none).

A ternary weight ``s[:, None] * Q`` [N, K] leaves the error ``E = W - s[:, None] * Q``. With input
second moments ``d = E[x^2]`` [K] from calibration, the expected squared output error of a correction
R (input channels taken as uncorrelated, as act-aware does) is ``sum_nk d_k (E - R)_nk^2``
``= ||(E - R) D^1/2||_F^2``; its best rank-r R is ``(E D^1/2)_r D^-1/2`` (Eckart-Young on the weighted
matrix). Without calibration d = 1: the plain truncated SVD. With ``E D^1/2 = U S V^T``, R is stored
as ``up = U_r S_r^1/2`` [N, r] and ``down = S_r^1/2 V_r^T D^-1/2`` [r, K], both bf16 (S split evenly
keeps the two factors in one range); ``TernaryLinear`` adds ``(x @ down^T) @ up^T`` to its output.
"""

import torch
from torch import nn

from .errors import UsageError
from .rotation import rotated_inputs
from .ternary import block_linears, scoped_linears

DTYPE = torch.bfloat16


def low_rank_residual(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, rank: int,
                      d: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(up [N, r], down [r, K]) bf16: the rank-``rank`` correction of ``scale * codes`` towards ``weight``
    [N, K] that minimises the d-weighted error (module docstring); d [K] or None (unweighted)."""
    w = weight.detach().float()
    error = w - scale.to(w)[:, None] * codes.to(w)  # [N, K]
    if d is None or not bool(d.max() > 0):
        d = torch.ones(w.shape[1], device=w.device)
    root = d.float().to(w.device).clamp_min(1e-8 * float(d.max())).sqrt()  # [K]; a dead channel gets a floor
    u, s, vh = torch.linalg.svd(error * root, full_matrices=False)  # [N, m], [m], [m, K]
    half = s[:rank].sqrt()
    return (u[:, :rank] * half).to(DTYPE), (half[:, None] * vh[:rank] / root).to(DTYPE)


def block_residuals(name: str, block: nn.Module, codes: dict, rank: int, calib=None, rotation: str = "none") -> dict:
    """{linear inside ``block`` (named ``name``): (up, down)} for its codes {linear: (codes, scale)},
    weighted by ``calib``'s second moments when there is a calibration; {} when ``rank`` is 0. With a
    ``rotation`` ("hadamard") the codes are those of ``W R`` and the residual corrects them in that basis."""
    if rank == 0:
        return {}
    out = {}
    for sub, lin in block_linears(block):
        weight, d = rotated_inputs(rotation, lin, None if calib is None else calib.second_moment(f"{name}.{sub}"))
        out[sub] = low_rank_residual(weight, *codes[sub], rank, d)
    return out


def check_rank(model: nn.Module, rank: int) -> None:
    """Refuse a rank above some in-scope linear's min(N, K) (works on the meta device)."""
    smallest = min((min(m.weight.shape), n) for n, m in scoped_linears(model))
    if rank > smallest[0]:
        raise UsageError(f"quantization.residual_rank={rank} exceeds min(N, K) = {smallest[0]} of {smallest[1]}: "
                         f"use a rank <= {smallest[0]}")
