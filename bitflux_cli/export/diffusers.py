"""diffusers-directory export: a transformer folder as ``save_pretrained`` lays it out.

    OUT/config.json                            FluxTransformer2DModel's config + quantization_config
    OUT/diffusion_pytorch_model.safetensors    the packed bitflux checkpoint, byte for byte
    OUT/README.md                              a model card generated from the checkpoint's metadata

``bitflux_cli.integrations.diffusers.from_pretrained(OUT)`` loads it (packed buffers, no FP weights)
into a transformer that ``FluxPipeline`` takes. Plain ``FluxTransformer2DModel.from_pretrained(OUT)``
without bitflux stops at the unknown ``quant_method`` "bitflux" instead of loading random weights.
"""

import json
import shutil
from pathlib import Path

import diffusers

from ..artifacts import atomic_dir
from ..checkpoint import FORMAT, FORMAT_VERSION, CheckpointFile
from ..ternary import parameter_counts
from ..models import build_meta_transformer
from . import method_of

WEIGHTS = "diffusion_pytorch_model.safetensors"
QUANT_METHOD = "bitflux"


def quantization_config(meta: dict) -> dict:
    """The ``quantization_config`` entry of config.json for a checkpoint's metadata."""
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "format_version": FORMAT_VERSION, "codec": meta["codec"],
            "activations": meta["activations"], "method": method_of(meta)}


def write_diffusers_dir(ckpt: CheckpointFile, out: Path) -> dict:
    """Write the transformer directory at ``out`` (replaced atomically); returns its files' sizes."""
    meta = ckpt.meta
    config = {"_class_name": "FluxTransformer2DModel", "_diffusers_version": diffusers.__version__,
              **meta["architecture"], "quantization_config": quantization_config(meta)}
    with atomic_dir(out) as tmp:
        shutil.copyfile(ckpt.path, tmp / WEIGHTS)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(meta, (tmp / WEIGHTS).stat().st_size))
    files = {p.name: p.stat().st_size for p in sorted(Path(out).iterdir())}
    return {"bytes": sum(files.values()), "files": files}


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
    fidelity = meta.get("fidelity")
    fidelity = f"```json\n{fidelity}\n```" if fidelity else (
        "not recorded in the checkpoint: `bitflux quantize` prints the fidelity report (per-block relative error, "
        "velocity error, image PSNR against the full-precision model) when it makes it.")
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
        f"| activations | `{meta['activations']}` ({'W2A16' if meta['activations'] == 'none' else 'W2A8'}) |",
        f"| codec | `{meta['codec']}` ({FORMAT} v{FORMAT_VERSION}) |",
        f"| quantized | {counts['quantized_modules']} linears, {100 * counts['fraction']:.2f}% of "
        f"{counts['total_params'] / 1e9:.3g}B parameters |",
        f"| file | {WEIGHTS}, {size / 2**20:.1f} MiB |",
        f"| base weights sha256 | {', '.join(f'`{k}`: `{v[:16]}...`' for k, v in source.get('weights_sha256', {}).items())} |",
        "", "## Fidelity", "", fidelity, "",
        "## Use", "", "```python", "import torch", "from diffusers import FluxPipeline",
        "from bitflux_cli.integrations.diffusers import from_pretrained", "",
        "transformer = from_pretrained(\"THIS_DIRECTORY_OR_REPO\")  # packed 2-bit buffers, no FP weights",
        f"pipe = FluxPipeline.from_pretrained(\"{base if hub_id else 'black-forest-labs/FLUX.1-dev'}\", "
        "transformer=transformer, torch_dtype=torch.bfloat16)", "```", "",
        "Plain `FluxTransformer2DModel.from_pretrained` does not know `quant_method: bitflux` and refuses the "
        "directory; install bitflux to load it.", ""])
