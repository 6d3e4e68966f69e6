"""bitflux: 1.58-bit FLUX. Python API for people who do not use the CLI.

>>> codes, scale = ternarize(linear.weight)          # absmean, one scale per output channel
>>> packed = pack(codes)                             # 2-bit runtime layout, 4 codes a byte
>>> assert torch.equal(unpack(packed, codes.shape), codes)
>>> quantize_transformer(transformer)                # in place: block linears -> TernaryLinear
>>> t = load_quantized_transformer("runs/tiny/packed/transformer.safetensors")
"""

from .checkpoint import pack, unpack
from .loader import load_quantized_transformer
from .ternary import TernaryLinear, quantize_transformer, ternarize

__all__ = ["ternarize", "pack", "unpack", "TernaryLinear", "quantize_transformer", "load_quantized_transformer"]
