"""Activation-aware ternarization: per row, the threshold and scale that minimise the output error.

For a row w [K] and input second moments d = E[x^2] [K] (from calibration), the expected squared
output error of the ternary row s*q, with the input channels taken as uncorrelated, is
``sum_k d_k (w_k - s q_k)^2``. For a threshold t, q = sign(w) [|w| > t] and the best scale is
``s = sum(d w q) / sum(d q^2)``, leaving the error ``sum(d w^2) - s sum(d w q)``. The threshold is
searched over t = alpha * mean|w| on a grid of alphas that includes absmean's 0.5, so the result is
never worse than absmean under this error.
"""

import torch

from ..config import Config
from ..rotation import rotated_inputs
from ..ternary import block_linears


def threshold_codes(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Ternary codes of weight [N, K] for a per-row threshold [N]: sign(w) * [|w| > t], float [N, K]."""
    return torch.sign(weight) * (weight.abs() > threshold[:, None])


def weighted_error(weight: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum_k d_k (w_k - s q_k)^2 per row: weight, codes [N, K], scale [N], d [K] -> [N]."""
    return (d * (weight.float() - scale[:, None] * codes.float()) ** 2).sum(1)


def search(weight: torch.Tensor, d: torch.Tensor, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row threshold [N] and scale [N] minimising ``weighted_error`` over t = alpha * mean|w|."""
    # rows are independent: chunks bound the temporaries. Power-of-two chunks keep FLUX's shapes' bits (CPU
    # gemv rounds chunks of 1365 rows, or an odd N's, in the last bit otherwise); the mini model is one chunk
    rows = 1 << max(4, (_CHUNK // weight.shape[1]).bit_length() - 1)
    d = d.float().to(weight.device)  # [K], once for every chunk
    found = [_search_rows(chunk, d, alphas) for chunk in weight.detach().split(rows)]
    return torch.cat([t for t, _ in found]), torch.cat([s for _, s in found])


_CHUNK = 1 << 22  # elements of an [rows, K] float temporary: 16 MB, reused from the heap instead of page-faulted


def _search_rows(weight: torch.Tensor, d: torch.Tensor, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    a = weight.float().abs()  # [N, K]; d: [K] float on its device
    dw = d * a  # [N, K]; w q = |w| where q != 0
    mean_abs = a.mean(1)  # [N]
    total = (dw * a).sum(1)  # [N]
    best_err = torch.full_like(total, float("inf"))
    best_t, best_s = torch.zeros_like(total), torch.zeros_like(total)
    for alpha in alphas:
        t = alpha * mean_abs  # [N]
        kept = (a > t[:, None]).to(a.dtype)  # [N, K]: |q| = q^2
        num, den = torch.linalg.vecdot(kept, dw), kept @ d  # [N]: sum d w q, sum d q^2
        s = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
        err = total - s * num
        better = err < best_err
        best_err, best_t, best_s = torch.where(better, err, best_err), torch.where(better, t, best_t), torch.where(better, s, best_s)
    return best_t, best_s.clamp_min(1e-8)


def alphas(cfg: Config) -> list[float]:
    """The threshold grid of ``quantization.act_aware``, absmean's 0.5 first (it wins ties)."""
    a = cfg.quantization.act_aware
    return [0.5] + torch.linspace(0, a.max_alpha, a.thresholds).tolist()


def act_aware(cfg: Config, transformer, calib):
    """Threshold and scale per output channel of a block's linears, from the calibration's input second
    moments (of ``W R`` and the rotated inputs' moments with ``quantization.rotation``)."""
    def quantize_block(name: str, block) -> dict:
        out = {}
        for sub, lin in block_linears(block):
            weight, d = rotated_inputs(cfg.quantization.rotation, lin, calib.second_moment(f"{name}.{sub}"))
            t, s = search(weight, d, alphas(cfg))
            out[sub] = (threshold_codes(weight, t).to(torch.int8), s)
        return out
    return quantize_block
