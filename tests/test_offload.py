"""model.offload: the same image whether the weights sit on the device, move a component or a block at a time."""

import numpy as np
import pytest
import torch
from PIL import Image

from bitflux_cli import load_quantized_transformer
from bitflux_cli.bench.memory import dummy_inputs
from bitflux_cli.config import load_config
from bitflux_cli.generate import generate


@pytest.mark.parametrize("full_precision", [False, True], ids=["packed", "fp"])
def test_offload_modes_draw_the_same_image(tiny_chain, tmp_path, full_precision):
    images = {}
    for mode in ("none", "model", "sequential"):
        cfg = load_config("tiny", {"workdir": str(tiny_chain["workdir"]), "model.offload": mode, "model.device": "cpu",
                                   "generate.steps": 4})
        out = generate(cfg, "a red circle above a blue square", tmp_path / f"{mode}.png", full_precision)
        assert out["offload"] == mode
        images[mode] = np.asarray(Image.open(out["path"]))
    assert images["none"].std() > 0
    assert all(np.array_equal(images["none"], im) for im in images.values())


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_accelerate_leaf_offload_of_the_ternary_transformer(tiny_chain, offload_buffers):
    """``pipe.enable_sequential_cpu_offload()`` hooks each component with accelerate's ``cpu_offload``
    and ``offload_buffers=len(model._parameters) > 0``: False for a FLUX transformer. The packed
    weights are frozen parameters, not buffers, so they leave the execution device between calls
    either way, and the output is unchanged."""
    from accelerate import cpu_offload

    t = load_quantized_transformer(tiny_chain["pack"]["path"])
    inputs = dummy_inputs(t, 1, 64, 8, "cpu", torch.float32)
    with torch.no_grad():
        ref = t(**inputs)[0]
        assert len(t._parameters) == 0  # what makes diffusers pass offload_buffers=False
        cpu_offload(t, "cpu", offload_buffers=offload_buffers)
        layer = t.transformer_blocks[0].attn.to_q
        assert layer.packed.device.type == "meta" and layer.scale.device.type == "meta"
        assert torch.equal(t(**inputs)[0], ref)
        assert layer.packed.device.type == "meta"  # back off the device after the call

