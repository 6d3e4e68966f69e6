"""Loading a 1.58-bit transformer: built on the meta device, packed buffers assigned in place."""

from pathlib import Path

import torch

from .artifacts import artifact_path, require
from .checkpoint import read_checkpoint, to_runtime_2bit
from .config import Config, ModelConfig
from .console import info
from .errors import ArtifactError
from .models import EMBEDDED, build_meta_transformer
from .ternary import replace_with_ternary, scoped_linears


def load_quantized_transformer(path: Path, model: ModelConfig | None = None, activations: str | None = None,
                               device: torch.device | str = "cpu") -> torch.nn.Module:
    """Build the FLUX transformer from a bitflux checkpoint without materialising FP weights.

    The architecture comes from ``model`` (default: the model config recorded in the file); it is
    built on the meta device, its in-scope linears become ``TernaryLinear`` shells, and the stored
    tensors are assigned (base-3 and int8 codecs are re-encoded to the 2-bit runtime layout).
    ``activations`` overrides the recorded activation mode ("none" or "int8").
    """
    ckpt = read_checkpoint(path)
    model = model or Config.model_validate(ckpt.meta["config"]).model
    transformer = build_meta_transformer(model)
    expected = {name: (m.out_features, m.in_features) for name, m in scoped_linears(transformer)}
    if expected != ckpt.modules:
        missing = sorted(set(expected) ^ set(ckpt.modules)) or [n for n in expected if expected[n] != ckpt.modules[n]]
        raise ArtifactError(f"{path}: quantized layers do not match the {model.source} architecture (e.g. {missing[0]})")
    replace_with_ternary(transformer, list(expected), activations or ckpt.meta["activations"])

    state = {}
    for name, t in ckpt.tensors.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "codes":
            n, k = ckpt.modules[module]
            state[f"{module}.packed"] = to_runtime_2bit(t, ckpt.meta["codec"], n, k)
        else:
            state[name] = t
    try:
        transformer.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{path}: does not match the {model.source} transformer ({str(exc).splitlines()[0]})") from None
    return transformer.to(device).eval()


def packed_transformer(cfg: Config, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The workdir's packed 1.58-bit transformer, in the config's activation mode.

    With the embedded model a missing checkpoint is made first (quantize, then pack: seconds), so
    ``bitflux generate`` works on a fresh install; with a real FLUX the error names the command.
    """
    path = artifact_path(cfg.workdir, "pack")
    if not path.exists() and cfg.model.source == EMBEDDED:
        from .packing import pack
        from .quantize import quantize

        info(f"{path} does not exist: quantizing ({cfg.quantization.method}) and packing the embedded model first")
        if not artifact_path(cfg.workdir, "quantize").exists():
            quantize(cfg)
        pack(cfg)
    return load_quantized_transformer(require(cfg.workdir, "pack"), cfg.model, cfg.quantization.activations, device)
