"""Quantization methods: ``METHODS[name](cfg, pipe, calib)`` -> {full module name: (codes [N, K] int8, scale [N] fp32)}.

``calib`` is the workdir's ``Calibration`` for the methods in ``NEEDS_CALIBRATION``, else None.
Every method ends in exact ternary codes and per-channel scales, so the packed format is the same.
"""

from .absmean import absmean
from .act_aware import act_aware
from .block_recon import block_recon
from .distill import distill

METHODS = {"absmean": absmean, "act-aware": act_aware, "block-recon": block_recon, "distill": distill}
NEEDS_CALIBRATION = {"act-aware", "block-recon", "distill"}
