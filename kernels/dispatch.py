"""The one dispatch point of the ternary linear: picks a backend per call."""

import os

import torch

from .reference import ternary_linear_reference, ternary_linear_torch

BACKENDS = ("reference", "torch", "triton")


def _triton_available() -> bool:
    return False


def select_backend(device: torch.device) -> str:
    """Backend for a tensor on ``device``: ``BITFLUX_BACKEND`` if set, else triton on CUDA, torch elsewhere."""
    forced = os.environ.get("BITFLUX_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"BITFLUX_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}")
        if forced == "triton" and not _triton_available():
            raise RuntimeError("BITFLUX_BACKEND=triton but the Triton kernels are not available here")
        return forced
    return "triton" if device.type == "cuda" and _triton_available() else "torch"


def ternary_linear(x, packed, scale, bias, in_features, activations="none"):
    """``y = (x @ unpack(packed)^T) * scale + bias`` on the selected backend.

    x: [..., K] float, packed: [N, Kp/4] uint8 (2-bit runtime layout), scale: [N] fp32,
    bias: [N] or None; activations: "none" (W2A16) or "int8" (W2A8). Output in x's dtype.
    """
    backend = select_backend(x.device)
    if backend == "reference":
        return ternary_linear_reference(x, packed, scale, bias, in_features, activations)
    return ternary_linear_torch(x, packed, scale, bias, in_features, activations)
