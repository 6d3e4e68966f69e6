"""The quantize stage: full-precision transformer -> ternary codes and scales (codec int8)."""

import copy

import torch

from .artifacts import artifact_path, file_sha256
from .calibrate import load_calibration
from .checkpoint import save_checkpoint
from .config import Config
from .console import info
from .distributed import init_distributed
from .fidelity import fidelity_report
from .methods import METHODS, NEEDS_CALIBRATION
from .models import build_meta_transformer, load_pipeline, model_id, resolve_device
from .ternary import parameter_counts, quantize_transformer


def dense_state(transformer: torch.nn.Module, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every tensor of the FP state dict except the weights that became ternary."""
    return {k: v for k, v in transformer.state_dict().items()
            if not (k.endswith(".weight") and k.removesuffix(".weight") in quantized)}


def quantize(cfg: Config) -> dict:
    """Quantize the config's transformer with ``quantization.method``; write ``ternary/`` and report.

    Runs calibration first when the method needs it and the workdir has none. Under torchrun every
    rank runs the method (distill shards its training over them); rank 0 alone writes and reports.
    """
    rank, world = init_distributed()
    method = METHODS[cfg.quantization.method]
    counts = parameter_counts(build_meta_transformer(cfg.model))
    pipe = load_pipeline(cfg.model).to(resolve_device(cfg.model))
    teacher = pipe.transformer
    info(f"quantizing {counts['quantized_modules']} linears of {model_id(cfg.model)} with {cfg.quantization.method}")
    calib = load_calibration(cfg) if cfg.quantization.method in NEEDS_CALIBRATION else None
    codes = method(cfg, pipe, calib)  # {module: (codes [N, K] int8, scale [N] fp32)}
    if rank != 0:
        return {"stage": "quantize", "method": cfg.quantization.method, "rank": rank, "world_size": world}

    path = artifact_path(cfg.workdir, "quantize")
    size = save_checkpoint(path, codes, dense_state(teacher, set(codes)), "int8", {
        "base_model": model_id(cfg.model), "revision": cfg.model.revision, "stage": "quantize",
        "activations": cfg.quantization.activations, "config": cfg.resolved(),
        "inputs": {"method": cfg.quantization.method,
                   "calibration_sha256": None if calib is None else file_sha256(calib.path / "manifest.json")},
    })
    student = copy.deepcopy(teacher)
    quantize_transformer(student, codes, cfg.quantization.activations)
    info("measuring fidelity against the full-precision teacher")
    report = fidelity_report(cfg, pipe, student)
    return {"stage": "quantize", "path": str(path), "bytes": size, "method": cfg.quantization.method,
            "activations": cfg.quantization.activations, **counts, "fidelity": report}
