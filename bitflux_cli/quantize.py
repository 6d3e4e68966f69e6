"""The quantize stage: the FP transformer, streamed one block at a time -> ternary codes and scales (codec int8).

For the block methods (absmean, act-aware, block-recon) only one FP block is ever materialised: it is
read from the model's safetensors shards, quantized, measured by the fidelity probe, written to a
part file, and dropped. The parts are then joined into ``ternary/transformer.safetensors`` one tensor
at a time. ``distill`` trains the whole model at once, so it materialises the transformer first.
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .artifacts import artifact_path, file_sha256
from .calibrate import load_calibration
from .checkpoint import ROTATION, ternary_specs, write_checkpoint
from .config import Config
from .console import info, progress
from .distributed import init_distributed
from .errors import UsageError
from .fidelity import REPORT_PROMPTS, FidelityProbe, forget_other_reports, record_report
from .loader import load_quantized_transformer
from .methods import BLOCK_METHODS, METHODS, NEEDS_CALIBRATION
from .models import build_meta_transformer, provenance, resolve_device, transformer_config
from .residual import block_residuals, check_rank
from .rotation import rotation_signs
from .streaming import BLOCK_LISTS, block_names, load_block, materialise
from .teacher import encode, fp_pipeline, free_text_encoders
from .tensorfile import TensorFile
from .ternary import TernaryLinear, _set_submodule, block_linears, parameter_counts


def _to_ternary(block: torch.nn.Module, codes: dict, activations: str, residuals: dict, rotations: dict) -> torch.nn.Module:
    """``block`` with its linears replaced in place by ``TernaryLinear``s of {linear: (codes, scale)},
    {linear: (up, down)} (empty: no residual) and {linear: signs [K]} (empty: no rotation)."""
    for sub, lin in block_linears(block):
        _set_submodule(block, sub, TernaryLinear.from_codes(*codes[sub], lin.bias, activations, residuals.get(sub),
                                                            rotations.get(sub)))
    return block


def _write_part(file: Path, name: str, block: torch.nn.Module, codes: dict, residuals: dict, rotations: dict) -> None:
    """One block's codes, scales, residuals, rotation signs and remaining tensors (norms, biases), full names,
    in a part file."""
    quantized = {f"{sub}.weight" for sub in codes}
    tensors = {f"{name}.{k}": v for k, v in block.state_dict().items() if k not in quantized}
    for sub, (c, s) in codes.items():
        tensors |= {f"{name}.{sub}.codes": c.cpu().contiguous(), f"{name}.{sub}.scale": s.detach().float().cpu()}
    for sub, (up, down) in residuals.items():
        tensors |= {f"{name}.{sub}.residual_up": up, f"{name}.{sub}.residual_down": down}
    tensors |= {f"{name}.{sub}.{ROTATION}": signs for sub, signs in rotations.items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(file))


def _join(path: Path, parts: list[Path], outside: dict[str, torch.Tensor], modules: dict, meta: dict) -> int:
    """The ternary checkpoint from the part files and the tensors outside the blocks, one tensor at a time."""
    specs = {k: (v.dtype, tuple(v.shape), lambda v=v: v) for k, v in outside.items()}
    for part in map(TensorFile, parts):
        for name, e in part.entries.items():
            module, _, leaf = name.rpartition(".")
            if module in modules and leaf == "codes":
                specs |= ternary_specs(module, modules[module], "int8", lambda p=part, n=name: p.read(n),
                                       lambda p=part, m=module: p.read(f"{m}.scale"))
            elif not (module in modules and leaf == "scale"):
                specs[name] = (e.dtype, e.shape, lambda p=part, n=name: p.read(n))
    return write_checkpoint(path, {m: list(s) for m, s in modules.items()}, specs, "int8", meta)


def quantize(cfg: Config) -> dict:
    """Quantize the config's transformer with ``quantization.method``; write ``ternary/`` and report.

    Inputs (model files, prompt files, calibration) are checked before any weight is read.
    Calibration runs first when the method needs it and the workdir has none. Under torchrun every
    rank runs distill (it shards its training); rank 0 alone writes and reports. With
    ``quantization.residual_rank`` > 0 each linear also gets its low-rank residual (``residual``):
    block-recon's, trained with its codes; for the other methods fitted after them, weighted by the
    calibration's input statistics when the method has them. With ``quantization.rotation: hadamard`` the
    codes (and residuals) are those of each linear's ``W R``, and the file holds the rotation's signs.
    """
    rank, world = init_distributed()
    name, residual_rank, rotation = cfg.quantization.method, cfg.quantization.residual_rank, cfg.quantization.rotation
    if rotation != "none" and name not in BLOCK_METHODS:
        raise UsageError(f"quantization.rotation={rotation} works with the block methods ({', '.join(sorted(BLOCK_METHODS))}); "
                         f"{name} trains unrotated layers: use --method block-recon, or quantization.rotation=none")
    activations = cfg.quantization.activations or "none"  # the mode the file records
    meta_model = build_meta_transformer(cfg.model)
    check_rank(meta_model, residual_rank)
    counts = parameter_counts(meta_model)
    source = provenance(cfg.model)  # refuses a missing model before anything loads
    calib = load_calibration(cfg) if name in NEEDS_CALIBRATION else None
    if rank != 0 and name in BLOCK_METHODS:
        return {"stage": "quantize", "method": name, "rank": rank, "world_size": world}
    device = resolve_device(cfg.model)
    info(f"quantizing {counts['quantized_modules']} linears of {source['base_model']} with {name}")
    prompts = REPORT_PROMPTS[: cfg.quantization.eval_prompts]
    with fp_pipeline(cfg, stream=True) as (pipe, weights):
        pipe.set_progress_bar_config(disable=True)
        embeds = encode(pipe, prompts, cfg.generate.max_sequence_length)
        free_text_encoders(pipe)
        probe = FidelityProbe(cfg, pipe, embeds) if rank == 0 else None
    skeleton = pipe.transformer
    if name in BLOCK_METHODS:
        quantize_block = METHODS[name](cfg, skeleton, calib)
    else:
        materialise(skeleton, weights, device)
        trained = METHODS[name](cfg, pipe, calib, release_teacher=True)  # distill, the one method that is not streamed
        for lst in BLOCK_LISTS:
            getattr(skeleton, lst).to("meta")
        if rank != 0:
            return {"stage": "quantize", "method": name, "rank": rank, "world_size": world}

        def quantize_block(block_name: str, block) -> dict:  # the trained codes, looked up
            return {sub: trained[f"{block_name}.{sub}"] for sub, _ in block_linears(block)}

    path = artifact_path(cfg.workdir, "quantize")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(".parts-*"):  # left by a killed run (the stage lock keeps out a live one)
        shutil.rmtree(stale, ignore_errors=True)
    modules, parts = {}, []
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".parts-") as tmp:
        names = block_names(skeleton)
        with progress("quantize", len(names), "blocks") as block_done:
            for block_name in names:
                block = load_block(skeleton, weights, block_name, device)
                made = quantize_block(block_name, block)  # {linear: (codes, scale[, (up, down)])}
                codes = {sub: v[:2] for sub, v in made.items()}
                residuals = ({sub: v[2] for sub, v in made.items() if len(v) == 3}
                             or block_residuals(block_name, block, codes, residual_rank, calib, rotation))
                rotations = {sub: signs for sub, lin in block_linears(block)
                             if (signs := rotation_signs(rotation, lin.in_features)) is not None}  # {} without
                probe.fp_step(block_name, block)
                parts.append(Path(tmp) / f"{len(parts):03d}.safetensors")
                _write_part(parts[-1], block_name, block, codes, residuals, rotations)
                probe.q_step(block_name, _to_ternary(block, codes, activations, residuals, rotations))
                modules |= {f"{block_name}.{sub}": tuple(c.shape) for sub, (c, _) in codes.items()}
                del block, made, codes, residuals, rotations
                block_done()
        inside = tuple(f"{lst}." for lst in BLOCK_LISTS)
        outside = {k: v for k, v in skeleton.state_dict().items() if not k.startswith(inside)}
        # joined in the parts directory and measured there: the checkpoint appears under its name
        # only once its fidelity report is written (a kill in between leaves the previous pair whole)
        joined = Path(tmp) / path.name
        size = _join(joined, parts, outside, modules, {
            "base_model": source["base_model"], "revision": source["revision"], "stage": "quantize",
            "activations": activations, "config": cfg.resolved(),
            "architecture": transformer_config(cfg.model), "source": source,
            "inputs": {"method": name,
                       "calibration_sha256": None if calib is None else file_sha256(calib.path / "manifest.json")},
        })
        info("measuring fidelity against the full-precision teacher")
        report = probe.report(skeleton, pipe, load_quantized_transformer(joined, device=device), embeds)
        recorded = record_report(joined, report, path)  # pack puts it in the packed file's metadata (the model card shows it)
        os.replace(joined, path)
    forget_other_reports(recorded)
    return {"stage": "quantize", "path": str(path), "bytes": size, "method": name,
            "activations": activations, "residual_rank": residual_rank, "rotation": rotation, **counts, "fidelity": report}
