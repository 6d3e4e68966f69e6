"""GPTQ on the ternary grid: codes chosen column by column, each column's rounding error fed forward
onto the columns not yet rounded through the inverse of the inputs' Gram matrix H = E[x x^T].

Used by block-recon as its start: the per-row scales come from act-aware, the codes from here, and
the latent weights handed to the straight-through estimator are GPTQ's error-compensated weights,
which the threshold ``scale / 2`` rounds to exactly those codes.
"""

import torch
from torch import nn

from ..streaming import run_block


@torch.no_grad()
def input_grams(block: nn.Module, linears: dict[str, nn.Linear], state: dict, batch: int, device) -> dict[str, torch.Tensor]:
    """{linear: E[x x^T] [K, K] fp64} of each linear's inputs when ``block`` runs on every call of ``state``."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def record(_m, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [rows, K]
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return record

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears.items()]
    try:
        n = state["hidden_states"].shape[0]
        for i in range(0, n, batch):
            run_block(block, state, slice(i, i + batch), device)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[name] / rows[name] for name in linears}


@torch.no_grad()
def ternary_gptq(weight: torch.Tensor, gram: torch.Tensor, scale: torch.Tensor, damp: float = 0.01,
                 block: int = 128) -> torch.Tensor:
    """Error-compensated weights [N, K] whose nearest point of {-s, 0, s} per row is GPTQ's ternary choice.

    weight [N, K], gram [K, K] (E[x x^T]), scale [N]: rounding is to the nearest of {-s, 0, +s}.
    """
    w = weight.detach().double().clone()  # [N, K]
    h = gram.double().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    torch.diagonal(h).add_(damp * torch.diagonal(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # [K, K] upper
    s = scale.double()[:, None]  # [N, 1]
    k = w.shape[1]
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        wb, err = w[:, i0:i1].clone(), torch.zeros_like(w[:, i0:i1])
        for j in range(i1 - i0):
            col = wb[:, j:j + 1].clone()  # [N, 1]: compensated, not yet rounded
            q = torch.clamp(torch.round(col / s), -1, 1) * s
            e = (col - q) / hinv[i0 + j, i0 + j]
            wb[:, j:] -= e @ hinv[i0 + j:i0 + j + 1, i0 + j:i1]
            err[:, j:j + 1] = e
            w[:, i0 + j] = col[:, 0]
        w[:, i1:] -= err @ hinv[i0:i1, i1:]
    return w.float()
