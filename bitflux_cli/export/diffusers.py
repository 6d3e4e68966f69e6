"""diffusers-directory export: a transformer folder exactly as ``save_pretrained`` writes it.

    OUT/config.json                            FluxTransformer2DModel's config + quantization_config
    OUT/diffusion_pytorch_model.safetensors    the packed bitflux checkpoint (same tensors and metadata)
    OUT/README.md                              a model card generated from the checkpoint's metadata

It is written by diffusers' own ``FluxTransformer2DModel.from_pretrained`` of the packed checkpoint and
``save_pretrained`` (``integrations.diffusers_quantizer``), so it is what any later ``save_pretrained``
or ``push_to_hub`` of the loaded model writes. With bitflux imported, diffusers loads it (packed
weights, no FP weights); without, diffusers stops at the unknown ``quant_method`` "bitflux" instead
of loading random weights.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import diffusers

from ..artifacts import atomic_dir
from ..checkpoint import FORMAT, CheckpointFile, model_dtype
from ..ternary import parameter_counts
from ..models import build_meta_transformer
from . import method_of

MODE_NAMES = {"none": "W2A16", "int8": "W2A8, int8", "fp8": "W2A8, float8 e4m3"}

WEIGHTS = "diffusion_pytorch_model.safetensors"
QUANT_METHOD = "bitflux"


def quantization_config(ckpt: CheckpointFile) -> dict:
    """The ``quantization_config`` entry of config.json for a checkpoint (``BitfluxConfig``'s fields)."""
    meta = ckpt.meta
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "format_version": int(meta["format_version"]), "codec": meta["codec"],
            "activations": meta["activations"], "method": method_of(meta), "dtype": model_dtype(ckpt)}


def write_diffusers_dir(ckpt: CheckpointFile, out: Path) -> dict:
    """Write the transformer directory at ``out`` (replaced atomically); returns its files' sizes.

    The packed checkpoint is staged (config.json beside a link to it), loaded by diffusers'
    ``from_pretrained`` and written by ``save_pretrained``: no other writer of this format exists.
    """
    from diffusers import FluxTransformer2DModel

    from ..integrations.diffusers_quantizer import register

    register()
    config = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": diffusers.__version__,
              **ckpt.meta["architecture"], "quantization_config": quantization_config(ckpt)}
    with atomic_dir(out) as tmp, tempfile.TemporaryDirectory(prefix="bitflux-export-") as stage:
        (Path(stage) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        try:
            os.symlink(ckpt.path.resolve(), Path(stage) / WEIGHTS)
        except OSError:
            shutil.copyfile(ckpt.path, Path(stage) / WEIGHTS)
        transformer = FluxTransformer2DModel.from_pretrained(stage)
        transformer.register_to_config(_name_or_path=str(ckpt.path.resolve()))  # not the staging directory
        transformer.save_pretrained(tmp)
    files = {p.name: p.stat().st_size for p in sorted(Path(out).iterdir())}
    return {"bytes": sum(files.values()), "files": files}


def fidelity_lines(report: dict | None) -> list[str]:
    """The card's fidelity table from quantize's report recorded in the checkpoint ([] if none)."""
    if not report:
        return []
    try:
        blocks = {k: float(v) for k, v in report.get("block_rel_error", {}).items()}
        worst = max(blocks, key=blocks.get)
        return [f"Measured by `bitflux quantize` against the full-precision model on {int(report['prompts'])} "
                "held-out prompts, same seeds:", "", "| | |", "|---|---|",
                f"| velocity relative error | {float(report['velocity_rel_error']):.4f} |",
                f"| image PSNR vs full precision | {float(report['image_psnr_db']):.2f} dB |",
                f"| block output relative error | mean {sum(blocks.values()) / len(blocks):.4f}, worst "
                f"{blocks[worst]:.4f} (`{worst}`) |"]
    except (KeyError, TypeError, ValueError, AttributeError):  # an edited header: show it as it is
        return ["```json", json.dumps(report, sort_keys=True), "```"]


def model_card(meta: dict, size: int) -> str:
    """A hub model card naming the base model, method, calibration, codec and fidelity."""
    base, cfg = meta["base_model"], meta["config"]
    hub_id = "/" in base and not base.startswith(("/", "embedded:")) and not Path(base).exists()
    counts = parameter_counts(build_meta_transformer(meta["architecture"]))
    method = method_of(meta)
    calib = meta["inputs"].get("calibration_sha256")
    calibration = "none (this method needs no calibration)" if not calib else (
        f"prompt sets {cfg['calibration']['prompts']['sets']}, limit {cfg['calibration']['prompts']['limit']}, "
        f"{cfg['calibration']['steps']} steps, {cfg['calibration']['timesteps']} timesteps recorded "
        f"(manifest sha256 `{calib}`)")
    fidelity = fidelity_lines(meta.get("fidelity")) or [
        "Not recorded in the checkpoint (made before bitflux recorded it, or its `ternary/fidelity-*.json` was missing "
        "when it was packed): `bitflux quantize` prints the report (per-block relative error, velocity error, "
        "image PSNR against the full-precision model)."]
    front = ["---", "library_name: diffusers", "pipeline_tag: text-to-image",
             "tags: [flux, ternary, 1.58-bit, bitflux]", *([f"base_model: {base}"] if hub_id else []), "---"]
    source = meta["source"]
    return "\n".join(front + [
        f"# {base.rsplit('/', 1)[-1]}, 1.58-bit ({method})", "",
        f"The FLUX transformer of `{base}`" + (f" (revision `{meta['revision']}`)" if meta["revision"] else "")
        + f" with every linear of its double and single blocks ternary ({{-1, 0, +1}} x a per-row scale), "
        f"made by bitflux after \"1.58-bit FLUX\" (arXiv 2412.18653), post-training.", "",
        "| | |", "|---|---|",
        f"| base model | `{base}` |",
        f"| method | `{method}` |",
        f"| calibration | {calibration} |",
        f"| activations | `{meta['activations']}` ({MODE_NAMES[meta['activations']]}) |",
        f"| codec | `{meta['codec']}` ({FORMAT} v{meta['format_version']}) |",
        *([f"| residual | rank {meta['residual_rank']} bf16 low-rank correction beside each ternary weight "
           "(`quantization.residual_rank`): not pure ternary |"] if meta.get("residual_rank") else []),
        *(["| rotation | randomized Hadamard on each linear's input (`quantization.rotation`): the codes are "
           "those of `W R`; pure ternary, needs bitflux's runtime |"] if meta.get("rotation") else []),
        f"| quantized | {counts['quantized_modules']} linears, {100 * counts['fraction']:.2f}% of "
        f"{counts['total_params'] / 1e9:.3g}B parameters |",
        f"| file | {WEIGHTS}, {size / 2**20:.1f} MiB |",
        f"| base weights sha256 | {', '.join(f'`{k}`: `{v[:16]}...`' for k, v in source.get('weights_sha256', {}).items())} |",
        "", "## Fidelity", "", *fidelity, "",
        "## Use", "", "```python", "import torch", "import bitflux_cli  # registers quant_method \"bitflux\" with diffusers",
        "from diffusers import FluxPipeline, FluxTransformer2DModel", "",
        "transformer = FluxTransformer2DModel.from_pretrained(\"THIS_DIRECTORY_OR_REPO\")  # packed 2-bit weights, no FP copies",
        f"pipe = FluxPipeline.from_pretrained(\"{base if hub_id else 'black-forest-labs/FLUX.1-dev'}\", "
        "transformer=transformer, torch_dtype=torch.bfloat16)", "```", "",
        "`save_pretrained` and `push_to_hub` of the loaded transformer write this directory again. Without bitflux, "
        "diffusers does not know `quant_method: bitflux` and refuses the directory: `pip install bitflux`.", ""])
