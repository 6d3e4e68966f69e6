"""Ternary linears trained through a straight-through estimator, shared by block-recon and distill."""

import torch
from torch import nn

from ..ternary import _set_submodule
from .act_aware import threshold_codes


class STELinear(nn.Module):
    """Forward with the ternary weight ``scale * codes(w)``, gradients straight through to the latent ``w``.

    weight: latent [N, K] fp32; log_scale: [N] (scales trained in log space, so one learning rate
    suits every layer); threshold: [N] buffer, the per-row threshold that makes the codes.
    """

    def __init__(self, linear: nn.Linear, threshold: torch.Tensor, scale: torch.Tensor, train_weight: bool = True):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().float().clone(), requires_grad=train_weight)
        self.log_scale = nn.Parameter(scale.detach().float().log().clone())
        self.register_buffer("threshold", threshold.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def ternary_weight(self) -> torch.Tensor:  # [N, K]: value s*q, gradient identity to w, q to s
        w = self.weight
        q = threshold_codes(w.detach(), self.threshold)
        return self.log_scale.exp()[:, None] * q + (w - w.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        return nn.functional.linear(x, self.ternary_weight().to(x.dtype), self.bias)

    def export(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [N, K] int8, scale [N] fp32) of the current latent weight."""
        codes = threshold_codes(self.weight.detach(), self.threshold).to(torch.int8)
        return codes, self.log_scale.detach().exp().float()


def attach_ste(model: nn.Module, init: dict[str, tuple[torch.Tensor, torch.Tensor]], train_weight: bool = True) -> dict[str, STELinear]:
    """Replace the named linears of ``model`` in place by ``STELinear`` from {name: (threshold [N], scale [N])}."""
    out = {}
    for name, (threshold, scale) in init.items():
        out[name] = STELinear(model.get_submodule(name), threshold, scale, train_weight).to(model.get_submodule(name).weight.device)
        _set_submodule(model, name, out[name])
    return out


def optimizer(modules: dict[str, STELinear], weight_lr: float, scale_lr: float) -> torch.optim.Adam:
    """Adam over the scales and, when ``weight_lr`` > 0, the latent weights."""
    groups = [{"params": [m.log_scale for m in modules.values()], "lr": scale_lr}]
    if weight_lr > 0:
        groups.append({"params": [m.weight for m in modules.values()], "lr": weight_lr})
    return torch.optim.Adam(groups)


def absmean_init(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold [N] and scale [N] that reproduce absmean's codes: t = mean|w| / 2, s = mean|w|."""
    mean_abs = weight.detach().float().abs().mean(1).clamp_min(1e-8)
    return mean_abs / 2, mean_abs
