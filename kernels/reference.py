"""Plain-torch paths for the ternary linear: the float64 ground truth and the fast CPU path."""

import torch

from .layout import PLANES, unpack_2bit


def _token_scale(xf: torch.Tensor, qmax: float) -> torch.Tensor:
    """``max(|x_row|, 1e-12) / qmax`` [M] fp32, IEEE-divided on every device: CUDA divides a tensor by
    a Python number as a multiply by its reciprocal (one ulp off at times), so the divisor is a tensor."""
    amax = xf.abs().amax(dim=-1).clamp_min(1e-12)  # [M]
    return amax / torch.full_like(amax, qmax)


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantization: x [M, K] -> (q [M, K] int8, scale [M] fp32).

    ``scale = max(|x_row|, 1e-12) / 127``, ``q = round(x / scale)``.
    """
    xf = x.float()
    scale = _token_scale(xf, 127.0)  # [M]
    q = torch.round(xf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


FP8_MAX = 448.0  # the largest float8 e4m3fn


def quantize_activations_fp8(x: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric float8 e4m3 quantization: x [M, K] -> (q [M, width] float8_e4m3fn, zeros past
    K; scale [M] fp32). ``scale = max(|x_row|) / 448``, ``q = e4m3(x / scale)`` rounded to nearest
    even by torch's cast (the kernels use this same function, so they match it bit for bit)."""
    xf = x.float()
    scale = _token_scale(xf, FP8_MAX)  # [M]
    v = (xf / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX)  # [M, K]
    if width is not None and width > v.shape[1]:
        v = torch.nn.functional.pad(v, (0, width - v.shape[1]))  # [M, width]
    return v.to(torch.float8_e4m3fn), scale


QUANTIZERS = {"int8": quantize_activations_int8, "fp8": quantize_activations_fp8}


def ternary_linear_reference(x, packed, scale, bias, in_features, activations="none"):
    """Ground truth in float64: ``y = (x @ codes^T) * scale + bias``, returned in x's dtype.

    With ``activations="int8"`` or ``"fp8"`` x is first quantized per token exactly as the W2A8
    kernels do (``QUANTIZERS``).
    """
    codes = unpack_2bit(packed, in_features).double()  # [N, K]
    x2 = x.reshape(-1, in_features)  # [M, K]
    if activations in QUANTIZERS:
        q, sx = QUANTIZERS[activations](x2)
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
    if activations in QUANTIZERS:
        q, sx = QUANTIZERS[activations](x2)
        # int8 x ternary sums stay below 2**24 for K < 132k, so float32 is exact here (fp8: rounded sums)
        w = decode_2bit(packed, in_features, torch.float32)
        y = (q.float() @ w.T) * sx[:, None] * scale
    else:
        w = decode_2bit(packed, in_features, x.dtype)
        y = (x2 @ w.T) * scale.to(x.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)
