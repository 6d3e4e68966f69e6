"""peft / diffusers: LoRA adapters on ternary layers, as an unmerged low-rank branch beside the packed weight.

>>> pipe = FluxPipeline.from_pretrained(..., transformer=from_pretrained("OUT"))   # a 1.58-bit transformer
>>> pipe.load_lora_weights("style.safetensors", adapter_name="style")   # diffusers/peft or kohya format
>>> pipe.set_adapters(["style", "detail"], adapter_weights=[0.8, 0.5])
>>> pipe.unload_lora_weights()                                           # back to the exact ternary output

A ternary weight cannot absorb ``W + s * B @ A`` (the sum is not ternary), so every LoRA on a
``TernaryLinear`` stays a branch: ``y = ternary(x) + sum_a s_a * B_a(A_a(x))``, the adapters in the
layer's dtype (that of its bias: the model's), ``fuse_lora`` refused with ``UnfusableLoraError``.

peft picks a LoRA layer by the type of the layer it wraps; ``TernaryLoraLinear`` (peft's LoRA
``Linear`` with a ``TernaryLinear`` inside) is registered through peft's custom-module dispatch
(``LoraConfig._register_custom_module``) on every ``LoraConfig``, so also on the ones diffusers'
``load_lora_adapter`` builds. Two more places assume that the wrapped layer has a ``.weight`` (peft's
``_replace_module``, diffusers' FLUX ``_maybe_expand_lora_state_dict``), and diffusers' ``fuse_lora``
scales layers before merging them; ``enable`` wraps these four for ternary layers only
(``_PATCHES``). It runs when this module is imported and whenever a ternary transformer is built
(``ternary.replace_with_ternary`` and ``quantize_transformer``, so every loader), if peft is installed.
"""

import functools

import torch
from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
from diffusers.loaders.peft import PeftAdapterMixin
from peft import LoraConfig
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as LoraLinear

from ..errors import BitfluxError, UsageError
from ..ternary import TernaryLinear


class UnfusableLoraError(BitfluxError):
    """A LoRA was asked to merge into a ternary weight, which cannot hold it."""


def _unfusable(name: str) -> UnfusableLoraError:
    return UnfusableLoraError(
        f"{name or 'a layer'} is a 1.58-bit TernaryLinear: its ternary weight cannot absorb a LoRA (W + s*B@A is "
        "not ternary), so the adapter cannot be fused or merged. Keep it unfused: it already runs as a low-rank "
        "branch beside the packed weight (set_adapters to weight it, unload_lora_weights to remove it).")


class TernaryLoraLinear(LoraLinear):
    """peft's LoRA ``Linear`` around a ``TernaryLinear``: ``ternary(x) + sum_a scaling_a * B_a(A_a(dropout(x)))``.

    ``lora_A[a]`` is [r, K] and ``lora_B[a]`` [N, r], on the packed weight's device in the bias's
    dtype. Forward, per-adapter scales, several adapters, ``adapter_names`` batches and deletion
    are peft's. Refused: ``merge`` (``UnfusableLoraError``), and the LoRA variants (DoRA reads the
    dense weight; the others are untested here).
    """

    def resolve_lora_variant(self, *, config, **kwargs):
        try:
            plain = super().resolve_lora_variant(config=config, **kwargs) is None
        except ValueError:  # a combination of variants peft itself refuses
            plain = False
        if not plain:
            raise ValueError(f"{self.kwargs.get('target_name', 'a ternary layer')}: only plain LoRA works on a "
                             "1.58-bit TernaryLinear (DoRA and the other LoRA variants are not supported on it)")
        return None

    def _get_in_out_features(self, module):
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        return base_layer.packed.device, None if base_layer.bias is None else base_layer.bias.dtype

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise _unfusable(self.kwargs.get("target_name", ""))


def refuse_fusing(model: torch.nn.Module, adapter_names: list[str] | None = None) -> None:
    """Raise ``UnfusableLoraError`` if fusing ``adapter_names`` (default: the active ones) would touch a ternary layer."""
    for name, module in model.named_modules():
        if isinstance(module, TernaryLoraLinear):
            wanted = adapter_names if adapter_names is not None else module.active_adapters
            if any(a in module.lora_A for a in wanted):
                raise _unfusable(name)


def _ternary_names(transformer: torch.nn.Module) -> dict[str, TernaryLinear]:
    """Module path -> TernaryLinear, the path a LoRA names (without a wrapper's ``.base_layer``)."""
    return {name.removesuffix(".base_layer"): m for name, m in transformer.named_modules() if isinstance(m, TernaryLinear)}


# Each (owner, attribute, wrapper) adapts one assumption of peft or diffusers for ternary layers and
# leaves every other layer to the original, which the wrapper keeps.
def _register_on_every_config(post_init):
    @functools.wraps(post_init)
    def __post_init__(self, *args, **kwargs):
        post_init(self, *args, **kwargs)
        self._register_custom_module({TernaryLinear: TernaryLoraLinear})
    return __post_init__


def _replace_without_weight(replace):
    # peft moves a new LoRA layer to the device of the wrapped layer's weight, else of its first
    # parameter; a TernaryLinear has no weight. update_layer has already put the adapter there.
    @functools.wraps(replace)
    def _replace_module(self, parent, child_name, new_module, child):
        if isinstance(new_module, TernaryLoraLinear):
            setattr(parent, child_name, new_module)
            return
        return replace(self, parent, child_name, new_module, child)
    return _replace_module


def _fused_away(transformer: torch.nn.Module, module: str) -> bool:
    """True when ``fusion.fuse_projections`` removed ``module`` (to_q, ..., add_v_proj) or made it a
    column slice of a fused linear (a single block's proj_mlp)."""
    from ..fusion import Columns

    parent, _, _ = module.rpartition(".")
    owner, layer = transformer.get_submodule(parent) if parent else transformer, None
    try:
        layer = transformer.get_submodule(module)
    except AttributeError:
        pass
    return isinstance(layer, Columns) or (layer is None and getattr(owner, "fused_projections", False))


def _expand_without_weight(expand):
    # diffusers zero-pads a FLUX LoRA's lora_A to its base layer's ``<name>.weight`` (Control LoRAs
    # widen x_embedder); a ternary layer has no such tensor and never widens: check, pass through.
    # A LoRA naming a projection that model.fuse_projections fused away is refused (peft would skip
    # a missing target without a word, and fail on a column slice with its own message).
    expand = expand.__func__

    @functools.wraps(expand)
    def _maybe_expand_lora_state_dict(cls, transformer, lora_state_dict):
        prefix, ternary, held = f"{cls.transformer_name}.", _ternary_names(transformer), {}
        for key in list(lora_state_dict):
            module = key.removeprefix(prefix).split(".lora_")[0] if key.startswith(prefix) else None
            if module is not None and module not in ternary and _fused_away(transformer, module):
                raise UsageError(f"the LoRA targets {module}, which model.fuse_projections fused into one linear "
                                 "with its neighbours: load LoRAs on an unfused transformer (fuse_projections: false)")
            if module in ternary:
                held[key] = lora_state_dict.pop(key)
                if key.endswith(".lora_A.weight") and held[key].shape[1] != ternary[module].in_features:
                    raise ValueError(f"LoRA {key} has shape {tuple(held[key].shape)}, but the ternary layer {module} "
                                     f"takes {ternary[module].in_features} inputs")
        out = expand(cls, transformer, lora_state_dict)
        out.update(held)
        return out
    return classmethod(_maybe_expand_lora_state_dict)


def _fuse_refusing_ternary(fuse):
    # refuse before diffusers scales or merges any layer, so a refused fuse leaves the model as it was
    @functools.wraps(fuse)
    def fuse_lora(self, lora_scale=1.0, safe_fusing=False, adapter_names=None):
        refuse_fusing(self, adapter_names)
        return fuse(self, lora_scale, safe_fusing, adapter_names)
    return fuse_lora


_PATCHES = [
    (LoraConfig, "__post_init__", _register_on_every_config),
    (LoraModel, "_replace_module", _replace_without_weight),
    (FluxLoraLoaderMixin, "_maybe_expand_lora_state_dict", _expand_without_weight),
    (PeftAdapterMixin, "fuse_lora", _fuse_refusing_ternary),
]


def _original(attribute):
    """What a patched class attribute replaced, or None if it is not ours."""
    return getattr(getattr(attribute, "__func__", attribute), "_bitflux_original", None)


def enable() -> None:
    """Make peft put a ``TernaryLoraLinear`` on every ``TernaryLinear`` a LoRA targets (idempotent)."""
    for owner, attr, wrap in _PATCHES:
        current = vars(owner)[attr]
        if _original(current) is None:
            patched = wrap(current)
            getattr(patched, "__func__", patched)._bitflux_original = current
            setattr(owner, attr, patched)


def disable() -> None:
    """Give peft and diffusers their own methods back (loaded adapters stay as they are)."""
    for owner, attr, _ in _PATCHES:
        original = _original(vars(owner)[attr])
        if original is not None:
            setattr(owner, attr, original)


def is_enabled() -> bool:
    """True when every adaptation of ``enable`` is in place."""
    return all(_original(vars(owner)[attr]) is not None for owner, attr, _ in _PATCHES)


enable()
