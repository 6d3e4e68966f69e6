"""Bit layouts of ternary weights: the 2-bit runtime layout and the base-3 storage codec.

This module is the single implementation of the layouts written down in docs/FORMAT.md.

2-bit runtime layout ("bitplane128")
    A ternary matrix ``codes: [N, K] int8`` in {-1, 0, +1} is stored as ``u = codes + 1`` in
    {0, 1, 2}. K is padded to ``Kp = ceil(K / 128) * 128`` with ``u = 1`` (a zero weight).
    Each group of 128 weights along K becomes 32 bytes; byte ``j`` of group ``g`` holds

        bits 0-1: u[n, 128 g + j]         bits 2-3: u[n, 128 g + 32 + j]
        bits 4-5: u[n, 128 g + 64 + j]    bits 6-7: u[n, 128 g + 96 + j]

    so one load of a group's 32 bytes yields four contiguous K-slices of 32 weights with one
    shift and mask each. Result: ``packed: [N, Kp / 4] uint8``, row-major. Code 3 never occurs.

Base-3 storage codec ("base3")
    The row-major flattened codes (no per-row padding) are taken 5 at a time, padded at the end
    with zeros; trits ``t0..t4 = code + 1`` (t0 first in memory) form
    ``q = t0*81 + t1*27 + t2*9 + t3*3 + t4`` in [0, 242], stored as ``ceil(q * 256 / 243)``.
    Trit ``i`` decodes as ``((byte * 3**i) mod 256) * 3 >> 8``. Result: ``[ceil(N*K / 5)] uint8``.
"""

import torch

GROUP = 128  # weights per packed group along K
PLANES = 4  # 2-bit fields per byte
LANE = GROUP // PLANES  # bytes per group, and weights per K-slice
# per-row scales run in (0, MAX_SCALE): the bf16 decode lifts them by this factor (decode.LIFT), and
# a lifted scale must stay below bf16's 2^128
MAX_SCALE = 2.0 ** 64


def padded_k(k: int) -> int:
    """K rounded up to a whole number of 128-weight groups."""
    return -(-k // GROUP) * GROUP


def _check_codes(codes: torch.Tensor) -> None:
    if codes.dim() != 2:
        raise ValueError(f"ternary codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype != torch.int8:
        raise ValueError(f"ternary codes must be int8, got {codes.dtype}")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("ternary codes must lie in {-1, 0, +1}")


def pack_2bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes [N, K] int8 into the 2-bit runtime layout [N, Kp/4] uint8."""
    _check_codes(codes)
    n, k = codes.shape
    kp = padded_k(k)
    u = torch.ones(n, kp, dtype=torch.uint8, device=codes.device)
    u[:, :k] = (codes + 1).to(torch.uint8)
    u = u.view(n, kp // GROUP, PLANES, LANE)  # [N, groups, plane, lane]
    packed = u[:, :, 0] | (u[:, :, 1] << 2) | (u[:, :, 2] << 4) | (u[:, :, 3] << 6)
    return packed.reshape(n, kp // PLANES).contiguous()  # [N, Kp/4]


def unpack_2bit(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Decode the 2-bit runtime layout [N, Kp/4] uint8 back to codes [N, K] int8."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError("packed weights must be a 2-D uint8 tensor")
    n, kq = packed.shape
    if kq * PLANES != padded_k(k):
        raise ValueError(f"packed width {kq} does not match K={k} (expected {padded_k(k) // PLANES})")
    g = packed.view(n, kq // LANE, 1, LANE)  # [N, groups, 1, lane]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device).view(1, 1, PLANES, 1)
    u = (g >> shifts) & 3  # [N, groups, plane, lane]
    return (u.reshape(n, kq * PLANES)[:, :k].to(torch.int8) - 1).contiguous()


_POW3 = (81, 27, 9, 3, 1)


def pack_base3(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes [N, K] int8 into the base-3 storage codec [ceil(N*K/5)] uint8."""
    _check_codes(codes)
    flat = (codes.reshape(-1).to(torch.int32) + 1)
    pad = (-flat.numel()) % 5
    flat = torch.cat([flat, torch.ones(pad, dtype=torch.int32, device=flat.device)])
    trits = flat.view(-1, 5)  # [bytes, 5]
    weights = torch.tensor(_POW3, dtype=torch.int32, device=flat.device)
    q = (trits * weights).sum(dim=1)  # [bytes] in [0, 242]
    return ((q * 256 + 242) // 243).to(torch.uint8)


def unpack_base3(data: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Decode the base-3 codec back to codes [N, K] int8."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError("base-3 data must be a 1-D uint8 tensor")
    if data.numel() != -(-n * k // 5):
        raise ValueError(f"base-3 data has {data.numel()} bytes, expected {-(-n * k // 5)} for [{n}, {k}]")
    mult = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=data.device)
    x = (data.to(torch.int32)[:, None] * mult) & 0xFF  # [bytes, 5]
    trits = (x * 3) >> 8
    return (trits.reshape(-1)[: n * k].to(torch.int8) - 1).view(n, k)


def packed_2bit_bytes(n: int, k: int) -> int:
    """Bytes of an [N, K] ternary matrix in the 2-bit runtime layout."""
    return n * padded_k(k) // PLANES


def base3_bytes(n: int, k: int) -> int:
    """Bytes of an [N, K] ternary matrix in the base-3 storage codec."""
    return -(-n * k // 5)
