"""Ternary linears trained through a straight-through estimator, shared by block-recon and distill."""

from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

import bitflux_kernels as bk

from ..errors import ArtifactError
from ..rotation import rotated_weight, rotation_signs
from ..tensorfile import read_state, write_state
from ..ternary import _set_submodule
from .act_aware import threshold_codes

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only


class STELinear(nn.Module):
    """Forward with the ternary weight ``scale * codes(w)``, gradients straight through to the latent ``w``.

    weight: latent [N, K] fp32; log_scale: [N] (scales trained in log space, so one learning rate
    suits every layer); threshold: [N] buffer, the per-row threshold that makes the codes.
    With ``residual`` (up [N, r], down [r, K]): the trainable low-rank residual ``residual_up``,
    ``residual_down`` (fp32, used rounded to bf16 as they are exported), added as ``TernaryLinear`` adds it.
    With ``rotation`` (signs [K] int8, ``quantization.rotation``) the latent weight starts as ``W R`` and the
    forward rotates its input first, as ``TernaryLinear`` does: codes, scales and residual live in that basis.
    ``adaround.AdaRound`` gives it soft codes instead while it learns each weight's rounding.
    """

    def __init__(self, linear: nn.Linear, threshold: torch.Tensor, scale: torch.Tensor, train_weight: bool = True,
                 residual: tuple[torch.Tensor, torch.Tensor] | None = None, rotation: torch.Tensor | None = None):
        super().__init__()
        weight = rotated_weight(linear.weight, rotation)  # [N, K] fp32
        self.weight = nn.Parameter(weight.clone(), requires_grad=train_weight)
        self.log_scale = nn.Parameter(scale.detach().float().log().clone())
        self.register_buffer("threshold", threshold.detach().float().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("rotation", None if rotation is None else rotation.to(weight.device))  # [K] int8
        up, down = (None, None) if residual is None else (nn.Parameter(t.detach().float().clone()) for t in residual)
        self.register_parameter("residual_up", up)  # [N, r]
        self.register_parameter("residual_down", down)  # [r, K]
        self.codes = None  # [N, K] soft codes that ``adaround.AdaRound`` sets for each step while it learns them

    def fix_codes(self, codes: torch.Tensor) -> None:
        """Back to threshold codes after ``adaround.AdaRound``, with its hard ``codes`` [N, K]: latent
        weight s q, threshold s / 2."""
        with torch.no_grad():
            scale = self.log_scale.exp()  # [N]
            self.weight.copy_(scale[:, None] * codes)
            self.threshold.copy_(scale / 2)
        self.codes = None

    def ternary_weight(self) -> torch.Tensor:  # [N, K]: value s*q, gradient identity to w, q to s
        if self.codes is not None:
            return self.log_scale.exp()[:, None] * self.codes
        w = self.weight
        value = self.log_scale.exp()[:, None] * threshold_codes(w.detach(), self.threshold)
        if not (torch.is_grad_enabled() and w.requires_grad):  # forwards without a backward: two passes fewer
            return value
        return value + (w - w.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        if self.rotation is not None:
            x = bk.rotate_torch(x, self.rotation)  # x R [..., K]
        y = nn.functional.linear(x, self.ternary_weight().to(x.dtype), self.bias)
        if self.residual_up is None:
            return y
        up, down = (_bf16(p).to(x.dtype) for p in (self.residual_up, self.residual_down))
        return y + (x @ down.T) @ up.T  # [..., r] -> [..., N]

    def export(self) -> tuple:
        """(codes [N, K] int8, scale [N] fp32) of the current latent weight, then (up [N, r], down [r, K])
        bf16 when the layer has a residual (gathered when FSDP shards them)."""
        weight, log_scale = (_full(p.detach()) for p in (self.weight, self.log_scale))
        out = (threshold_codes(weight, self.threshold).to(torch.int8), log_scale.exp().float())
        if self.residual_up is None:
            return out
        return (*out, tuple(_full(p.detach()).to(torch.bfloat16) for p in (self.residual_up, self.residual_down)))


def _bf16(t: torch.Tensor) -> torch.Tensor:  # value rounded to bf16 (as exported), gradient straight through
    return t + (t.detach().to(torch.bfloat16).float() - t.detach())


def _full(t: torch.Tensor) -> torch.Tensor:  # a DTensor's whole tensor: a collective, every rank calls it
    return t.full_tensor() if isinstance(t, DTensor) else t


def attach_ste(model: nn.Module, init: dict[str, tuple[torch.Tensor, torch.Tensor]], train_weight: bool = True,
               source: nn.Module | None = None, residuals: dict | None = None, rotation: str = "none") -> dict[str, STELinear]:
    """Replace the named modules of ``model`` in place by ``STELinear`` from {name: (threshold [N], scale [N])}
    and, for the names in ``residuals``, their starting residual {name: (up [N, r], down [r, K])}; with a
    ``rotation`` ("hadamard") each in the rotated basis of its input width (``rotation.py``).

    The weights and biases come from the linears of that name in ``source`` (default: ``model`` itself).
    """
    out = {}
    for name, (threshold, scale) in init.items():
        linear = (source or model).get_submodule(name)
        residual = (residuals or {}).get(name)
        signs = rotation_signs(rotation, linear.in_features)
        out[name] = STELinear(linear, threshold, scale, train_weight, residual, signs).to(linear.weight.device)
        _set_submodule(model, name, out[name])
    return out


def optimizer(modules: dict[str, STELinear], weight_lr: float, scale_lr: float, residual_lr: float = 0.0,
              rounding: nn.Parameter | None = None, rounding_lr: float = 0.0) -> torch.optim.Adam:
    """Adam over the scales, the latent weights that train when ``weight_lr`` > 0 (not those frozen by
    ``adaround.AdaRound``), the residual factors of the layers that have one when ``residual_lr`` > 0,
    and AdaRound's ``rounding`` (its v) at ``rounding_lr``."""
    groups = [{"params": [m.log_scale for m in modules.values()], "lr": scale_lr}]
    weights = [m.weight for m in modules.values() if m.weight.requires_grad]
    if weights and weight_lr > 0:
        groups.append({"params": weights, "lr": weight_lr})
    if rounding is not None:
        groups.append({"params": [rounding], "lr": rounding_lr})
    residual = [p for m in modules.values() if m.residual_up is not None for p in (m.residual_up, m.residual_down)]
    if residual and residual_lr > 0:
        groups.append({"params": residual, "lr": residual_lr})
    return torch.optim.Adam(groups, foreach=True)  # CPU defaults to a Python loop over the tensors


def absmean_init(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Threshold [N] and scale [N] that reproduce absmean's codes: t = mean|w| / 2, s = mean|w|."""
    mean_abs = weight.detach().float().abs().mean(1).clamp_min(1e-8)
    return mean_abs / 2, mean_abs


def ste_state(ste: dict[str, STELinear]) -> dict[str, torch.Tensor]:
    """Latent weights, scales, thresholds and biases of ``ste`` by full parameter name, gathered from
    their FSDP shards (a collective: every rank calls it; ranks other than 0 get {})."""
    return {f"{name}.{k}": v for name, m in ste.items() for k, v in get_model_state_dict(m, options=FULL).items()}


def write_saved(file: Path, scalars: dict, model: dict[str, torch.Tensor], optim: dict | None = None) -> None:
    """A checkpoint without pickle: tensors by name (``model.*``, ``optimizer.<param>.<key>``), the rest JSON."""
    tensors = {f"model.{k}": v for k, v in model.items()}
    scalars = dict(scalars, format="bitflux-distill-state")
    if optim is not None:
        for param, entries in optim["state"].items():
            for key, value in entries.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer state {param}.{key} is a {type(value).__name__}, not a tensor")
                tensors[f"optimizer.{param}.{key}"] = value
        scalars["param_groups"] = optim["param_groups"]
    write_state(file, tensors, scalars)


def read_saved(file: Path) -> dict:
    """A ``write_saved`` checkpoint as {scalars..., "model": {...}, "optimizer": {"state", "param_groups"}}."""
    tensors, scalars = read_state(file)
    if (scalars.get("format") != "bitflux-distill-state" or not isinstance(scalars.get("fingerprint"), str)
            or type(scalars.get("step", 0)) is not int or not isinstance(scalars.get("param_groups", []), list)):
        raise ArtifactError(f"{file}: not a distill checkpoint of this bitflux; delete it to start over")
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    state: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optimizer."):
            param, _, key = k.removeprefix("optimizer.").rpartition(".")
            state.setdefault(param, {})[key] = v
    groups = [dict(g, betas=tuple(g["betas"])) if isinstance(g, dict) and "betas" in g else g  # JSON made the tuple a list
              for g in scalars.get("param_groups", [])]
    return scalars | {"file": file, "model": model, "optimizer": {"state": state, "param_groups": groups}}


def check_fits(saved: dict, ste: dict[str, STELinear]) -> None:
    """Refuse (one line naming the file) a checkpoint whose latent tensors are not those of the linears ``ste``."""
    expected = {f"{name}.{k}": (tuple(v.shape), v.dtype) for name, m in ste.items()
                for k, v in [*m.named_parameters(), *m.named_buffers()]}
    found = {k: (tuple(v.shape), v.dtype) for k, v in saved["model"].items()}
    if found != expected:
        wrong = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))
        raise ArtifactError(f"{saved['file']}: its latent tensors do not fit this model ({len(wrong)} differ, first {wrong[0]}); "
                            f"delete it to start over")
