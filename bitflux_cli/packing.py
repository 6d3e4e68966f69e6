"""The pack stage: ternary codes (one byte each) -> the 2-bit or base-3 storage codec."""

from .artifacts import artifact_path, file_sha256, require
from .checkpoint import read_checkpoint, save_checkpoint
from .config import Config
from .models import build_meta_transformer
from .ternary import parameter_counts


def pack(cfg: Config) -> dict:
    """Re-encode the quantize stage's checkpoint with ``pack.codec``; report bytes vs bf16."""
    src = require(cfg.workdir, "quantize")
    ckpt = read_checkpoint(src)
    ternary = {m: (ckpt.codes(m), ckpt.tensors[f"{m}.scale"]) for m in ckpt.modules}
    owned = {f"{m}.{leaf}" for m in ckpt.modules for leaf in ("codes", "scale")}
    dense = {name: t for name, t in ckpt.tensors.items() if name not in owned}
    path = artifact_path(cfg.workdir, "pack")
    size = save_checkpoint(path, ternary, dense, cfg.pack.codec, {
        "base_model": ckpt.meta["base_model"], "revision": ckpt.meta["revision"], "stage": "pack",
        "activations": cfg.quantization.activations, "config": cfg.resolved(),
        "inputs": {"ternary": {"path": str(src), "sha256": file_sha256(src)}, **ckpt.meta["inputs"]},
    })
    bf16 = 2 * parameter_counts(build_meta_transformer(cfg.model))["total_params"]
    return {"stage": "pack", "path": str(path), "codec": cfg.pack.codec, "packed_bytes": size,
            "bf16_bytes": bf16, "storage_ratio": bf16 / size}
