"""Where models come from: the embedded mini FLUX, a hub id or a local diffusers directory."""

from .source import (
    EMBEDDED,
    build_meta_transformer,
    load_fp_transformer,
    load_pipeline,
    model_id,
    resolve_device,
    torch_dtype,
    transformer_config,
)

__all__ = ["EMBEDDED", "build_meta_transformer", "load_fp_transformer", "load_pipeline", "model_id",
           "resolve_device", "torch_dtype", "transformer_config"]
