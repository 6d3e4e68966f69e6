"""Measured mode (CUDA): step and whole-image latency and peak memory for bf16, W2A16 and W2A8.

Latency uses CUDA events around each call, warm-up excluded, median and p90 over ``bench.iters``
runs; peak memory is ``torch.cuda.max_memory_allocated`` since the model was resident (weights
included). Steps run the transformer alone on random inputs of the pipeline's shapes, batch 1.
With ``random_weights`` the full-size architecture gets random weights directly on the device
and the per-image figure is derived (steps x median step, transformer only); otherwise the FP
model comes from ``load_pipeline``'s source and the ternary one from the workdir's packed
checkpoint, and whole images are timed through the pipeline.
"""

import gc
import statistics
from collections.abc import Callable

import torch
from torch import nn

import bitflux_kernels
from bitflux_kernels import pack_2bit

from ..artifacts import require
from ..checkpoint import CheckpointFile
from ..config import Config, ModelConfig
from ..console import info
from ..fusion import fuse_projections
from ..loader import load_quantized_transformer
from ..models import build_meta_transformer, load_fp_transformer, load_pipeline, torch_dtype
from ..rotation import signs
from ..ternary import TernaryLinear, replace_with_ternary, scoped_linears
from .memory import MODES, dummy_inputs

ACTIVATIONS = {"w2a16": "none", "w2a8": "int8"}
INIT_STD = 0.02


def mode_activations(cfg: Config, mode: str, recorded: str | None = None) -> str | None:
    """The activation mode a bench mode runs in: None for bf16, W2A16 "none"; W2A8 int8, or fp8 when
    ``quantization.activations`` says fp8 (``bitflux bench --set quantization.activations=fp8``) or,
    unset, the checkpoint records fp8 (``recorded``)."""
    if mode == "bf16":
        return None
    return "fp8" if mode == "w2a8" and (cfg.quantization.activations or recorded) == "fp8" else ACTIVATIONS[mode]


def recorded_activations(cfg: Config) -> str:
    """The activation mode the workdir's packed checkpoint records (a missing one names ``bitflux pack``)."""
    return CheckpointFile(require(cfg.workdir, "pack")).meta["activations"]


def random_transformer(model: ModelConfig, mode: str, device: torch.device | str, seed: int = 0,
                       residual_rank: int = 0, activations: str | None = None, rotated: bool = False) -> nn.Module:
    """The configured architecture with random weights made on ``device``, no FP model built.

    Float parameters are ``normal * 0.02`` in the model dtype (never zero); for "w2a16"/"w2a8"
    every in-scope linear is a ``TernaryLinear`` with random codes in {-1, 0, 1} packed by
    ``pack_2bit``, random positive scales, random biases and (``residual_rank`` > 0) random
    residual factors and (``rotated``) the rotation's signs of ``rotation.signs``; ``activations`` overrides
    the mode's activation mode (``ACTIVATIONS``).
    """
    net = build_meta_transformer(model).to(torch_dtype(model))  # meta: free
    if mode != "bf16":
        replace_with_ternary(net, [name for name, _ in scoped_linears(net)], activations or ACTIVATIONS[mode],
                             residual_rank, rotated)
    net.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.is_floating_point():  # a ternary layer's packed codes (uint8) are drawn below
                p.normal_(0.0, INIT_STD, generator=gen)
        for mod in net.modules():
            if isinstance(mod, TernaryLinear):
                codes = torch.randint(-1, 2, (mod.out_features, mod.in_features), generator=gen,
                                      dtype=torch.int8, device=device)  # [N, K]
                mod.packed.copy_(pack_2bit(codes))  # [N, Kp/4] uint8
                mod.scale.uniform_(0.5 * INIT_STD, 1.5 * INIT_STD, generator=gen)  # [N] fp32, > 0
                if mod.bias is not None:
                    mod.bias.normal_(0.0, INIT_STD, generator=gen)
                if mod.residual_up is not None:
                    mod.residual_up.normal_(0.0, INIT_STD, generator=gen)
                    mod.residual_down.normal_(0.0, INIT_STD, generator=gen)
                if mod.rotation is not None:
                    mod.rotation.copy_(signs(mod.in_features))  # [K] int8
    return net.eval()


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> dict:
    """Median and p90 milliseconds of ``fn`` over ``iters`` CUDA-event-timed runs after ``warmup``.

    The current device's peak-memory counter is reset after the warm-up: ``max_memory_allocated``
    afterwards is the timed runs' peak (what is held plus one run), without autotuning, Triton's
    benchmark buffers or compilation, which a cold cache spends in the first calls only."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    p90 = statistics.quantiles(times, n=10, method="inclusive")[-1] if len(times) > 1 else times[0]
    return {"median_ms": statistics.median(times), "p90_ms": p90, "iters": iters}


def _steps(net: nn.Module, cfg: Config, device: torch.device) -> dict:
    out = {}
    step = net if cfg.bench.compile == "none" else torch.compile(net, fullgraph=True, mode=cfg.bench.compile)
    for res in cfg.bench.resolutions:
        inputs = dummy_inputs(net, 1, res, cfg.generate.max_sequence_length, device, torch_dtype(cfg.model))
        with torch.inference_mode():
            t = time_cuda(lambda: step(**inputs), max(cfg.bench.warmup, cfg.bench.compile != "none"), cfg.bench.iters)
        out[str(res)] = {"step": t, "step_peak_bytes": torch.cuda.max_memory_allocated(device)}
    return out


def _images(net: nn.Module, cfg: Config, device: torch.device, per_res: dict) -> None:
    pipe = load_pipeline(cfg.model, transformer=net).to(device)
    g = cfg.generate
    for res in cfg.bench.resolutions:
        def image():
            pipe(prompt="a photo of a red circle above a blue square", height=res, width=res,
                 num_inference_steps=g.steps, guidance_scale=g.guidance, max_sequence_length=g.max_sequence_length,
                 generator=torch.Generator(device).manual_seed(g.seed))
        with torch.inference_mode():
            t = time_cuda(image, min(cfg.bench.warmup, 1), cfg.bench.iters)
        per_res[str(res)].update(image=t, image_peak_bytes=torch.cuda.max_memory_allocated(device),
                                 image_source="measured: whole pipeline (text encoders, transformer, VAE)")
    del pipe


def bench_model(cfg: Config, mode: str, device: torch.device | str, random_weights: bool) -> nn.Module:
    """The transformer ``bench`` times in ``mode``: random or the workdir's weights. With
    ``model.fuse_projections`` the ternary modes are fused (``fusion.fuse_projections``) and the bf16
    baseline gets diffusers' own ``fuse_qkv_projections``, so both sides run fused Q/K/V."""
    if random_weights:
        net = random_transformer(cfg.model, mode, device, residual_rank=cfg.quantization.residual_rank,
                                 activations=mode_activations(cfg, mode), rotated=cfg.quantization.rotation != "none")
    elif mode == "bf16":
        net = load_fp_transformer(cfg.model, device).eval()  # read block by block onto the device, never whole on the host
    else:
        net = load_quantized_transformer(require(cfg.workdir, "pack"), cfg.model,
                                         mode_activations(cfg, mode, recorded_activations(cfg)), device)
    if cfg.model.fuse_projections:
        net.fuse_qkv_projections() if mode == "bf16" else fuse_projections(net)
    return net


def measure(cfg: Config, random_weights: bool, device: torch.device | str = "cuda") -> dict:
    """Measured step (and image) latency and peak memory per mode and resolution on ``device``
    (made the current device: CUDA events, streams and graphs follow it)."""
    device = torch.device(device)
    with torch.cuda.device(device):
        return _measure(cfg, random_weights, device)


def _measure(cfg: Config, random_weights: bool, device: torch.device) -> dict:
    recorded = None if random_weights else recorded_activations(cfg)  # fails before loading anything
    compiled = "" if cfg.bench.compile == "none" else f", steps torch.compile(fullgraph=True, mode={cfg.bench.compile!r})"
    label = f"measured on {torch.cuda.get_device_name(device)} (CUDA events, median/p90 of {cfg.bench.iters}, batch 1{compiled})"
    per_mode = {}
    for mode in MODES:
        info(f"bench: measuring {mode} ({'random weights' if random_weights else 'workdir weights'})")
        net = bench_model(cfg, mode, device, random_weights)
        per_res = _steps(net, cfg, device)
        if random_weights:
            for r in per_res.values():
                r.update(image_s=r["step"]["median_ms"] * cfg.generate.steps / 1e3,
                         image_source=f"derived: transformer only, {cfg.generate.steps} x median step")
        else:
            _images(net, cfg, device, per_res)
        per_mode[mode] = per_res
        del net
        torch.compiler.reset()  # drop the mode's compiled graphs (and CUDA-graph pools) before the next one
        gc.collect()
        torch.cuda.empty_cache()
    per_resolution = {str(r): {m: {**per_mode[m][str(r)], "source": "measured"} for m in MODES}
                      for r in cfg.bench.resolutions}
    return {"label": label, "device": torch.cuda.get_device_name(device), "random_weights": random_weights,
            "compile": cfg.bench.compile, "w2a8_activations": mode_activations(cfg, "w2a8", recorded),
            "backend": bitflux_kernels.select_backend(device), "per_resolution": per_resolution}
