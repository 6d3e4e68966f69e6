"""BitNet b1.58 absmean: no calibration."""

from ..config import Config
from ..ternary import block_linears, ternarize


def absmean(cfg: Config, transformer=None, calib=None):
    """Absmean per output channel of every linear of a block; needs no calibration."""
    return lambda _name, block: {sub: ternarize(lin.weight) for sub, lin in block_linears(block)}
