"""BitNet b1.58 absmean: no calibration."""

from ..config import Config
from ..rotation import rotated_inputs
from ..ternary import block_linears, ternarize


def absmean(cfg: Config, transformer=None, calib=None):
    """Absmean per output channel of every linear of a block (of ``W R`` with ``quantization.rotation``);
    needs no calibration."""
    kind = cfg.quantization.rotation
    return lambda _name, block: {sub: ternarize(rotated_inputs(kind, lin)[0]) for sub, lin in block_linears(block)}
