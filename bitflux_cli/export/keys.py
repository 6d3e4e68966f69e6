"""The key-mapping table between diffusers' FLUX transformer and the original BFL checkpoint.

The inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers``
(``diffusers/loaders/single_file_utils.py``): each BFL tensor is one diffusers tensor, or several
concatenated along dim 0 (the fused projections), and ``final_layer.adaLN_modulation.1`` has its two
halves swapped (BFL's shift, scale vs diffusers' scale, shift):

    double_blocks.i.img_attn.qkv  = cat(transformer_blocks.i.attn.to_q, to_k, to_v)
    double_blocks.i.txt_attn.qkv  = cat(transformer_blocks.i.attn.add_q_proj, add_k_proj, add_v_proj)
    single_blocks.i.linear1       = cat(single_transformer_blocks.i.attn.to_q, to_k, to_v, proj_mlp)

Row concatenation keeps per-output-channel scales meaningful, so a fused ternary tensor is the
parts' codes stacked and their scales stacked. These are the names ComfyUI (and ComfyUI-GGUF) and
stable-diffusion.cpp read for FLUX.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Entry:
    """One BFL tensor: the diffusers tensors it is made of (stacked on dim 0), halves swapped or not."""

    bfl: str
    parts: tuple[str, ...]
    swap: bool = False


# (BFL module, diffusers module(s)): linears, whose .weight and .bias map alike
_TOP = [("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
        ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
        ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
        ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
        ("txt_in", "context_embedder"), ("img_in", "x_embedder"), ("final_layer.linear", "proj_out")]
_GUIDANCE = [("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
             ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")]
_DOUBLE = [("img_mod.lin", ("norm1.linear",)), ("txt_mod.lin", ("norm1_context.linear",)),
           ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
           ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
           ("img_attn.proj", ("attn.to_out.0",)), ("txt_attn.proj", ("attn.to_add_out",)),
           ("img_mlp.0", ("ff.net.0.proj",)), ("img_mlp.2", ("ff.net.2",)),
           ("txt_mlp.0", ("ff_context.net.0.proj",)), ("txt_mlp.2", ("ff_context.net.2",))]
_DOUBLE_NORMS = [("img_attn.norm.query_norm.scale", "attn.norm_q.weight"),
                 ("img_attn.norm.key_norm.scale", "attn.norm_k.weight"),
                 ("txt_attn.norm.query_norm.scale", "attn.norm_added_q.weight"),
                 ("txt_attn.norm.key_norm.scale", "attn.norm_added_k.weight")]
_SINGLE = [("modulation.lin", ("norm.linear",)), ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
           ("linear2", ("proj_out",))]
_SINGLE_NORMS = [("norm.query_norm.scale", "attn.norm_q.weight"), ("norm.key_norm.scale", "attn.norm_k.weight")]


def bfl_modules(arch: dict) -> dict[str, tuple[str, ...]]:
    """{BFL linear: its diffusers linear(s), in stacking order} for a transformer's constructor args."""
    out = dict((b, (d,)) for b, d in _TOP + (_GUIDANCE if arch.get("guidance_embeds") else []))
    for i in range(arch["num_layers"]):
        out |= {f"double_blocks.{i}.{b}": tuple(f"transformer_blocks.{i}.{p}" for p in d) for b, d in _DOUBLE}
    for i in range(arch["num_single_layers"]):
        out |= {f"single_blocks.{i}.{b}": tuple(f"single_transformer_blocks.{i}.{p}" for p in d) for b, d in _SINGLE}
    return out


def bfl_table(arch: dict) -> list[Entry]:
    """Every tensor of the BFL checkpoint of a transformer with constructor args ``arch``."""
    table = [Entry(f"{b}.{leaf}", tuple(f"{p}.{leaf}" for p in parts))
             for b, parts in bfl_modules(arch).items() for leaf in ("weight", "bias")]
    table += [Entry(f"final_layer.adaLN_modulation.1.{leaf}", (f"norm_out.linear.{leaf}",), swap=True)
              for leaf in ("weight", "bias")]
    for i in range(arch["num_layers"]):
        table += [Entry(f"double_blocks.{i}.{b}", (f"transformer_blocks.{i}.{d}",)) for b, d in _DOUBLE_NORMS]
    for i in range(arch["num_single_layers"]):
        table += [Entry(f"single_blocks.{i}.{b}", (f"single_transformer_blocks.{i}.{d}",)) for b, d in _SINGLE_NORMS]
    return sorted(table, key=lambda e: e.bfl)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """[shift; scale] <-> [scale; shift] along dim 0 (its own inverse)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_diffusers(bfl: dict[str, torch.Tensor], arch: dict) -> dict[str, torch.Tensor]:
    """A BFL state dict back in diffusers names (fused tensors split, halves swapped back): the
    table read the other way. Rows of a fused tensor: q, k, v of ``inner`` each, then proj_mlp's ``4 inner``."""
    inner = arch["num_attention_heads"] * arch["attention_head_dim"]
    out = {}
    for e in bfl_table(arch):
        t = swap_halves(bfl[e.bfl]) if e.swap else bfl[e.bfl]
        sizes = [inner] * len(e.parts) if len(e.parts) < 4 else [inner, inner, inner, 4 * inner]
        out |= dict(zip(e.parts, torch.split(t, sizes, dim=0) if len(e.parts) > 1 else [t]))
    return out
