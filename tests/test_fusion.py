"""Fused Q/K/V projections of the ternary transformer: exactly the unfused outputs, one graph, in the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bitflux_cli.bench.memory import dummy_inputs
from bitflux_cli.config import load_config
from bitflux_cli.errors import UsageError
from bitflux_cli.fusion import fuse_projections
from bitflux_cli.generate import generate
from bitflux_cli.models.source import load_fp_transformer
from bitflux_cli.ternary import TernaryLinear, quantize_transformer
from compiled import compile_one_graph


def ternary_transformer(activations):
    t = load_fp_transformer(load_config("tiny").model).eval()
    quantize_transformer(t, activations=activations)
    return t, dummy_inputs(t, 1, 64, 8, "cpu", torch.float32)  # 16 image + 8 text tokens


@pytest.mark.parametrize("activations", ["none", "int8"])
def test_fused_projections_give_the_unfused_output_exactly(activations):
    t, inputs = ternary_transformer(activations)
    layers = sum(isinstance(m, TernaryLinear) for m in t.modules())
    with torch.no_grad():
        ref = t(**inputs)[0]
        assert fuse_projections(t) == 2 * 2 + 4  # double blocks: image and text QKV; single blocks: QKV
        assert fuse_projections(t) == 0  # already fused
        out = t(**inputs)[0]
    assert sum(isinstance(m, TernaryLinear) for m in t.modules()) == layers - 2 * (2 * 2 + 4)
    qkv = t.transformer_blocks[0].attn.to_qkv
    assert qkv.packed.shape[0] == 3 * 128 and not hasattr(t.transformer_blocks[0].attn, "to_q")
    assert torch.equal(out, ref)  # each row is its own codes x its own scale: stacking changes nothing


def test_fused_transformer_compiles_to_one_graph():
    t, inputs = ternary_transformer("none")
    fuse_projections(t)
    with torch.no_grad():
        ref = t(**inputs)[0]
    out = compile_one_graph(t, "eager", **inputs)[0]
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_only_plain_ternary_projections_are_fused():
    t, _ = ternary_transformer("none")
    t.transformer_blocks[0].attn.to_k = nn.Linear(128, 128)  # e.g. a LoRA wrapper or an FP layer
    with pytest.raises(UsageError, match="unload LoRA"):
        fuse_projections(t)


def test_generate_with_fused_projections_draws_the_same_image(tiny_chain, tmp_path):
    images = []
    for fused in (False, True):
        cfg = load_config("tiny", {"workdir": str(tiny_chain["workdir"]), "model.fuse_projections": fused,
                                   "generate.steps": 2})
        out = generate(cfg, "a red circle above a blue square", tmp_path / f"{fused}.png")
        images.append(np.asarray(Image.open(out["path"])))
    assert images[0].std() > 0 and np.array_equal(*images)
