"""Fused projections of the ternary transformer (Q/K/V, and the MLP input in the single blocks): exactly the
unfused outputs, at the embedded model's width and FLUX.1-dev's, one graph, in the CLI."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from bitflux_cli.bench.measure import bench_model, random_transformer
from bitflux_cli.bench.memory import activation_bytes, dummy_inputs
from bitflux_cli.config import ModelConfig, load_config
from bitflux_cli.errors import UsageError
from bitflux_cli.fusion import Columns, fuse_projections
from bitflux_cli.generate import generate
from bitflux_cli.models.source import KNOWN_ARCHITECTURES, build_meta_transformer, load_fp_transformer
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
        assert fuse_projections(t) == 2 * 2 + 4  # double blocks: image and text QKV; single: QKV + MLP in
        assert fuse_projections(t) == 0  # already fused
        out = t(**inputs)[0]
    assert sum(isinstance(m, TernaryLinear) for m in t.modules()) == layers - 2 * 2 * 2 - 3 * 4  # 3 -> 1, 4 -> 1
    qkv = t.transformer_blocks[0].attn.to_qkv
    assert qkv.packed.shape[0] == 3 * 128 and not hasattr(t.transformer_blocks[0].attn, "to_q")
    single = t.single_transformer_blocks[0]
    assert single.norm.proj.packed.shape[0] == 3 * 128 + 4 * 128  # q | k | v | mlp, one GEMM
    assert isinstance(single.proj_mlp, Columns) and isinstance(single.attn.to_qkv, Columns)
    assert torch.equal(out, ref)  # each row is its own codes x its own scale: stacking changes nothing


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory):
    """A model config of FLUX.1-dev's transformer (3072 wide, 24 heads of 128): one single block, no double one."""
    path = tmp_path_factory.mktemp("wide-flux")
    arch = {**KNOWN_ARCHITECTURES["black-forest-labs/FLUX.1-dev"], "num_layers": 0, "num_single_layers": 1}
    build_meta_transformer(arch).save_config(path / "transformer")
    return ModelConfig(source="black-forest-labs/FLUX.1-dev", path=path)


def test_full_width_single_block_runs_one_exact_gemm(wide_flux):
    """W2A8 with a residual at FLUX.1-dev's width: Q, K, V and the MLP input (3 x 3072 + 12288 rows) as one
    linear, one activation quantization, the same output bit for bit."""
    t = random_transformer(wide_flux, "w2a8", "cpu", residual_rank=4)
    block = t.single_transformer_blocks[0]
    inputs = dummy_inputs(t, 1, 64, 8, "cpu", torch.bfloat16)  # 16 image + 8 text tokens
    with torch.no_grad():
        ref = t(**inputs)[0]
        assert fuse_projections(t) == 1
        out = t(**inputs)[0]
    proj = block.norm.proj
    assert proj.packed.shape == (3 * 3072 + 12288, 3072 // 4) and proj.residual_up.shape == (21504, 4 * 4)
    assert sum(isinstance(m, TernaryLinear) for m in block.modules()) == 3  # norm.linear, fused, proj_out (was 6)
    assert torch.equal(out, ref)


def test_fused_transformer_compiles_to_one_graph():
    """W2A8 with a residual (W2A16 takes the same path with the other op): fused, one graph, the unfused output."""
    t = random_transformer(load_config("tiny").model, "w2a8", "cpu", residual_rank=2)
    inputs = dummy_inputs(t, 1, 64, 8, "cpu", torch.float32)
    with torch.no_grad():
        ref = t(**inputs)[0]
    fuse_projections(t)
    out = compile_one_graph(t, "aot_eager", **inputs)[0]  # one bitflux op per (fused) ternary linear
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


def _lora_on_proj_mlp(t):
    from peft import LoraConfig

    t.add_adapter(LoraConfig(r=2, target_modules=["proj_mlp"]), adapter_name="a")


def _fp_to_k(t):  # in the second double block: the first is not fused either
    t.transformer_blocks[1].attn.to_k = nn.Linear(128, 128)


@pytest.mark.parametrize("change", [_lora_on_proj_mlp, _fp_to_k])
def test_only_plain_ternary_projections_are_fused(change):
    t, _ = ternary_transformer("none")
    change(t)
    layers = sum(isinstance(m, TernaryLinear) for m in t.modules())
    with pytest.raises(UsageError, match="unload LoRA"):
        fuse_projections(t)
    assert sum(isinstance(m, TernaryLinear) for m in t.modules()) == layers  # checked before anything is fused


def test_generate_with_fused_projections_draws_the_same_image(tiny_chain, tmp_path):
    images = []
    for fused in (False, True):
        cfg = load_config("tiny", {"workdir": str(tiny_chain["workdir"]), "model.fuse_projections": fused,
                                   "generate.steps": 2})
        out = generate(cfg, "a red circle above a blue square", tmp_path / f"{fused}.png")
        images.append(np.asarray(Image.open(out["path"])))
    assert images[0].std() > 0 and np.array_equal(*images)


@pytest.mark.parametrize("mode", ["bf16", "w2a16"])
def test_bench_times_fused_models_when_the_config_fuses(mode):
    cfg = load_config("tiny", assignments={"model.fuse_projections": True})
    net = bench_model(cfg, mode, "cpu", random_weights=True)
    attn = net.transformer_blocks[0].attn
    assert attn.fused_projections and hasattr(attn, "to_qkv")  # diffusers' own fusion keeps to_q as well
    assert isinstance(net.single_transformer_blocks[0].proj_mlp, Columns if mode == "w2a16" else nn.Linear)
    assert any(isinstance(m, TernaryLinear) for m in net.modules()) == (mode == "w2a16")


def test_the_activation_projection_reads_a_fused_model_as_the_unfused_one():
    t, _ = ternary_transformer("none")
    unfused = activation_bytes(t, 1, 1024, 512)
    fuse_projections(t)
    assert activation_bytes(t, 1, 1024, 512) == unfused  # proj_mlp is a column slice now, with no out_features
