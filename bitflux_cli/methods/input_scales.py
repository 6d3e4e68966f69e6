"""Per-input-channel scales that fold exactly into the layer that produces the input.

A ternary linear with one scale per row holds ``s[:, None] * Q``. Multiplying its input by a
per-channel ``c`` [K] makes the weight ``s[:, None] * Q * c[None, :]``: a rank-one scale grid, the
OneBit/AWQ idea, without a tensor more in the file, because ``c`` can be moved into whatever made the
input. In a FLUX block two producers allow it exactly:

- The AdaLayerNorm modulation ``x * (1 + scale) + shift`` (``scale``, ``shift``: chunks of the
  modulation linear's output). ``c * (x * (1 + scale) + shift)`` is the same modulation with the
  scale chunk's rows times c and its bias ``c * (1 + b) - 1``, the shift chunk's rows and bias times c.
  The modulation linear is ternary with per-row scales, so its rows take c exactly.
- The attention's V projections: attention output channels are weighted sums of V's, so V's rows and
  bias times c scale the attention output by c (image and text V together: both streams' outputs mix
  them).

The consumers are Q/K/V and the MLP input (after a modulation), the attention output projections
and the single blocks' ``proj_out`` on its attention part (its MLP part follows a GELU: no scale).
"""

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Group:
    """Consumers (linears whose first ``dim`` input columns it scales) that share one input scale, and
    how it folds back: ``modulation`` (linear, shift chunk, scale chunk, chunks) or ``values`` (linears
    whose rows scale)."""
    consumers: tuple[str, ...]
    modulation: tuple[str, int, int, int] | None = None
    values: tuple[str, ...] = ()


def groups(block: nn.Module) -> dict[str, Group]:
    """The foldable input-scale groups of a FLUX double or single block, by a name of their own."""
    if hasattr(block, "norm1_context"):  # FluxTransformerBlock
        return {
            "image_attention_in": Group(("attn.to_q", "attn.to_k", "attn.to_v"), ("norm1.linear", 0, 1, 6)),
            "image_mlp_in": Group(("ff.net.0.proj",), ("norm1.linear", 3, 4, 6)),
            "text_attention_in": Group(("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                                       ("norm1_context.linear", 0, 1, 6)),
            "text_mlp_in": Group(("ff_context.net.0.proj",), ("norm1_context.linear", 3, 4, 6)),
            "attention_out": Group(("attn.to_out.0", "attn.to_add_out"), values=("attn.to_v", "attn.add_v_proj")),
        }
    return {  # FluxSingleTransformerBlock
        "in": Group(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), ("norm.linear", 0, 1, 3)),
        "attention_out": Group(("proj_out",), values=("attn.to_v",)),
    }


def attach(block: nn.Module, ste: dict) -> dict[str, nn.Parameter]:
    """One log-scale parameter [dim] (zeros: c = 1) per group of ``block``, set on its consumers in ``ste``."""
    dim = (block.norm1 if hasattr(block, "norm1") else block.norm).linear.weight.shape[1]  # the modulation's input: the block width
    params = {}
    for name, group in groups(block).items():
        p = params[name] = nn.Parameter(torch.zeros(dim, device=ste[group.consumers[0]].weight.device))
        for sub in group.consumers:
            ste[sub].input_scale = p
    return params


@torch.no_grad()
def fold(block: nn.Module, ste: dict, params: dict[str, nn.Parameter]) -> None:
    """Move every group's scale c into its producer (module docstring) and drop it from its consumers:
    the block computes the same function, now with per-row scales and biases only."""
    for name, group in groups(block).items():
        c = params[name].detach().exp()  # [dim]
        if group.modulation:
            sub, shift, scale, chunks = group.modulation
            m = ste[sub]
            dim = m.weight.shape[0] // chunks
            for chunk in (shift, scale):
                rows = slice(chunk * dim, (chunk + 1) * dim)
                m.log_scale[rows] += c.log()
                if m.bias is not None:
                    m.bias[rows] = (c * (1 + m.bias[rows].float()) - 1 if chunk == scale else c * m.bias[rows].float()).to(m.bias.dtype)
                elif chunk == scale:
                    raise ValueError(f"{sub} has no bias to take the input scale's 1 - c")
        for sub in group.values:
            m = ste[sub]
            m.log_scale += c.log()
            if m.bias is not None:
                m.bias.copy_((c * m.bias.float()).to(m.bias.dtype))
        for sub in group.consumers:
            ste[sub].input_scale = None
