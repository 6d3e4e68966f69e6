"""The full-precision pipeline as teacher: recorded transformer calls, velocity error, image PSNR."""

import numpy as np
import torch

from .config import GenerateConfig


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A pipeline image [H, W, 3] in [0, 1] as uint8 pixels."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def run_pipeline(pipe, prompts: list[str], gen: GenerateConfig, seed: int, output_type: str = "np", **kwargs):
    """Run the pipeline on ``prompts`` with one seeded generator per prompt (same seed, same image)."""
    device = pipe._execution_device
    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, height=gen.height, width=gen.width, num_inference_steps=gen.steps,
                guidance_scale=gen.guidance, generator=generators, output_type=output_type,
                max_sequence_length=gen.max_sequence_length, **kwargs).images


def record_transformer_calls(pipe, prompts: list[str], gen: GenerateConfig, seed: int, keep: int) -> list[dict]:
    """The keyword arguments of ``keep`` evenly spaced transformer calls of a real denoising run."""
    calls = []

    def hook(_module, _args, kwargs):
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_pipeline(pipe, prompts, gen, seed, output_type="latent")
    finally:
        handle.remove()
    idx = np.linspace(0, len(calls) - 1, num=min(keep, len(calls))).round().astype(int)
    return [calls[i] for i in sorted(set(idx.tolist()))]


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
