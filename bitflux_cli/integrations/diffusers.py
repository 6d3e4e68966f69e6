"""diffusers: load a bitflux transformer directory (``bitflux export --format diffusers``, ``save_pretrained``).

>>> transformer = from_pretrained("out/flux-dev-1.58bit")           # or a hub repo id
>>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", transformer=transformer,
...                                     torch_dtype=torch.bfloat16)

A thin wrapper of diffusers' own ``FluxTransformer2DModel.from_pretrained``, which after ``import
bitflux_cli`` loads these directories itself through ``diffusers_quantizer.BitfluxQuantizer``: built on
the meta device with ``TernaryLinear`` shells and the packed weights assigned, no full-precision
weight is materialised. The wrapper adds a one-line refusal of a directory that is not bitflux's, an
early check of a local weights file's header, a device and an activation-mode override.
"""

from pathlib import Path

import torch

from ..errors import ArtifactError
from .diffusers_quantizer import QUANT_METHOD, register, set_activations, weights_file


def from_pretrained(path_or_repo: str | Path, subfolder: str | None = None, revision: str | None = None,
                    device: torch.device | str | None = None, activations: str | None = None,
                    **kwargs) -> torch.nn.Module:
    """A 1.58-bit ``FluxTransformer2DModel`` from a bitflux transformer directory or hub repo.

    ``device``: where to move it (default: where diffusers loads it, the CPU unless ``device_map``);
    ``activations`` overrides the recorded activation mode ("none": W2A16, "int8"/"fp8": W2A8); other
    keyword arguments go to diffusers' ``from_pretrained`` (``torch_dtype``, ``variant``, ``token``...).
    """
    from diffusers import FluxTransformer2DModel

    from ..checkpoint import CheckpointFile

    register()
    try:
        config = FluxTransformer2DModel.load_config(str(path_or_repo), subfolder=subfolder, revision=revision)
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path_or_repo}: no readable config.json ({str(exc).splitlines()[0]})") from None
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != QUANT_METHOD:
        raise ArtifactError(f"{path_or_repo}: not a bitflux transformer (quantization_config.quant_method is "
                            f"{quant.get('quant_method')!r}, expected {QUANT_METHOD!r})")
    local = weights_file(Path(path_or_repo) / (subfolder or ""), kwargs.get("variant"))
    if local.parent.is_dir():  # a local directory: its header checked before diffusers' safetensors reader sees it
        if not local.is_file():
            raise ArtifactError(f"{local} does not exist: a bitflux transformer directory holds config.json and it")
        CheckpointFile(local)
    transformer = FluxTransformer2DModel.from_pretrained(str(path_or_repo), subfolder=subfolder, revision=revision,
                                                         **kwargs)
    if activations is not None:
        set_activations(transformer, activations)
    return transformer if device is None else transformer.to(device)
