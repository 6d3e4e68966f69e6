"""Plain-torch paths for the ternary linear: the float64 ground truth and the fast CPU path."""

import torch

from .layout import PLANES, unpack_2bit


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization: x [M, K] -> (q [M, K] int8, scale [M] fp32).

    ``scale = max(|x_row|) / 127`` (1 for an all-zero row), ``q = round(x / scale)``.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-12) / 127.0  # [M]
    q = torch.round(xf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def ternary_linear_reference(x, packed, scale, bias, in_features, activations="none"):
    """Ground truth in float64: ``y = (x @ codes^T) * scale + bias``, returned in x's dtype.

    With ``activations="int8"`` x is first quantized per token exactly as the W2A8 kernel does.
    """
    codes = unpack_2bit(packed, in_features).double()  # [N, K]
    x2 = x.reshape(-1, in_features)  # [M, K]
    if activations == "int8":
        q, sx = quantize_activations_int8(x2)
        y = (q.double() @ codes.T) * sx.double()[:, None]
    else:
        y = x2.double() @ codes.T  # [M, N]
    y = y * scale.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def decode_2bit(packed: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Decode packed [N, Kp/4] uint8 to weights [N, K] in ``dtype`` (shift and mask in uint8, then ``u - 1``)."""
    n, kq = packed.shape
    g = packed.view(n, kq // 32, 1, 32)  # [N, groups, 1, 32]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 1, PLANES, 1)
    u = (g >> shifts) & 3  # [N, groups, 4, 32] uint8 in {0, 1, 2}
    return u.reshape(n, kq * PLANES)[:, :in_features].to(dtype) - 1  # exact in every float dtype


def ternary_linear_torch(x, packed, scale, bias, in_features, activations="none"):
    """Vectorized torch path (CPU default): decode, one matmul, scale and bias."""
    x2 = x.reshape(-1, in_features)  # [M, K]
    if activations == "int8":
        q, sx = quantize_activations_int8(x2)
        # int8 x ternary sums stay below 2**24 for K < 132k, so float32 is exact here
        w = decode_2bit(packed, in_features, torch.float32)
        y = (q.float() @ w.T) * sx[:, None] * scale
    else:
        w = decode_2bit(packed, in_features, x.dtype)
        y = (x2 @ w.T) * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
