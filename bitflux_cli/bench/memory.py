"""Projected inference memory of the FLUX transformer: weights plus peak activations.

Activation model (batch B, square resolution R, bf16, inference without autograd):
- tokens: S = (R/16)^2 image tokens (VAE /8, then 2x2 patches) + T text tokens (max_sequence_length);
- the largest live set is inside a single block: the fused q, k, v and MLP projections
  (3D + 4D = 21504 wide for D = 3072), the attention output (D) and the residual stream (D),
  i.e. B * S * (3D + mlp + 2D) * 2 bytes; attention is assumed fused (flash / memory-efficient
  SDPA), so no S x S score matrix (the math kernel would add B * heads * S^2 * 2 bytes);
- plus the inputs and output (latents [B, S_img, 64], T5 states [B, T, 4096], pooled vector) and
  the fp32 RoPE cos/sin tables [S, head_dim].
Temporaries of the implementation (e.g. fp32 copies in RoPE, allocator fragmentation) are not
modelled. Ternary W2A16 has the same activations; W2A8 adds an int8 copy and per-token fp32 scales
of the widest quantized linear's input (B * S * (K_max + 4) bytes). With ``quantization.rotation`` the
ternary modes add ``x R``, a bf16 copy of that input beside it (B * S * K_max * 2 bytes: the Triton
kernel's one output; the torch path on pre-Ampere GPUs holds one more intermediate). Text encoders and VAE
are excluded (run before/after the transformer, or offloaded).

Ternary runtime weights are the 2-bit layout + fp32 scales + dense bf16 (``storage``'s "2bit").
A GPU fits a configuration when peak <= memory - ``RESERVE`` (CUDA context, cuBLAS workspace).
"""

import torch
from torch import nn

from .accounting import BF16
from .profiles import PROFILES

RESERVE = 2**30  # bytes held back on every GPU: CUDA context, cuBLAS workspace, fragmentation
MODES = ("bf16", "w2a16", "w2a8")


def token_counts(resolution: int, text_tokens: int) -> dict:
    """Image and text tokens of one square image at ``resolution`` pixels."""
    return {"image": (resolution // 16) ** 2, "text": text_tokens}


def dummy_inputs(model: nn.Module, batch: int, resolution: int, text_tokens: int,
                 device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Random transformer inputs of the right shapes (works on the meta device)."""
    c, side = model.config, resolution // 16
    grid = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(side * side, 1), grid.float()], 1).to(device)  # [S_img, 3]
    return dict(
        hidden_states=torch.randn(batch, side * side, c.in_channels, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(batch, text_tokens, c.joint_attention_dim, device=device, dtype=dtype),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, device=device, dtype=dtype),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids, txt_ids=torch.zeros(text_tokens, 3, device=device),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype) if c.guidance_embeds else None,
        return_dict=False,
    )


def activation_bytes(model: nn.Module, batch: int, resolution: int, text_tokens: int) -> dict:
    """Peak activation bytes of one transformer forward (model in the module docstring)."""
    c, t = model.config, token_counts(resolution, text_tokens)
    d, s = model.inner_dim, t["image"] + t["text"]
    mlp = model.single_transformer_blocks[0].mlp_hidden_dim if len(model.single_transformer_blocks) else 4 * d  # fused or not
    block = batch * s * (3 * d + mlp + 2 * d) * BF16
    out_channels = c.out_channels or c.in_channels
    io = batch * (t["image"] * (c.in_channels + out_channels) + t["text"] * c.joint_attention_dim
                  + c.pooled_projection_dim) * BF16
    rope = 2 * s * c.attention_head_dim * 4  # cos, sin [S, head_dim] fp32
    k_max = max(getattr(m, "in_features", 0) for m in model.modules())  # any linear: bf16, ternary, fused
    return {"block": block, "inputs": io + rope, "total": block + io + rope,
            "w2a8_extra": batch * s * (k_max + 4), "rotation_extra": batch * s * k_max * BF16}


def fits(peak: int, profile: dict) -> bool:
    """True when ``peak`` bytes fit the GPU after ``RESERVE``."""
    return peak <= profile["memory_gb"] * 1e9 - RESERVE


def memory_projection(model: nn.Module, storage: dict, resolutions: list[int], batch: int, text_tokens: int) -> dict:
    """Per resolution: weights, activations and peak bytes for bf16, W2A16 and W2A8, the
    bf16/W2A16 peak ratio, and for every known GPU profile whether each mode fits (with ``storage``'s
    rotation, if any, in the ternary modes' activations)."""
    weights = {"bf16": storage["bf16_bytes"], "w2a16": storage["codecs"]["2bit"]["bytes"],
               "w2a8": storage["codecs"]["2bit"]["bytes"]}
    out = {}
    for res in resolutions:
        act = activation_bytes(model, batch, res, text_tokens)
        rotation = act["rotation_extra"] if storage["rotation"]["kind"] != "none" else 0
        acts = {"bf16": act["total"], "w2a16": act["total"] + rotation, "w2a8": act["total"] + act["w2a8_extra"] + rotation}
        modes = {m: {"weights": weights[m], "activations": acts[m], "peak": weights[m] + acts[m]} for m in MODES}
        out[str(res)] = {
            "tokens": token_counts(res, text_tokens), **modes,
            "ratio": modes["bf16"]["peak"] / modes["w2a16"]["peak"],
            "fits": {key: {m: fits(modes[m]["peak"], p) for m in MODES} for key, p in PROFILES.items()},
        }
    return {"label": "projected: transformer weights + analytic peak activations; text encoders and VAE excluded",
            "reserve_bytes": RESERVE, "batch": batch, "per_resolution": out}
