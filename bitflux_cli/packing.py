"""The pack stage: ternary codes (one byte each) -> the 2-bit or base-3 storage codec, one tensor at a time."""

import math

from .artifacts import artifact_path, file_sha256, require
from .checkpoint import RESIDUAL, ROTATION, CheckpointFile, ternary_specs, write_checkpoint
from .config import Config
from .fidelity import recorded_report
from .loader import check_dense_tensors
from .models import build_meta_transformer


def pack(cfg: Config) -> dict:
    """Re-encode the quantize stage's checkpoint with ``pack.codec`` (a residual and the recorded activation
    mode carried as they are, unless ``quantization.activations`` is set; rotation signs too); report
    bytes vs bf16, the residual's and the rotation's bytes, and the bits a ternary weight costs (codes,
    scales, residual, rotation)."""
    src = require(cfg.workdir, "quantize")
    ckpt = CheckpointFile(src)
    check_dense_tensors(ckpt)
    specs = {}
    for m, shape in ckpt.modules.items():
        specs |= ternary_specs(m, shape, cfg.pack.codec, lambda m=m: ckpt.codes(m), lambda m=m: ckpt.read(f"{m}.scale"))
    for name in ckpt.names:
        if name not in specs:
            e = ckpt.file.entries[name]
            specs[name] = (e.dtype, e.shape, lambda name=name: ckpt.read(name))
    path = artifact_path(cfg.workdir, "pack")
    meta = ckpt.meta
    size = write_checkpoint(path, {m: list(s) for m, s in ckpt.modules.items()}, specs, cfg.pack.codec, {
        "base_model": meta["base_model"], "revision": meta["revision"], "stage": "pack",
        "activations": cfg.quantization.activations or meta["activations"], "config": cfg.resolved(), "architecture": meta["architecture"],
        "source": meta["source"], "inputs": {"ternary": {"path": str(src.resolve()), "sha256": file_sha256(src)}, **meta["inputs"]},
        "fidelity": recorded_report(src),
    })
    bf16 = 2 * sum(p.numel() for p in build_meta_transformer(meta["architecture"] or cfg.model).parameters())
    leaves = {}  # bytes of the quantized modules' tensors by leaf (codes, scale, residual_up, residual_down, rotation)
    for name, (dtype, shape, _) in specs.items():
        module, _, leaf = name.rpartition(".")
        if module in ckpt.modules and leaf in ("codes", "scale", ROTATION, *RESIDUAL):
            leaves[leaf] = leaves.get(leaf, 0) + math.prod(shape) * dtype.itemsize
    residual = sum(leaves.get(leaf, 0) for leaf in RESIDUAL)
    weights = sum(n * k for n, k in ckpt.modules.values())
    return {"stage": "pack", "path": str(path), "codec": cfg.pack.codec, "packed_bytes": size,
            "bf16_bytes": bf16, "storage_ratio": bf16 / size, "residual_rank": ckpt.residual_rank,
            "residual_bytes": residual, "rotation": "hadamard" if ckpt.rotated else "none",
            "rotation_bytes": leaves.get(ROTATION, 0), "bits_per_weight": 8 * sum(leaves.values()) / weights}
