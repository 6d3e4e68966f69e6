"""The full-precision pipeline as teacher: recorded transformer calls, velocity error, image PSNR."""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from .config import Config, GenerateConfig
from .models import fp_skeleton, load_pipeline, place, resolve_device
from .streaming import materialise, streamed


@dataclass
class Embeds:
    """Text embeddings of prompts, computed once so the text encoders can be freed: [B, T, D] and [B, P]."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, idx) -> "Embeds":
        return Embeds(self.prompt_embeds[idx], self.pooled_prompt_embeds[idx])


@torch.no_grad()
def encode(pipe, prompts: list[str], max_sequence_length: int, batch: int = 8) -> Embeds:
    """The prompts through both text encoders (on their devices), kept on the host."""
    parts = []
    for i in range(0, len(prompts), batch):
        device = pipe.text_encoder_2.device
        embeds, pooled, _ = pipe.encode_prompt(prompts[i:i + batch], prompts[i:i + batch], device=device,
                                               max_sequence_length=max_sequence_length)
        parts.append((embeds.cpu(), pooled.cpu()))
    return Embeds(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


def free_text_encoders(pipe) -> None:
    """Drop the text encoders (T5-XXL is 9.5 GB in bf16): the pipeline then runs on ``Embeds`` only."""
    pipe.text_encoder = pipe.text_encoder_2 = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def fp_pipeline(cfg: Config, stream: bool = False):
    """(pipeline, ``Weights``): the full-precision pipeline, its transformer read from the safetensors
    files block by block.

    ``model.offload``: ``sequential`` (or ``stream``), the blocks are streamed from the files at every
    call (one resident at a time); ``model``, the transformer is read into host memory and diffusers' model
    offload moves whole components to the device; ``none``, every block is read onto the device.
    """
    device = resolve_device(cfg.model)
    transformer, weights = fp_skeleton(cfg.model, "cpu" if cfg.model.offload == "model" else device)
    if stream or cfg.model.offload == "sequential":
        pipe = load_pipeline(cfg.model, transformer)
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name != "transformer":
                component.to(resolve_device(cfg.model, name))
        with streamed(transformer, weights, device):
            yield pipe, weights
        return
    materialise(transformer, weights, "cpu" if cfg.model.offload == "model" else device)
    yield place(load_pipeline(cfg.model, transformer), cfg.model), weights


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A pipeline image [H, W, 3] in [0, 1] as uint8 pixels."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def run_pipeline(pipe, prompts: list[str] | Embeds, gen: GenerateConfig, seed: int | list[int], output_type: str = "np", **kwargs):
    """Run the pipeline on ``prompts`` (or their ``Embeds``) with one seeded generator per prompt (same seed, same image).

    ``seed``: the first prompt's seed, the others counting up from it; or a list, one seed per prompt.
    """
    seeds = seed if isinstance(seed, list) else [seed + i for i in range(len(prompts))]
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    if isinstance(prompts, Embeds):
        device = pipe.transformer.x_embedder.weight.device
        kwargs |= {"prompt_embeds": prompts.prompt_embeds.to(device), "pooled_prompt_embeds": prompts.pooled_prompt_embeds.to(device)}
        prompts = None
    return pipe(prompts, height=gen.height, width=gen.width, num_inference_steps=gen.steps,
                guidance_scale=gen.guidance, generator=generators, output_type=output_type,
                max_sequence_length=gen.max_sequence_length, **kwargs).images


def record_transformer_calls(pipe, prompts: list[str] | Embeds, gen: GenerateConfig, seed: int,
                             keep: int) -> tuple[list[dict], np.ndarray]:
    """The keyword arguments (on the host) of ``keep`` evenly spaced transformer calls of a real
    denoising run (spaced over its ``gen.steps`` steps, one call each), and the run's images
    [B, H, W, 3] in [0, 1]. Only the kept calls are copied to the host."""
    wanted = set(np.linspace(0, gen.steps - 1, num=min(keep, gen.steps)).round().astype(int).tolist())
    calls, seen = [], 0

    def hook(_module, _args, kwargs):
        nonlocal seen
        if seen in wanted:
            calls.append({k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})
        seen += 1

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        images = run_pipeline(pipe, prompts, gen, seed)
    finally:
        handle.remove()
    return calls, images


@torch.no_grad()
def velocity_errors(fp: torch.nn.Module, student: torch.nn.Module, calls: list[dict]) -> list[float]:
    """Relative L2 error ||v_student - v_fp|| / ||v_fp|| of the predicted velocity, per call."""
    errs = []
    for kw in calls:
        v_fp = fp(**kw)[0].float()
        v_q = student(**kw)[0].float()
        errs.append(((v_q - v_fp).norm() / v_fp.norm().clamp_min(1e-12)).item())
    return errs


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two images with values in [0, 1] (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
