"""diffusers: load a bitflux transformer directory (``bitflux export --format diffusers``).

>>> transformer = from_pretrained("out/flux-dev-1.58bit")           # or a hub repo id
>>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", transformer=transformer,
...                                     torch_dtype=torch.bfloat16)

The transformer is built on the meta device with ``TernaryLinear`` shells and the packed buffers
assigned (``loader.load_quantized_transformer``): no full-precision weight is materialised. It is a
``FluxTransformer2DModel`` whose block linears are ``TernaryLinear`` modules, so ``FluxPipeline``
and its offload helpers take it as they take any transformer.
"""

import json
from pathlib import Path

import torch

from ..errors import ArtifactError
from ..export.diffusers import QUANT_METHOD, WEIGHTS
from ..loader import load_quantized_transformer


def resolve(path_or_repo: str | Path, subfolder: str | None = None, revision: str | None = None) -> Path:
    """The local directory of a bitflux transformer: a directory as given, else a hub snapshot."""
    local = Path(path_or_repo)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        pattern = f"{subfolder}/*" if subfolder else "*"
        local = Path(snapshot_download(str(path_or_repo), revision=revision, allow_patterns=[pattern]))
    return local / subfolder if subfolder else local


def from_pretrained(path_or_repo: str | Path, subfolder: str | None = None, revision: str | None = None,
                    device: torch.device | str = "cpu", activations: str | None = None) -> torch.nn.Module:
    """A 1.58-bit ``FluxTransformer2DModel`` from a bitflux transformer directory or hub repo.

    ``activations`` overrides the recorded activation mode ("none": W2A16, "int8": W2A8).
    """
    root = resolve(path_or_repo, subfolder, revision)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{root}: no readable config.json ({exc})") from None
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise ArtifactError(f"{root}: not a bitflux transformer (quantization_config.quant_method is "
                            f"{quant.get('quant_method')!r}, expected {QUANT_METHOD!r})")
    transformer = load_quantized_transformer(root / WEIGHTS, activations=activations, device=device)
    transformer.register_to_config(quantization_config=quant)
    return transformer
