"""Fused QKV projections of a ternary FLUX transformer: one packed GEMM where diffusers runs three.

Each output row of a ternary linear is its codes times its own scale (plus its bias), so stacking
the rows of ``to_q``, ``to_k`` and ``to_v`` (packed codes, scales, biases) gives one linear whose
output is the three outputs side by side, exactly. diffusers' ``FluxAttention`` then takes its fused
path (``fused_projections``: ``to_qkv(x).chunk(3)``, and ``to_added_qkv`` for the text stream of the
double blocks). One launch instead of three, with N = 3 x 3072 at FLUX.1-dev's width; in W2A8 the
activations are quantized once for the three. diffusers' own ``fuse_qkv_projections`` reads
``.weight`` and cannot fuse ternary layers.

A low-rank residual (``quantization.residual_rank`` r) fuses exactly as well: the fused down is the
parts' downs stacked [3r, K], the fused up block-diagonal [3N, 3r], so each part's rows see only
their own ``up @ down`` (in floating point the other parts add exact zeros).

The separate layers are removed, so the packed bytes are not held twice: fusing is for inference.
LoRAs target ``to_q``/``to_k``/``to_v`` by name, so load them on an unfused transformer.
"""

import torch

from .errors import UsageError
from .ternary import TernaryLinear

FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def stacked(layers: list[TernaryLinear]) -> TernaryLinear:
    """One ``TernaryLinear`` whose output rows are those of ``layers`` in order (same K and mode)."""
    first = layers[0]
    if any(lin.in_features != first.in_features or lin.activations != first.activations
           or (lin.bias is None) != (first.bias is None)
           or (lin.residual_up is None) != (first.residual_up is None) for lin in layers):
        raise UsageError("cannot fuse projections with different widths, activation modes, bias or residual")
    ranks = [0 if lin.residual_up is None else lin.residual_up.shape[1] for lin in layers]
    out = TernaryLinear(first.in_features, sum(lin.out_features for lin in layers), first.bias is not None,
                        first.activations, device=first.packed.device, dtype=None if first.bias is None else first.bias.dtype,
                        residual_rank=sum(ranks))
    out.packed.copy_(torch.cat([lin.packed for lin in layers]))  # [N_q + N_k + N_v, Kp/4]
    out.scale.copy_(torch.cat([lin.scale for lin in layers]))
    if first.bias is not None:
        out.bias.copy_(torch.cat([lin.bias for lin in layers]))
    if sum(ranks):
        out.residual_up.copy_(torch.block_diag(*[lin.residual_up for lin in layers]))  # [sum N, sum r]
        out.residual_down.copy_(torch.cat([lin.residual_down for lin in layers]))  # [sum r, K]
    out.backend = first.backend
    return out


def fuse_projections(transformer: torch.nn.Module) -> int:
    """Fuse the ternary Q/K/V projections of every attention of ``transformer`` in place; returns how
    many fused linears were made. Attentions already fused are left as they are."""
    made = 0
    for attn in transformer.modules():
        if not hasattr(attn, "fused_projections") or attn.fused_projections:
            continue
        for fused, names in FUSED.items():
            layers = [getattr(attn, name, None) for name in names]
            if all(lin is None for lin in layers):
                continue
            if not all(type(lin) is TernaryLinear for lin in layers):
                raise UsageError("fuse_projections fuses plain TernaryLinear Q/K/V projections: unload LoRA "
                                 "adapters first (they target to_q/to_k/to_v by name)")
            setattr(attn, fused, stacked(layers))
            for name in names:
                delattr(attn, name)
            made += 1
        attn.fused_projections = True
    return made
