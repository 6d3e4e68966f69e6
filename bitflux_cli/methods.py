"""Quantization methods: each maps (config, FP pipeline) to {module: (codes [N, K] int8, scale [N])}."""

from .config import Config
from .ternary import scoped_linears, ternarize


def absmean(cfg: Config, pipe) -> dict:
    """BitNet b1.58 absmean per output channel; needs no calibration."""
    return {name: ternarize(lin.weight) for name, lin in scoped_linears(pipe.transformer)}


METHODS = {"absmean": absmean}
