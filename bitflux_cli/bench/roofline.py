"""Projected (roofline) latency of one denoising step of the FLUX transformer on a GPU profile.

Every linear's (M, N, K) comes from a forward pass on the meta device (no memory, no weights), so
M is right per layer: image, text or joint tokens, or one row for the AdaLN modulation linears.
Per linear, time = max(2 M N K / rate, bytes / bandwidth), with bytes = weights + bf16 input and
output activations. bf16: bf16 weights at the 16-bit tensor rate; W2A16: in-scope linears read the
2-bit codes + fp32 scales at the 16-bit rate; W2A8: the same bytes at the int8 rate (``None`` on
GPUs without int8 tensor cores). With a low-rank residual of rank r, each in-scope linear adds its
GEMM pair at the 16-bit rate: 2 M r (N + K) flops against the bf16 factors, the input, the [M, r]
intermediate (written and read) and the output. With ``quantization.rotation`` each in-scope linear first
rotates its input as ``bitflux::hadamard`` does, two Kronecker-factor matmuls (a x a and c x c, a c = b,
the Hadamard block): 2 M K (a + c) flops at the 16-bit rate against one pass that reads and writes
[M, K] bf16 on GPUs that run the Triton kernel (the profiles with bf16: Ampere and newer), three on the
others (the torch path: signs, then each product). With ``model.fuse_projections`` the linears that
``bench`` then runs as one GEMM are counted as one (``fused_shapes``): input read once, N summed, one rotation.
Linears outside the scope stay bf16 in every mode. Attention adds
4 * B * S^2 * D flops per block (QK^T and PV) against reading q, k, v and writing the output.
Norms, activations, RoPE and kernel launch gaps are not counted: a lower bound on the step time.
"""

import torch
from torch import nn

from bitflux_kernels.hadamard import factors
from bitflux_kernels.layout import packed_2bit_bytes

from ..fusion import FUSED
from ..ternary import in_scope
from .accounting import BF16
from .memory import dummy_inputs, token_counts

LABEL = "projected (roofline)"
FUSED_BF16 = {leaf for parts in FUSED.values() for leaf in parts}  # to_q, ..., add_v_proj
FUSED_TERNARY = FUSED_BF16 | {"proj_mlp"}


def linear_shapes(model: nn.Module, batch: int, resolution: int, text_tokens: int) -> list[dict]:
    """(name, m, n, k, scoped, input) of every linear call of one forward of a meta-device ``model``; linears
    called on the same tensor have the same ``input`` (an index)."""
    rows, hooks, inputs = [], [], {}  # inputs: {id: (index, the meta tensor, held so that no id is reused)}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def hook(mod, args, out, name=name):  # args[0]: [..., K]
                index, _ = inputs.setdefault(id(args[0]), (len(inputs), args[0]))
                rows.append({"name": name, "m": args[0].shape[:-1].numel(), "n": mod.out_features,
                             "k": mod.in_features, "scoped": in_scope(name, mod), "input": index})
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**dummy_inputs(model, batch, resolution, text_tokens, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return rows


def fused_shapes(shapes: list[dict], ternary: bool) -> list[dict]:
    """``shapes`` with the linears ``model.fuse_projections`` runs as one GEMM merged (N summed, ``parts``
    counted: a fused residual is rank ``parts`` x r): in the ternary modes ``fusion.fuse_projections``' (Q/K/V,
    the text stream's, and a single block's Q/K/V with ``proj_mlp``), in bf16 diffusers' ``fuse_qkv_projections``
    (Q/K/V and the text stream's)."""
    leaves = FUSED_TERNARY if ternary else FUSED_BF16
    out, groups = [], {}
    for r in shapes:
        key = (r["input"], r["scoped"]) if r["name"].rpartition(".")[2] in leaves else None
        if key is not None and key in groups:
            groups[key]["n"] += r["n"]
            groups[key]["parts"] += 1
            continue
        out.append(dict(r, parts=1))
        if key is not None:
            groups[key] = out[-1]
    return out


def _time(flops: float, nbytes: float, rate: float, profile: dict) -> float:
    return max(flops / rate, nbytes / (profile["bandwidth_gbs"] * 1e9))


def step_seconds(model: nn.Module, shapes: list[dict], tokens: int, batch: int, profile: dict,
                 residual_rank: int = 0, rotated: bool = False, fused: bool = False) -> dict:
    """Roofline seconds of one transformer step per mode ("bf16", "w2a16", "w2a8"), the ternary modes
    with a residual GEMM pair of ``residual_rank`` per in-scope linear and, when ``rotated``, its input's
    Hadamard rotation; with ``fused`` the projections ``model.fuse_projections`` fuses run as one GEMM."""
    bf16_rate = profile["bf16_tflops"] * 1e12
    int8_rate = profile["int8_tops"] * 1e12 if profile["int8_tops"] else None
    d, layers = model.inner_dim, len(model.transformer_blocks) + len(model.single_transformer_blocks)
    attention = layers * _time(4 * batch * tokens**2 * d, 4 * batch * tokens * d * BF16, bf16_rate, profile)
    out = {}
    for mode, rate in (("bf16", bf16_rate), ("w2a16", bf16_rate), ("w2a8", int8_rate)):
        if rate is None:
            out[mode] = None
            continue
        total = attention
        for row in fused_shapes(shapes, mode != "bf16") if fused else shapes:
            m, n, k = row["m"], row["n"], row["k"]
            ternary = row["scoped"] and mode != "bf16"
            weights = packed_2bit_bytes(n, k) + 4 * n if ternary else n * k * BF16
            total += _time(2 * m * n * k, weights + (m * k + m * n) * BF16, rate if ternary else bf16_rate, profile)
            if ternary and residual_rank:
                r = residual_rank * row.get("parts", 1)  # a fused residual: the parts' ranks stacked
                total += _time(2 * m * r * (n + k), (r * (n + k) + m * k + 2 * m * r + m * n) * BF16, bf16_rate, profile)
            if ternary and rotated:
                passes = 1 if profile["bf16"] else 3  # hadamard_triton.py, or the torch path's three
                total += _time(2 * m * k * sum(factors(k)), passes * 2 * m * k * BF16, bf16_rate, profile)
        out[mode] = total
    return out


def latency_projection(model: nn.Module, profile: dict, resolutions: list[int], batch: int,
                       text_tokens: int, steps: int, residual_rank: int = 0, rotated: bool = False,
                       fused: bool = False) -> dict:
    """Per resolution and mode: projected step time (ms) and transformer time per image (s)."""
    per_res = {}
    for res in resolutions:
        t = token_counts(res, text_tokens)
        secs = step_seconds(model, linear_shapes(model, batch, res, text_tokens), t["image"] + t["text"], batch, profile,
                            residual_rank, rotated, fused)
        per_res[str(res)] = {mode: None if s is None else {"step_ms": s * 1e3, "image_s": s * steps, "source": LABEL}
                             for mode, s in secs.items()}
    return {"label": f"{LABEL} for {profile['name']}: transformer only, {steps} steps per image, batch {batch}",
            "gpu": profile["key"], "per_resolution": per_res}
