"""BitNet b1.58 absmean: no calibration."""

from ..config import Config
from ..ternary import scoped_linears, ternarize


def absmean(cfg: Config, pipe, calib=None) -> dict:
    """Absmean per output channel of every in-scope linear; needs no calibration."""
    return {name: ternarize(lin.weight) for name, lin in scoped_linears(pipe.transformer)}
