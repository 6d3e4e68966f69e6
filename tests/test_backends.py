"""The quantized embedded transformer draws the same image through every backend."""

import numpy as np
import pytest

from bitflux_cli.generate import generate


@pytest.mark.parametrize("activations", ["int8"])  # W2A16 and fp8: layer by layer in test_kernels_dispatch (35 s an image)
def test_same_image_through_reference_torch_and_triton(tiny_chain, tmp_path, monkeypatch, activations):
    cfg = tiny_chain["cfg"].model_copy(deep=True)
    # one step runs every quantized linear through each backend; the interpreter is slow
    cfg.generate.steps, cfg.quantization.activations = 1, activations
    images = {}
    for backend in ("reference", "torch", "triton"):  # triton runs in the interpreter on CPU
        monkeypatch.setenv("BITFLUX_BACKEND", backend)
        result = generate(cfg, "a green triangle left of a yellow circle", tmp_path / f"{backend}.png")
        assert result["backend"] == backend
        from PIL import Image
        images[backend] = np.asarray(Image.open(result["path"])).astype(np.int16)
    for backend in ("torch", "triton"):
        diff = np.abs(images[backend] - images["reference"])
        # fp32 model: only summation order differs, so at most a grey level here and there
        assert diff.max() <= 2 and diff.mean() < 0.05, (backend, diff.max(), diff.mean())
