"""Ternary weights: the absmean quantizer, the packed ``TernaryLinear`` and the quantization scope."""

import importlib.util
import re
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import nn

import bitflux_kernels
from bitflux_kernels.layout import padded_k
from bitflux_kernels.ops import OPS

from .rotation import rotated_inputs, rotation_signs

# Full module paths of the linears that become ternary: everything inside a double block
# (FluxTransformerBlock) or a single block (FluxSingleTransformerBlock). Matching the full path
# matters: FLUX has a top-level ``proj_out`` as well as one inside every single block.
SCOPE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\.")


def in_scope(name: str, module: nn.Module) -> bool:
    """True for the linears that the 1.58-bit method quantizes."""
    return isinstance(module, nn.Linear) and bool(SCOPE.match(name))


def scoped_linears(model: nn.Module, scope: Callable[[str, nn.Module], bool] = in_scope) -> Iterator[tuple[str, nn.Linear]]:
    """(full name, module) for every in-scope linear of ``model``, in module order."""
    for name, module in model.named_modules():
        if scope(name, module):
            yield name, module


def block_linears(block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name inside the block, module) of every linear of one transformer block: all are in scope."""
    return list(scoped_linears(block, lambda _n, m: isinstance(m, nn.Linear)))


def ternarize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58 absmean, one scale per output channel.

    weight: [N, K] -> (codes [N, K] int8 in {-1, 0, 1}, scale [N] fp32), with
    ``scale = mean(|W_row|)`` and ``codes = clip(round(W / scale), -1, 1)``.
    """
    w = weight.detach().float()
    scale = w.abs().mean(dim=1).clamp_min(1e-8)  # [N]
    codes = torch.round(w / scale[:, None]).clamp_(-1, 1).to(torch.int8)
    return codes, scale


class TernaryLinear(nn.Module):
    """A linear layer whose weight is ternary codes in the 2-bit runtime layout times a per-row scale.

    Holds frozen parameters (``requires_grad=False``, as bitsandbytes' and torchao's quantized weights
    are, so accelerate's and diffusers' offload hooks move them like any weight): ``packed`` [N, Kp/4]
    uint8, ``scale`` [N] fp32 and ``bias`` [N] (or no bias);
    with ``residual_rank`` r > 0 also ``residual_up`` [N, r] and ``residual_down`` [r, K] bf16, a
    low-rank correction (``residual``) added as ``(x @ down^T) @ up^T`` in x's dtype: one more small
    GEMM pair in plain torch; with ``rotated`` also ``rotation`` [K] int8 in {-1, +1}, the signs of the
    randomized Hadamard rotation R (``quantization.rotation``): the codes, scales and residual are then
    those of ``W R``, and ``forward`` computes ``x R`` first (``torch.ops.bitflux.hadamard``). ``activations`` selects W2A16 ("none") or per-token int8 ("int8") or float8
    e4m3 ("fp8") activations.

    ``backend`` ("reference", "torch" or "triton", see ``bitflux_kernels.select_backend``) is
    resolved when the layer is built on, moved to (``.to``, ``.cuda``, ``to_empty``) or loaded onto
    a device: ``forward`` is one call of ``torch.ops.bitflux.w2a16``/``w2a8``/``w2fp8``, so
    ``torch.compile(fullgraph=True)`` traces it. Offload hooks (diffusers' group offloading,
    accelerate's ``cpu_offload``) move the tensors with ``param.data = ...``, which bypasses all of
    those: ``forward`` resolves again when ``packed`` is no longer on the device the backend was
    resolved for (a constant comparison for Dynamo when nothing moved). It may also be set by hand.
    """

    def __init__(self, in_features, out_features, bias=True, activations="none", device=None, dtype=None,
                 residual_rank=0, rotated=False):
        super().__init__()
        self.in_features, self.out_features, self.activations = in_features, out_features, activations
        self.packed = _frozen(torch.empty(out_features, padded_k(in_features) // 4, dtype=torch.uint8, device=device))
        self.scale = _frozen(torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = _frozen(torch.empty(out_features, dtype=dtype, device=device) if bias else None)
        up, down = ((torch.empty(out_features, residual_rank, dtype=torch.bfloat16, device=device),
                     torch.empty(residual_rank, in_features, dtype=torch.bfloat16, device=device))
                    if residual_rank else (None, None))
        self.residual_up = _frozen(up)  # [N, r]
        self.residual_down = _frozen(down)  # [r, K]
        self.rotation = _frozen(torch.empty(in_features, dtype=torch.int8, device=device) if rotated else None)  # [K]
        self.backend = None
        self._resolve_backend()
        # load_state_dict(assign=True) swaps the tensors without ``_apply``: resolve again afterwards
        self.register_load_state_dict_post_hook(_resolve_after_load)

    def _resolve_backend(self) -> None:
        device = self.packed.device
        self.backend = None if device.type == "meta" else bitflux_kernels.select_backend(device)
        self.backend_device = device

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._resolve_backend()
        return self

    @classmethod
    def from_codes(cls, codes, scale, bias=None, activations="none", residual=None, rotation=None):
        """Build from codes [N, K] int8, scale [N], an optional bias [N], an optional residual
        (up [N, r], down [r, K]) and optional rotation signs [K] int8 (then codes and residual are of ``W R``)."""
        n, k = codes.shape
        layer = cls(k, n, bias is not None, activations, device=codes.device, dtype=None if bias is None else bias.dtype,
                    residual_rank=0 if residual is None else residual[0].shape[1], rotated=rotation is not None)
        layer.packed.copy_(bitflux_kernels.pack_2bit(codes))
        layer.scale.copy_(scale.float())
        if bias is not None:
            layer.bias.copy_(bias)
        if residual is not None:
            layer.residual_up.copy_(residual[0])
            layer.residual_down.copy_(residual[1])
        if rotation is not None:
            layer.rotation.copy_(rotation)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K] -> [..., N]
        if self.packed.device != self.backend_device:  # moved by an offload hook's ``.data =``
            self._resolve_backend()
        if self.backend is None:
            raise RuntimeError("TernaryLinear is on the meta device: load or move it to a device first")
        if self.rotation is not None:
            x = torch.ops.bitflux.hadamard(x, self.rotation, self.backend)  # x R [..., K]
        y = OPS[self.activations](x, self.packed, self.scale, self.bias, self.in_features, self.backend)
        if self.residual_up is None:
            return y
        return y + (x @ self.residual_down.to(x.dtype).T) @ self.residual_up.to(x.dtype).T  # [..., r] -> [..., N]

    def extra_repr(self) -> str:
        rank = "" if self.residual_up is None else f", residual_rank={self.residual_up.shape[1]}"
        rotated = "" if self.rotation is None else ", rotation=hadamard"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations={self.activations}, backend={self.backend}{rank}{rotated}")


def _frozen(t: torch.Tensor | None) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=False)


def _resolve_after_load(module: TernaryLinear, incompatible_keys) -> None:
    module._resolve_backend()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def enable_lora() -> None:
    """Let peft/diffusers LoRAs wrap ``TernaryLinear`` (``integrations.lora``) when peft is installed;
    run by the two builders below, so every ternary transformer takes ``pipe.load_lora_weights``."""
    if importlib.util.find_spec("peft") is None:
        return
    try:
        from .integrations import lora

        lora.enable()
    except Exception as exc:  # noqa: BLE001 - a peft or diffusers we cannot adapt must not stop the model loading
        warnings.warn(f"bitflux: LoRA on ternary layers is unavailable ({type(exc).__name__}: {exc})", RuntimeWarning,
                      stacklevel=2)


def replace_with_ternary(model: nn.Module, names: list[str], activations: str = "none", residual_rank: int = 0,
                         rotated: bool = False) -> None:
    """Swap the named linears for empty ``TernaryLinear`` shells on the same device (meta works)."""
    enable_lora()
    for name in names:
        lin = model.get_submodule(name)
        shell = TernaryLinear(lin.in_features, lin.out_features, lin.bias is not None, activations,
                              device=lin.weight.device, dtype=lin.weight.dtype, residual_rank=residual_rank, rotated=rotated)
        _set_submodule(model, name, shell)


def quantize_transformer(model: nn.Module, codes: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                         activations: str = "none", rotation: str = "none") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Replace every in-scope linear of ``model`` by a ``TernaryLinear``, in place.

    ``codes`` maps full module names to (codes, scale), or (codes, scale, (up, down)) with a residual,
    from any method run with ``quantization.rotation`` = ``rotation`` (their codes are then of ``W R``);
    by default each layer is ternarized with absmean. Returns the (codes, scale) used per module.
    """
    enable_lora()
    used = {}
    for name, lin in list(scoped_linears(model)):
        c, s, *residual = codes[name] if codes is not None else ternarize(rotated_inputs(rotation, lin)[0])
        signs = rotation_signs(rotation, lin.in_features)
        _set_submodule(model, name, TernaryLinear.from_codes(c, s, lin.bias, activations, residual[0] if residual else None,
                                                             signs))
        used[name] = (c, s)
    return used


def parameter_counts(model: nn.Module) -> dict:
    """Quantized vs total parameter counts of a full-precision model (works on the meta device).

    ``quantized_params`` counts every parameter of the in-scope linears (ternary weights plus
    their biases, which stay bf16); ``ternary_weight_params`` counts the weights alone.
    """
    total = sum(p.numel() for p in model.parameters())
    lins = [m for _, m in scoped_linears(model)]
    weights = sum(m.weight.numel() for m in lins)
    biases = sum(m.bias.numel() for m in lins if m.bias is not None)
    return {
        "quantized_params": weights + biases,
        "ternary_weight_params": weights,
        "total_params": total,
        "fraction": (weights + biases) / total,
        "ternary_weight_fraction": weights / total,
        "quantized_modules": len(lins),
    }
