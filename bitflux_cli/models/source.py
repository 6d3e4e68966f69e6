"""Model sources: the embedded mini FLUX (offline, deterministic) or FLUX.1 through diffusers."""

from importlib import resources
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from ..config import ModelConfig
from ..errors import ModelUnavailableError
from ..miniworld import model as mini

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


def resolve_device(cfg: ModelConfig) -> torch.device:
    """``model.device``, with "auto" meaning cuda when present, else cpu."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def embedded_weights(cfg: ModelConfig) -> Path | None:
    """The mini model's weight directory: ``model.path``, else the bundled trained weights if shipped."""
    if cfg.path is not None:
        return cfg.path
    bundled = Path(str(resources.files("bitflux_cli") / "assets" / "mini"))
    return bundled if (bundled / "transformer.safetensors").is_file() else None


def model_id(cfg: ModelConfig) -> str:
    """A stable name of the base model for artifact metadata."""
    if cfg.source == EMBEDDED:
        weights = embedded_weights(cfg)
        return "embedded:mini-flux" + ("" if weights is None else f":{weights.name}")
    return str(cfg.path or cfg.source)


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
        return {k: v for k, v in conf.items() if not k.startswith("_")}
    except Exception as exc:
        raise _unavailable(cfg, exc) from None


def build_meta_transformer(cfg: ModelConfig) -> FluxTransformer2DModel:
    """The transformer architecture on the meta device: shapes and counts, no memory."""
    with torch.device("meta"):
        return FluxTransformer2DModel(**transformer_config(cfg))


def load_fp_transformer(cfg: ModelConfig) -> FluxTransformer2DModel:
    """The full-precision transformer in the config's dtype, on CPU."""
    if cfg.source == EMBEDDED:
        return mini.build_pipeline(embedded_weights(cfg), torch_dtype(cfg)).transformer
    try:
        return FluxTransformer2DModel.from_pretrained(str(cfg.path or cfg.source), subfolder="transformer",
                                                      revision=cfg.revision, torch_dtype=torch_dtype(cfg))
    except Exception as exc:
        raise _unavailable(cfg, exc) from None


def load_pipeline(cfg: ModelConfig, transformer: torch.nn.Module | None = None) -> FluxPipeline:
    """The text-to-image pipeline; ``transformer`` (e.g. a 1.58-bit one) replaces the FP transformer."""
    if cfg.source == EMBEDDED:
        return mini.build_pipeline(embedded_weights(cfg), torch_dtype(cfg), transformer)
    extra = {} if transformer is None else {"transformer": transformer}
    try:
        return FluxPipeline.from_pretrained(str(cfg.path or cfg.source), revision=cfg.revision,
                                            torch_dtype=torch_dtype(cfg), **extra)
    except Exception as exc:
        raise _unavailable(cfg, exc) from None
