"""Quantization methods. Every method ends in exact ternary codes and per-channel scales, so the packed format is the same.

Block methods (``BLOCK_METHODS``) are streamed: ``METHODS[name](cfg, transformer, calib)`` returns
a function ``(block name, FP block) -> {linear name inside the block: (codes [N, K] int8, scale [N] fp32)}``
that quantize calls once per block, in execution order, with only that block materialised
(``transformer`` is the skeleton of ``streaming``: embedders loaded, blocks empty). block-recon with
``quantization.residual_rank`` r > 0 adds a third element, the residual it trained with the codes,
``(up [N, r], down [r, K])`` bf16; for the other methods quantize fits the residual after them. ``distill``
trains the whole model end to end: ``distill(cfg, pipe, calib)`` gets a pipeline whose transformer
is materialised, and returns {full module name: (codes, scale)}.

``calib`` is the workdir's ``Calibration`` for the methods in ``NEEDS_CALIBRATION``, else None.
"""

from ..streaming import blocks
from .absmean import absmean
from .act_aware import act_aware
from .block_recon import block_recon
from .distill import distill

METHODS = {"absmean": absmean, "act-aware": act_aware, "block-recon": block_recon, "distill": distill}
BLOCK_METHODS = {"absmean", "act-aware", "block-recon"}
NEEDS_CALIBRATION = {"act-aware", "block-recon", "distill"}


def run_method(cfg, pipe, calib=None) -> dict:
    """{full module name: (codes, scale)} of ``quantization.method`` over a pipeline whose transformer
    is materialised in memory (the Python API for small models; the CLI streams the blocks instead).
    With ``quantization.rotation`` the codes are of ``W R``: give ``quantize_transformer`` the same rotation."""
    name = cfg.quantization.method
    if name not in BLOCK_METHODS:
        return METHODS[name](cfg, pipe, calib)
    quantize_block = METHODS[name](cfg, pipe.transformer, calib)
    return {f"{b}.{sub}": v for b, block in blocks(pipe.transformer) for sub, v in quantize_block(b, block).items()}
