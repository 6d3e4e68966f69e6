"""bitflux: 1.58-bit FLUX. Python API for people who do not use the CLI.

>>> codes, scale = ternarize(linear.weight)          # absmean, one scale per output channel
>>> packed = pack(codes)                             # 2-bit runtime layout, 4 codes a byte
>>> assert torch.equal(unpack(packed, codes.shape), codes)
>>> quantize_transformer(transformer)                # in place: block linears -> TernaryLinear
>>> t = load_quantized_transformer("runs/tiny/packed/transformer.safetensors")

Importing it also registers ``quant_method: bitflux`` with diffusers (now, or when diffusers loads:
``integrations.hooks``), so ``FluxTransformer2DModel.from_pretrained`` and ``FluxPipeline.from_pretrained``
load, and ``save_pretrained`` / ``push_to_hub`` write, bitflux transformer directories.
"""

import importlib

from .integrations.hooks import install as _install_hooks

# Lazy, so that `bitflux --help` and the CLI's logging set-up run before torch/diffusers load.
_API = {"ternarize": "ternary", "TernaryLinear": "ternary", "quantize_transformer": "ternary",
        "pack": "checkpoint", "unpack": "checkpoint", "load_quantized_transformer": "loader"}
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_install_hooks()
