"""Export the workdir's packed 1.58-bit transformer for other tools: one module per format.

- ``gguf``: GGUF with the ternary tensors as ggml TQ2_0, TQ1_0 or Q2_K (stable-diffusion.cpp, ComfyUI-GGUF);
- ``bfl``: one safetensors file in the original BFL key naming (ComfyUI, stable-diffusion.cpp,
  diffusers' ``from_single_file``), dequantized bf16 or ternary-coded;
- ``diffusers``: a transformer directory (config.json, the bitflux checkpoint, a model card), written
  by diffusers' ``save_pretrained`` through bitflux's quantizer; ``FluxTransformer2DModel.from_pretrained``
  loads it once ``bitflux_cli`` is imported.

Every format reads the checkpoint one tensor at a time (``CheckpointFile``) and records where it
came from (``provenance``): base model, its revision and weight hashes, method, codec, the packed
file's sha256. A low-rank residual (``quantization.residual_rank``) is folded into the dequantized
``bfl`` weights and carried as is by ``diffusers``; ``gguf`` and ``bfl --ternary`` have no place for it
and refuse such a checkpoint. So with a rotation (``quantization.rotation``): the dequantized ``bfl``
weights are ``(s q) R^T``, ``diffusers`` carries the signs, ``gguf`` and ``bfl --ternary`` refuse (their
readers would run the codes of ``W R`` on unrotated inputs).
"""

import json
from pathlib import Path

import torch

from ..artifacts import check_not_an_artifact, check_output_file, check_writable_dir, file_sha256, require
from bitflux_kernels import unrotate

from ..checkpoint import RESIDUAL, ROTATION, TOOL_VERSION, CheckpointFile
from ..config import Config
from ..errors import ArtifactError, UsageError
from ..loader import check_dense_tensors
from .keys import Entry, swap_halves

FORMATS = ("gguf", "bfl", "diffusers")
GGUF_CODECS = ("tq2_0", "tq1_0", "q2_k")
EXPORT_FILES = {"config.json", "diffusion_pytorch_model.safetensors", "README.md"}  # what --format diffusers writes


def method_of(meta: dict) -> str:
    """The quantization method recorded in a checkpoint's metadata."""
    return meta["inputs"].get("method") or meta["config"].get("quantization", {}).get("method", "unknown")


def provenance(ckpt: CheckpointFile, fmt: str) -> dict[str, str]:
    """String metadata for an exported file: the packed checkpoint's provenance fields and what was exported."""
    meta = ckpt.meta
    return {"bitflux.export": fmt, "tool_version": TOOL_VERSION, "base_model": meta["base_model"],
            "revision": meta["revision"], "method": method_of(meta), "codec": meta["codec"],
            "activations": meta["activations"],
            "source": json.dumps(meta["source"], sort_keys=True),
            "architecture": json.dumps(meta["architecture"], sort_keys=True),
            "config": json.dumps(meta["config"], sort_keys=True),
            "inputs": json.dumps({"packed": {"path": str(ckpt.path.resolve()), "sha256": file_sha256(ckpt.path)},
                                  **meta["inputs"]}, sort_keys=True)}


def dequantized(ckpt: CheckpointFile, module: str, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight [N, K] of a quantized module in ``dtype``: codes x per-row scale, plus ``up @ down``
    when the checkpoint has a residual, turned back by ``R^T`` when it has a rotation.

    A code is -1, 0 or 1, so ``code * dtype(scale)`` is exactly ``dtype(code * scale)``: without a
    residual or a rotation the product is formed in ``dtype`` directly, without an fp32 copy of the
    weight; with either, it is formed in fp32 and rounded to ``dtype`` once.
    """
    scale = ckpt.read(f"{module}.scale")  # [N] fp32
    if not (ckpt.residual_rank or ckpt.rotated):
        return ckpt.codes(module).to(dtype) * scale.to(dtype)[:, None]
    w = ckpt.codes(module).float() * scale[:, None]  # [N, K]
    if ckpt.residual_rank:
        up, down = (ckpt.read(f"{module}.{leaf}").float() for leaf in RESIDUAL)  # [N, r], [r, K]
        w += up @ down
    if ckpt.rotated:
        w = unrotate(w, ckpt.read(f"{module}.{ROTATION}"))  # W = (s q) R^T
    return w.to(dtype)


def bfl_tensor(ckpt: CheckpointFile, entry: Entry, dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """One tensor of the BFL checkpoint: its diffusers parts (quantized weights dequantized) stacked
    on dim 0, halves swapped where the table says; floats cast to ``dtype`` (None: as stored)."""
    parts = []
    for name in entry.parts:
        module, _, leaf = name.rpartition(".")
        t = dequantized(ckpt, module, dtype or torch.bfloat16) if leaf == "weight" and module in ckpt.modules \
            else ckpt.read(name)
        parts.append(t.to(dtype) if dtype is not None and t.is_floating_point() else t)
    t = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    return swap_halves(t) if entry.swap else t


def is_diffusers_export(directory: Path) -> bool:
    """Whether ``directory`` is a transformer directory that ``--format diffusers`` wrote (its config.json
    names bitflux's quantization) and that only its files are in, so that another export may replace it."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = {p.name for p in directory.iterdir()}
    return isinstance(config, dict) and isinstance(config.get("quantization_config"), dict) \
        and config["quantization_config"].get("quant_method") == "bitflux" and files <= EXPORT_FILES


def packed_checkpoint(cfg: Config) -> CheckpointFile:
    """The workdir's packed checkpoint, validated (a missing one names ``bitflux pack``)."""
    return CheckpointFile(require(cfg.workdir, "pack"))


def export(cfg: Config, fmt: str, out: Path, codec: str | None = None, ternary: bool = False) -> dict:
    """Write the workdir's packed transformer to ``out`` in ``fmt``; returns what was written."""
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt != "gguf" and codec is not None:
        raise UsageError(f"--codec applies to --format gguf only ({', '.join(GGUF_CODECS)})")
    if fmt != "bfl" and ternary:
        raise UsageError("--ternary applies to --format bfl only")
    if fmt == "diffusers":  # a directory, replaced as a whole
        if Path(out).exists() and not Path(out).is_dir():
            raise UsageError(f"OUT {out} is a file: --format diffusers writes a directory")
        check_not_an_artifact(out, "OUT", cfg.workdir)
        if Path(out).is_dir() and any(Path(out).iterdir()) and not is_diffusers_export(Path(out)):
            raise UsageError(f"OUT {out} is a directory with other files in it, which --format diffusers would replace "
                             "as a whole: give a new or empty directory (or an earlier bitflux export, to overwrite it)")
        check_writable_dir(Path(out).parent, f"OUT {out}: the directory")
    else:
        check_output_file(out, "OUT", cfg.workdir)  # before reading a 3 GB checkpoint
    ckpt = packed_checkpoint(cfg)
    if not ckpt.meta["architecture"]:
        raise ArtifactError(f"{ckpt.path} records no architecture (an older bitflux wrote it): run `bitflux pack` again")
    check_dense_tensors(ckpt)  # the recorded architecture builds, and its tensors are the file's
    if ckpt.residual_rank and (fmt == "gguf" or ternary):
        raise UsageError(f"{ckpt.path} has a rank-{ckpt.residual_rank} low-rank residual "
                         f"(quantization.residual_rank), which {'--format gguf' if fmt == 'gguf' else '--format bfl --ternary'} "
                         "cannot carry: export it with --format bfl (the residual folded into bf16 weights) or "
                         "--format diffusers, or quantize with quantization.residual_rank=0")
    if ckpt.rotated and (fmt == "gguf" or ternary):
        raise UsageError(f"{ckpt.path} holds the codes of rotated weights (quantization.rotation=hadamard), which "
                         f"{'--format gguf' if fmt == 'gguf' else '--format bfl --ternary'}'s readers would run on "
                         "unrotated inputs: export it with --format bfl (rotation folded into bf16 weights) or "
                         "--format diffusers, or quantize with quantization.rotation=none")
    if fmt == "gguf":
        try:
            from .gguf import write_gguf
        except ModuleNotFoundError as exc:
            if exc.name != "gguf":
                raise
            raise UsageError("--format gguf needs the gguf package: pip install 'bitflux[export]' (or gguf)") from None

        result = write_gguf(ckpt, Path(out), codec or "tq2_0")
    elif fmt == "bfl":
        from .bfl import write_bfl

        result = write_bfl(ckpt, Path(out), ternary)
    else:
        from .diffusers import write_diffusers_dir

        result = write_diffusers_dir(ckpt, Path(out))
    return {"stage": "export", "format": fmt, "path": str(out), "source": str(ckpt.path), **result}


def tensor_bytes(arch: dict, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes of the tensor data of each export of a transformer with constructor args ``arch``
    (headers not counted), from shapes alone: works on the meta device, e.g. for FLUX.1-dev.

    ``dtype_bytes``: the model dtype's size (2 for bf16). Keys: ``bf16`` (the FP transformer, and the
    BFL single file), ``packed_2bit`` / ``packed_base3`` (the bitflux checkpoint, the diffusers
    directory and ``bfl --ternary``), ``gguf_tq2_0`` / ``gguf_tq1_0`` / ``gguf_q2_k`` (1-D tensors as F32).
    """
    from bitflux_kernels.layout import base3_bytes, padded_k

    from ..models import build_meta_transformer
    from ..ternary import scoped_linears

    model = build_meta_transformer(arch)
    weights = {f"{n}.weight": tuple(m.weight.shape) for n, m in scoped_linears(model)}
    dense = {n: p.numel() for n, p in model.state_dict().items() if n not in weights}
    one_d = sum(p.numel() for n, p in model.state_dict().items() if p.dim() == 1)
    rows = sum(n for n, _ in weights.values())
    total = sum(p.numel() for p in model.state_dict().values())
    out = {"bf16": total * dtype_bytes}
    out["packed_2bit"] = sum(n * padded_k(k) // 4 for n, k in weights.values()) + 4 * rows + sum(dense.values()) * dtype_bytes
    out["packed_base3"] = sum(base3_bytes(n, k) for n, k in weights.values()) + 4 * rows + sum(dense.values()) * dtype_bytes
    for codec, block in (("tq2_0", 66), ("tq1_0", 54), ("q2_k", 84)):
        out[f"gguf_{codec}"] = sum(n * k // 256 * block for n, k in weights.values()) + one_d * 4 \
            + (sum(dense.values()) - one_d) * dtype_bytes
    return out
