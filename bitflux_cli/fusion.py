"""Fused projections of a ternary FLUX transformer: one packed GEMM where diffusers runs three or four.

Each output row of a ternary linear is its codes times its own scale (plus its bias), so stacking
the rows of ``to_q``, ``to_k`` and ``to_v`` (packed codes, scales, biases) gives one linear whose
output is the three outputs side by side, exactly. diffusers' ``FluxAttention`` then takes its fused
path (``fused_projections``: ``to_qkv(x).chunk(3)``, and ``to_added_qkv`` for the text stream of the
double blocks). diffusers' own ``fuse_qkv_projections`` reads ``.weight`` and cannot fuse ternary layers.

A single block's ``proj_mlp`` reads the same normed input as its Q/K/V, so there the four are one
linear (BFL's ``linear1``: N = 3 x 3072 + 12288 = 21504 at FLUX.1-dev's width) and, in W2A8, one
quantization of the activations instead of two. diffusers' ``FluxSingleTransformerBlock.forward``
hands what ``norm`` returns to ``proj_mlp`` and to the attention and to nothing else: the fused
linear runs inside ``norm`` (``NormThenProject``) and ``proj_mlp`` and ``attn.to_qkv`` become column
slices of its output (``Columns``). No state is kept between calls and the block's forward is
diffusers' own, so ``torch.compile(fullgraph=True)`` traces it as before.

A low-rank residual (``quantization.residual_rank`` r) fuses exactly as well: the fused down is the
parts' downs stacked [3r, K], the fused up block-diagonal [3N, 3r], so each part's rows see only
their own ``up @ down`` (in floating point the other parts add exact zeros). A rotation
(``quantization.rotation``) is one per input width, so the parts share it and the fused layer keeps it.

The separate layers are removed, so the packed bytes are not held twice: fusing is for inference.
LoRAs target ``to_q``/``to_k``/``to_v``/``proj_mlp`` by name, so load them on an unfused transformer.
"""

import torch
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from torch import nn

from .errors import UsageError
from .ternary import TernaryLinear

FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


class NormThenProject(nn.Module):
    """A single block's ``norm`` followed by its fused Q/K/V + MLP-input linear ``proj``."""

    def __init__(self, norm: nn.Module, proj: TernaryLinear):
        super().__init__()
        self.norm, self.proj = norm, proj

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        x, gate = self.norm(x, emb=emb)  # x: [B, L, D], gate: [B, D]
        return self.proj(x), gate  # [B, L, 3D + M]: q | k | v | mlp


class Columns(nn.Module):
    """Columns ``[start, stop)`` of the last dimension: a fused single block's ``to_qkv`` and ``proj_mlp``."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # y: [..., 3D + M] -> [..., stop - start]
        return y[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return f"start={self.start}, stop={self.stop}"


def _check(layers: list) -> None:
    if not all(type(lin) is TernaryLinear for lin in layers):
        raise UsageError("fuse_projections fuses plain TernaryLinear Q/K/V and MLP-input projections: unload LoRA "
                         "adapters first (they target to_q/to_k/to_v/proj_mlp by name)")
    first = layers[0]
    if any(lin.in_features != first.in_features or lin.activations != first.activations
           or (lin.bias is None) != (first.bias is None)
           or (lin.residual_up is None) != (first.residual_up is None) or not _same(lin.rotation, first.rotation)
           for lin in layers):
        raise UsageError("cannot fuse projections with different widths, activation modes, bias, residual or rotation")


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is None if b is None else a is not None and torch.equal(a, b)


def stacked(layers: list[TernaryLinear]) -> TernaryLinear:
    """One ``TernaryLinear`` whose output rows are those of ``layers`` in order (same K and mode)."""
    _check(layers)
    first = layers[0]
    ranks = [0 if lin.residual_up is None else lin.residual_up.shape[1] for lin in layers]
    out = TernaryLinear(first.in_features, sum(lin.out_features for lin in layers), first.bias is not None,
                        first.activations, device=first.packed.device, dtype=None if first.bias is None else first.bias.dtype,
                        residual_rank=sum(ranks), rotated=first.rotation is not None)
    out.packed.copy_(torch.cat([lin.packed for lin in layers]))  # [sum N, Kp/4]
    out.scale.copy_(torch.cat([lin.scale for lin in layers]))
    if first.bias is not None:
        out.bias.copy_(torch.cat([lin.bias for lin in layers]))
    if sum(ranks):
        out.residual_up.copy_(torch.block_diag(*[lin.residual_up for lin in layers]))  # [sum N, sum r]
        out.residual_down.copy_(torch.cat([lin.residual_down for lin in layers]))  # [sum r, K]
    if first.rotation is not None:
        out.rotation.copy_(first.rotation)  # [K], the same for every part
    out.backend = first.backend
    return out


def _groups(transformer: nn.Module) -> list[tuple[nn.Module, str, list, FluxSingleTransformerBlock | None]]:
    """(attention, fused name, its layers, the single block whose ``proj_mlp`` ends them or None) for
    every projection group of an attention not fused yet."""
    singles = {id(b.attn): b for b in transformer.modules() if isinstance(b, FluxSingleTransformerBlock)}
    groups = []
    for attn in transformer.modules():
        if getattr(attn, "fused_projections", True):
            continue
        for fused, names in FUSED.items():
            layers = [getattr(attn, name, None) for name in names]
            block = singles.get(id(attn)) if fused == "to_qkv" else None
            if any(lin is not None for lin in layers):
                groups.append((attn, fused, layers + ([block.proj_mlp] if block is not None else []), block))
    return groups


def fuse_projections(transformer: nn.Module) -> int:
    """Fuse the ternary Q/K/V projections of every attention of ``transformer`` in place, with the MLP
    input projection in the single blocks; returns how many fused linears were made (one per stream
    of a double block, one per single block). Attentions already fused are left as they are; every
    group is checked before any is fused, so a refusal (``UsageError``) changes nothing."""
    groups = _groups(transformer)
    for _, _, layers, _ in groups:
        _check(layers)
    for attn, fused, layers, block in groups:
        if block is None:
            setattr(attn, fused, stacked(layers))
        else:
            qkv = sum(lin.out_features for lin in layers[:3])
            block.norm = NormThenProject(block.norm, stacked(layers))
            attn.to_qkv, block.proj_mlp = Columns(0, qkv), Columns(qkv, qkv + layers[3].out_features)
        for name in FUSED[fused]:
            delattr(attn, name)
        attn.fused_projections = True
    return len(groups)
