"""The FP transformer one block at a time: read from its safetensors shards, never whole in memory.

Every stage that needs the full-precision transformer goes through here (calibrate, quantize's
methods, the fidelity report, generate/eval ``--full-precision``):

- ``Weights``: the transformer's tensors by state-dict name over one file or a sharded checkpoint
  (``*.safetensors.index.json``), read one tensor at a time (``tensorfile``).
- ``skeleton``: the transformer built on the meta device with everything outside the blocks loaded
  (embedders, ``norm_out``, ``proj_out``: 0.5% of FLUX.1-dev); the blocks stay empty shells.
- ``load_block``: one block, materialised on a device, as a module of its own.
- ``streamed``: hooks that materialise each block just before it runs and empty it right after, so
  a whole forward (a denoising step) holds one block; ``materialise`` loads them all instead.
- ``prelude`` / ``head``: the transformer's computation before the first block (block 0's inputs
  for a batch of calls) and after the last (the velocity), so a stage can walk the blocks itself.
"""

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .errors import ArtifactError
from .tensorfile import TensorFile

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
class Weights:
    """Tensors of a transformer checkpoint by name, over a single file or an index of shards."""

    def __init__(self, files: list[Path]):
        self.files = [Path(f) for f in files]
        self.where: dict[str, TensorFile] = {}
        for f in self.files:
            tf = TensorFile(f)
            self.where |= dict.fromkeys(tf.entries, tf)

    @classmethod
    def from_dir(cls, directory: Path) -> "Weights":
        """``diffusion_pytorch_model.safetensors`` or the shards its ``.index.json`` names."""
        index = directory / "diffusion_pytorch_model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return cls([directory / s for s in shards])
        single = directory / "diffusion_pytorch_model.safetensors"
        if not single.is_file():
            raise ArtifactError(f"{directory}: no diffusion_pytorch_model.safetensors (or its index) in this transformer folder")
        return cls([single])

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.where if n.startswith(prefix)]

    def read(self, names: list[str], prefix: str = "", dtype: torch.dtype | None = None,
             device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """{name without ``prefix``: tensor} for ``names``, cast to ``dtype`` (floats only), on ``device``."""
        out = {}
        for name in names:
            t = self.where[name].read(name)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[name.removeprefix(prefix)] = t.to(device)
        return out


def block_names(transformer: nn.Module) -> list[str]:
    """Full names of the double then the single blocks, in execution order."""
    return [f"{lst}.{i}" for lst in BLOCK_LISTS for i in range(len(getattr(transformer, lst)))]


def blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) in execution order."""
    return [(n, transformer.get_submodule(n)) for n in block_names(transformer)]


def _dtype(transformer: nn.Module) -> torch.dtype:
    return next(p.dtype for p in transformer.parameters() if p.is_floating_point())


def skeleton(meta_transformer: nn.Module, weights: Weights, dtype: torch.dtype,
             device: torch.device | str = "cpu") -> nn.Module:
    """``meta_transformer`` with every tensor outside the blocks read from ``weights``; blocks stay on meta."""
    inside = tuple(f"{lst}." for lst in BLOCK_LISTS)
    outside = [n for n in meta_transformer.state_dict() if not n.startswith(inside)]
    missing = sorted(set(outside) - set(weights.where))
    if missing:
        raise ArtifactError(f"{weights.files[0].parent}: the checkpoint lacks {missing[0]} ({len(missing)} tensors)")
    meta_transformer.load_state_dict(weights.read(outside, dtype=dtype, device=device), strict=False, assign=True)
    return meta_transformer.eval().requires_grad_(False)


def _fill(block: nn.Module, weights: Weights, name: str, dtype: torch.dtype, device) -> None:
    expected = set(block.state_dict())
    tensors = weights.read(weights.names(f"{name}."), f"{name}.", dtype, device)
    if set(tensors) != expected:
        raise ArtifactError(f"{weights.files[0].parent}: block {name} does not match the architecture "
                            f"(e.g. {sorted(set(tensors) ^ expected)[0]})")
    block.load_state_dict(tensors, strict=True, assign=True)


def load_block(transformer: nn.Module, weights: Weights, name: str, device: torch.device | str,
               dtype: torch.dtype | None = None) -> nn.Module:
    """Block ``name`` materialised on ``device`` as a module of its own (the skeleton's stays empty)."""
    block = copy.deepcopy(transformer.get_submodule(name))  # a meta module: no memory is copied
    _fill(block, weights, name, dtype or _dtype(transformer), device)
    return block.eval().requires_grad_(False)


@contextmanager
def streamed(transformer: nn.Module, weights: Weights, device: torch.device | str) -> Iterator[nn.Module]:
    """Within the context each block of ``transformer`` is read onto ``device`` when it is called and
    emptied (back to meta) when it returns: one block resident at a time."""
    dtype, handles = _dtype(transformer), []
    for name, block in blocks(transformer):
        def load(module, _args, name=name):
            _fill(module, weights, name, dtype, device)

        def free(module, _args, _out):
            module.to("meta")

        handles += [block.register_forward_pre_hook(load), block.register_forward_hook(free)]
    try:
        yield transformer
    finally:
        for h in handles:
            h.remove()
        for _, block in blocks(transformer):
            block.to("meta")


def materialise(transformer: nn.Module, weights: Weights, device: torch.device | str) -> nn.Module:
    """Every block of ``transformer`` read onto ``device``, one block at a time."""
    dtype = _dtype(transformer)
    for name, block in blocks(transformer):
        _fill(block, weights, name, dtype, device)
    return transformer.requires_grad_(False)


class _Stop(Exception):
    pass


@torch.no_grad()
def prelude(transformer: nn.Module, kwargs: dict) -> dict:
    """Block 0's inputs for one batch of transformer keyword arguments:
    hidden_states [B, L, D], encoder_hidden_states [B, T, D], temb [B, D], image_rotary_emb."""
    seen = {}

    def hook(_m, _args, kw):
        seen.update((k, kw[k]) for k in ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb"))
        raise _Stop

    first = transformer.get_submodule(block_names(transformer)[0])
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        transformer(**kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen


def run_block(block: nn.Module, state: dict, idx: torch.Tensor | slice, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, T, D], hidden [B, L, D]) of ``block`` on the calls ``idx`` of a host-side ``state``."""
    rope = tuple(r.to(device) for r in state["image_rotary_emb"])
    return block(hidden_states=state["hidden_states"][idx].to(device),
                 encoder_hidden_states=state["encoder_hidden_states"][idx].to(device),
                 temb=state["temb"][idx].to(device), image_rotary_emb=rope)


def prelude_state(transformer: nn.Module, batches) -> dict:
    """Block 0's inputs of every call (``prelude`` of each batch of keyword arguments in ``batches``),
    on the host: each batch's moved there before the next runs. The rotary embedding is one for all calls."""
    parts = []
    for kwargs in batches:
        inputs = prelude(transformer, kwargs)
        parts.append({k: v.cpu() for k, v in inputs.items() if k != "image_rotary_emb"})
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} | {
        "image_rotary_emb": tuple(r.cpu() for r in inputs["image_rotary_emb"])}


@torch.no_grad()
def outputs(block: nn.Module, state: dict, batch: int, device, streams=("context", "hidden"),
            into: dict | None = None) -> dict[str, torch.Tensor]:
    """``block`` over every call of a host-side ``state``, ``batch`` calls at a time: {stream: [C, ...]}
    of its context [C, T, D] and hidden [C, L, D] outputs (those in ``streams``), each batch's copied to
    the host before the next runs, so the device holds one batch's. They go into host tensors allocated
    at the first batch, or into ``into``'s ({stream: [C, ...]}), which may be ``state``'s own inputs:
    batch i's rows are read before they are overwritten, and calls do not depend on each other."""
    out = dict(into or {})
    for i in range(0, state["hidden_states"].shape[0], batch):
        got = dict(zip(("context", "hidden"), run_block(block, state, slice(i, i + batch), device)))
        for s in streams:
            if s not in out:
                out[s] = torch.empty((state["hidden_states"].shape[0], *got[s].shape[1:]), dtype=got[s].dtype)
            out[s][i:i + batch] = got[s]
    return {s: out[s] for s in streams}


def advance(block: nn.Module, state: dict, batch: int, device, in_place: bool = False) -> dict:
    """``state`` pushed through ``block`` in batches (``outputs``); the new hidden and context stay on
    the host, written over ``state``'s own with ``in_place`` (host memory: one copy of the calls, not two)."""
    into = {"context": state["encoder_hidden_states"], "hidden": state["hidden_states"]} if in_place else None
    out = outputs(block, state, batch, device, into=into)
    return state | {"encoder_hidden_states": out["context"], "hidden_states": out["hidden"]}


@torch.no_grad()
def head(transformer: nn.Module, hidden: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
    """The velocity [B, L, C] from the last block's image stream [B, L, D] (``norm_out``, ``proj_out``)."""
    return transformer.proj_out(transformer.norm_out(hidden, temb))
