"""Model sources: the embedded mini FLUX (offline, deterministic) or FLUX.1 through diffusers."""

from importlib import resources
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from ..artifacts import file_sha256
from ..config import ModelConfig
from ..errors import ModelUnavailableError, UsageError
from ..miniworld import model as mini
from ..streaming import Weights, materialise, skeleton

EMBEDDED = "embedded"

# The FLUX.1 transformer architectures, so that accounting needs no download.
_FLUX = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
             attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
             pooled_projection_dim=768, axes_dims_rope=[16, 56, 56])
KNOWN_ARCHITECTURES = {
    "black-forest-labs/FLUX.1-dev": {**_FLUX, "guidance_embeds": True},
    "black-forest-labs/FLUX.1-schnell": {**_FLUX, "guidance_embeds": False},
}


def torch_dtype(cfg: ModelConfig) -> torch.dtype:
    """The compute dtype named by the config."""
    return getattr(torch, cfg.dtype)


def resolve_device(cfg: ModelConfig, component: str = "transformer") -> torch.device:
    """The device of a pipeline component: ``model.device`` (one for all, or one per component,
    the transformer's by default), "auto" meaning cuda when present, else cpu."""
    name = cfg.device.get(component, cfg.device.get("transformer", "auto")) if isinstance(cfg.device, dict) else cfg.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"model.device {name}: this machine has {torch.cuda.device_count()} CUDA devices "
                         "(use cpu, or auto: cuda when present)")
    return device


def place(pipe: FluxPipeline, cfg: ModelConfig) -> FluxPipeline:
    """Put the pipeline where ``model.offload`` says: ``none``, each component on its ``model.device``;
    ``model``, diffusers' model CPU offload (one whole component on the device at a time);
    ``sequential``, diffusers' group offload by blocks (one transformer or encoder block on the
    device at a time, the rest in host memory)."""
    device = resolve_device(cfg)
    if cfg.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif cfg.offload == "sequential":
        pipe.enable_group_offload(onload_device=device, offload_type="block_level", num_blocks_per_group=1)
    else:
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                component.to(resolve_device(cfg, name))
    return pipe


def embedded_weights(cfg: ModelConfig) -> Path | None:
    """The mini model's weight directory: ``model.path``, else the bundled trained weights if shipped."""
    if cfg.path is not None:
        if not cfg.path.is_dir():
            raise UsageError(f"model.path {cfg.path}: no such directory (the mini model's weights: transformer.safetensors and its siblings)")
        return cfg.path
    bundled = Path(str(resources.files("bitflux_cli") / "assets" / "mini"))
    return bundled if (bundled / "transformer.safetensors").is_file() else None


def model_id(cfg: ModelConfig) -> str:
    """A stable name of the base model for artifact metadata: the hub id, or a local directory's absolute path."""
    if cfg.source == EMBEDDED:
        weights = embedded_weights(cfg)
        return "embedded:mini-flux" + ("" if weights is None else f":{weights.name}")
    return str(Path(cfg.path).resolve()) if cfg.path is not None else cfg.source


# the diffusers folders of a FLUX repository (it also holds BFL single files bitflux never reads)
_DIFFUSERS_FILES = ["model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
                    "tokenizer_2/*", "transformer/*", "vae/*"]


def model_dir(cfg: ModelConfig) -> Path:
    """The local diffusers directory: ``model.path``, or the hub snapshot (from the HF cache, downloaded once)."""
    if cfg.path is not None:
        if not (Path(cfg.path) / "model_index.json").is_file():
            raise _unavailable(cfg, FileNotFoundError(f"{cfg.path} is not a diffusers directory (no model_index.json)"))
        return Path(cfg.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(cfg.source, revision=cfg.revision, allow_patterns=_DIFFUSERS_FILES))
    except Exception as exc:
        raise _unavailable(cfg, exc) from None


def transformer_weights(cfg: ModelConfig) -> Weights:
    """The FP transformer's safetensors files, read tensor by tensor."""
    if cfg.source == EMBEDDED:
        weights = embedded_weights(cfg)
        if weights is None:
            raise ModelUnavailableError("the embedded model's weights are not installed (bitflux_cli/assets/mini)")
        return Weights([weights / "transformer.safetensors"])
    return Weights.from_dir(model_dir(cfg) / "transformer")


def fp_skeleton(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[FluxTransformer2DModel, Weights]:
    """The FP transformer with its blocks left on the meta device (``streaming``), and its weights."""
    weights = transformer_weights(cfg)
    return skeleton(build_meta_transformer(cfg), weights, torch_dtype(cfg), device), weights


def provenance(cfg: ModelConfig) -> dict:
    """Where the base model came from: hub id and resolved revision (the snapshot's commit), or a
    local directory's absolute path; with the sha256 of each transformer weight file."""
    out = {"base_model": model_id(cfg), "revision": cfg.revision or ""}
    if cfg.source != EMBEDDED and cfg.path is None:
        out["revision"] = model_dir(cfg).name  # snapshots/<commit hash>
    files = transformer_weights(cfg).files
    out["weights_sha256"] = {f.name: file_sha256(f) for f in files}
    return out


def _unavailable(cfg: ModelConfig, exc: Exception) -> ModelUnavailableError:
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelUnavailableError(
        f"cannot load {cfg.path or cfg.source} ({cause}); download it with "
        f"`huggingface-cli download {cfg.source}` or set model.path to a local diffusers directory")


def transformer_config(cfg: ModelConfig) -> dict:
    """Constructor arguments of the transformer, read without loading weights."""
    if cfg.source == EMBEDDED:
        return mini.transformer_config()
    if cfg.path is None and cfg.source in KNOWN_ARCHITECTURES:
        return dict(KNOWN_ARCHITECTURES[cfg.source])  # no hub round trip (offline it retries for ~20 s)
    try:
        loc = str(cfg.path) if cfg.path is not None else cfg.source
        conf = FluxTransformer2DModel.load_config(loc, subfolder="transformer", revision=cfg.revision)
        return architecture(conf)
    except Exception as exc:
        raise _unavailable(cfg, exc) from None


def architecture(conf: dict) -> dict:
    """Constructor arguments of ``FluxTransformer2DModel`` from a config dict (private keys dropped)."""
    return {k: v for k, v in conf.items() if not k.startswith("_")}


def build_meta_transformer(cfg: ModelConfig | dict) -> FluxTransformer2DModel:
    """The transformer architecture (of a model config, or constructor arguments) on the meta device."""
    with torch.device("meta"):
        return FluxTransformer2DModel(**(transformer_config(cfg) if isinstance(cfg, ModelConfig) else cfg))


def load_fp_transformer(cfg: ModelConfig, device: torch.device | str = "cpu") -> FluxTransformer2DModel:
    """The whole full-precision transformer in the config's dtype on ``device``, read block by block."""
    transformer, weights = fp_skeleton(cfg, device)
    return materialise(transformer, weights, device)


def load_pipeline(cfg: ModelConfig, transformer: torch.nn.Module | None = None) -> FluxPipeline:
    """The text-to-image pipeline; ``transformer`` (a 1.58-bit one, or an FP skeleton) replaces the FP transformer."""
    if cfg.source == EMBEDDED:
        return mini.build_pipeline(embedded_weights(cfg), torch_dtype(cfg), transformer)
    extra = {} if transformer is None else {"transformer": transformer}
    root = model_dir(cfg)
    try:
        return FluxPipeline.from_pretrained(str(root), torch_dtype=torch_dtype(cfg), **extra)
    except Exception as exc:
        raise _unavailable(cfg, exc) from None
