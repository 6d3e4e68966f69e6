"""The one dispatch point of the ternary linear: picks a backend per call."""

import importlib.util
import os
import warnings

import torch

from .reference import ternary_linear_reference, ternary_linear_torch

BACKENDS = ("reference", "torch", "triton")


def _triton_blocker(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run on ``device``, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    from .common import interpreting

    if interpreting():
        return None
    if device.type != "cuda":
        return (f"the tensors are on {device.type}, and the Triton kernels need CUDA "
                "(or TRITON_INTERPRET=1 to run them in Triton's CPU interpreter, for tests)")
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"{torch.cuda.get_device_name(device)} is older than sm80 (Ampere), which the kernels need"
    return None


def select_backend(device: torch.device) -> str:
    """Backend for a tensor on ``device``: ``BITFLUX_BACKEND`` if set, else triton on CUDA, torch elsewhere.

    Forcing triton where it cannot run raises. Unforced, a CUDA device the kernels cannot serve
    (pre-Ampere, no triton) runs the torch path with a warning.
    """
    forced = os.environ.get("BITFLUX_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"BITFLUX_BACKEND={forced!r} is not one of {', '.join(BACKENDS)}")
        if forced == "triton":
            blocker = _triton_blocker(device)
            if blocker:
                raise RuntimeError(f"BITFLUX_BACKEND=triton but {blocker}")
        return forced
    if device.type != "cuda":
        return "torch"
    blocker = _triton_blocker(device)
    if blocker:
        warnings.warn(f"bitflux: using the torch backend because {blocker}", RuntimeWarning, stacklevel=3)
        return "torch"
    return "triton"


def ternary_linear(x, packed, scale, bias, in_features, activations="none"):
    """``y = (x @ unpack(packed)^T) * scale + bias`` on the selected backend.

    x: [..., K] float, packed: [N, Kp/4] uint8 (2-bit runtime layout), scale: [N] fp32,
    bias: [N] or None; activations: "none" (W2A16) or "int8" (W2A8). Output in x's dtype.
    """
    if activations not in ("none", "int8"):
        raise ValueError(f"activations must be 'none' or 'int8', got {activations!r}")
    backend = select_backend(x.device)
    if backend == "reference":
        return ternary_linear_reference(x, packed, scale, bias, in_features, activations)
    if backend == "triton":
        from . import ops  # imported on first use: triton reads TRITON_INTERPRET when the kernels are defined

        op = ops.w2a8 if activations == "int8" else ops.w2a16
        return op(x, packed, scale.float(), bias, in_features)
    return ternary_linear_torch(x, packed, scale, bias, in_features, activations)
