"""bitflux ternary kernels: packed layouts, reference paths and the Triton GEMMs."""

from .dispatch import BACKENDS, select_backend, ternary_linear
from .layout import pack_2bit, pack_base3, unpack_2bit, unpack_base3
from .reference import ternary_linear_reference, ternary_linear_torch

__all__ = [
    "BACKENDS",
    "select_backend",
    "ternary_linear",
    "pack_2bit",
    "unpack_2bit",
    "pack_base3",
    "unpack_base3",
    "ternary_linear_reference",
    "ternary_linear_torch",
]
