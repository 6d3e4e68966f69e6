"""Where models come from: the embedded mini FLUX, a hub id or a local diffusers directory."""

from .source import (
    EMBEDDED,
    architecture,
    build_meta_transformer,
    fp_skeleton,
    load_fp_transformer,
    load_pipeline,
    model_dir,
    model_id,
    place,
    provenance,
    resolve_device,
    torch_dtype,
    transformer_config,
    transformer_weights,
)

__all__ = ["EMBEDDED", "architecture", "build_meta_transformer", "fp_skeleton", "load_fp_transformer", "load_pipeline",
           "model_dir", "model_id", "place", "provenance", "resolve_device", "torch_dtype", "transformer_config",
           "transformer_weights"]
