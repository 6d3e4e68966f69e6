"""Backend choice for the ternary linear, and the public dispatch function.

A backend is chosen once per module (``TernaryLinear`` resolves it when built on, moved to or
loaded onto a device) and passed to the ``torch.ops.bitflux`` ops as a plain string, so nothing
here runs inside a ``torch.compile``d forward. ``ternary_linear`` (for callers without a module)
chooses per call, which is fine in eager code but not compile-clean.
"""

import importlib.util
import os
import warnings

import torch

from . import ops

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


def select_backend(device: torch.device | str) -> str:
    """Backend for a tensor on ``device``: ``BITFLUX_BACKEND`` if set, else triton on CUDA, torch elsewhere.

    Forcing triton where it cannot run raises. Unforced, a CUDA device the kernels cannot serve
    (pre-Ampere, no triton) runs the torch path with a warning.
    """
    device = torch.device(device)
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


def ternary_linear(x, packed, scale, bias, in_features, activations="none", backend=None):
    """``y = (x @ unpack(packed)^T) * scale + bias`` through ``torch.ops.bitflux``.

    x: [..., K] float, packed: [N, Kp/4] uint8 (2-bit runtime layout), scale: [N] fp32,
    bias: [N] or None; activations: "none" (W2A16), "int8" or "fp8" (W2A8, per-token int8 or float8
    e4m3 activations). Output in x's dtype.
    ``backend`` defaults to ``select_backend(x.device)``, evaluated on every call.
    """
    if activations not in ops.OPS:
        raise ValueError(f"activations must be one of {', '.join(ops.OPS)}, got {activations!r}")
    return ops.OPS[activations](x, packed, scale, bias, in_features, backend or select_backend(x.device))
