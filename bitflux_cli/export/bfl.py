"""BFL single-file export: one safetensors file in the original FLUX key naming (``keys.bfl_table``).

Default: every weight dequantized (codes x scale, computed in fp32) and every tensor in bf16, as
black-forest-labs' own files are; diffusers' ``FluxTransformer2DModel.from_single_file``, ComfyUI
and stable-diffusion.cpp read it. ``ternary=True``: the fused linears keep ternary codes and fp32
scales (``<bfl module>.codes`` / ``.scale``, the checkpoint's codec) and the rest its stored dtype: a
valid bitflux checkpoint (docs/FORMAT.md) with BFL module names, ``stage`` ``export:bfl``, for
tools that decode the codes themselves. Written one tensor at a time; the header's metadata carries
the provenance of the packed checkpoint.
"""

import json
from pathlib import Path

import torch

from ..checkpoint import CheckpointFile, ternary_specs, write_checkpoint
from ..tensorfile import write_tensorfile
from . import bfl_tensor, provenance
from .keys import bfl_modules, bfl_table


def write_bfl(ckpt: CheckpointFile, out: Path, ternary: bool = False) -> dict:
    """Write ``ckpt`` in the BFL naming at ``out`` (bf16, or ternary-coded); returns its size."""
    arch = ckpt.meta["architecture"]
    fused = {m: parts for m, parts in bfl_modules(arch).items() if parts[0] in ckpt.modules}
    specs = {}
    for entry in bfl_table(arch):
        module, _, leaf = entry.bfl.rpartition(".")
        if ternary and module in fused and leaf == "weight":
            parts = fused[module]
            shape = (sum(ckpt.modules[p][0] for p in parts), ckpt.modules[parts[0]][1])
            specs |= ternary_specs(module, shape, ckpt.codec,
                                   lambda p=parts: torch.cat([ckpt.codes(m) for m in p]),
                                   lambda p=parts: torch.cat([ckpt.read(f"{m}.scale") for m in p]))
            continue
        # ternary: the rest as stored (no quantized weight is left among it); else all bf16
        dtype = ckpt.file.entries[entry.parts[0]].dtype if ternary else torch.bfloat16
        specs[entry.bfl] = (dtype, _shape(ckpt, entry.parts), lambda e=entry, d=dtype: bfl_tensor(ckpt, e, d))
    meta = provenance(ckpt, "bfl-ternary" if ternary else "bfl-bf16")
    if ternary:
        modules = {m: [sum(ckpt.modules[p][0] for p in parts), ckpt.modules[parts[0]][1]] for m, parts in fused.items()}
        size = write_checkpoint(out, modules, specs, ckpt.codec, {
            "base_model": ckpt.meta["base_model"], "revision": ckpt.meta["revision"], "stage": "export:bfl",
            "activations": ckpt.meta["activations"], "config": ckpt.meta["config"], "architecture": arch,
            "source": ckpt.meta["source"], "inputs": json.loads(meta["inputs"]) | {"naming": "bfl"}})
    else:
        size = write_tensorfile(out, specs, meta)
    return {"bytes": size, "tensors": len(specs), "ternary": ternary, "dtype": "ternary" if ternary else "bfloat16"}



def _shape(ckpt: CheckpointFile, parts: tuple[str, ...]) -> tuple[int, ...]:
    """Shape of the stacked tensor; a quantized weight's shape comes from the recorded modules."""
    shapes = []
    for name in parts:
        module, _, leaf = name.rpartition(".")
        shapes.append(ckpt.modules[module] if leaf == "weight" and module in ckpt.modules
                      else ckpt.file.entries[name].shape)
    return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
