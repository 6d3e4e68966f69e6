"""LoRA on the 1.58-bit transformer through diffusers' own loader (``pipe.load_lora_weights``).

A LoRA is trained here with peft on the embedded FP transformer (every in-scope linear, a few Adam
steps towards a shifted velocity), saved with ``FluxPipeline.save_lora_weights`` and loaded onto the
packed model of ``tiny_chain``. Expected: each ternary layer computes ``ternary(x) + s * B(A(x))``
with the file's A and B, the pipeline moves as the FP pipeline with the same LoRA moves, adapter
weights and several adapters behave as in peft, unloading restores the ternary output bit for bit,
and fusing is refused without changing anything.
"""

import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from bitflux_cli.bench.memory import dummy_inputs
from bitflux_cli.integrations import lora
from bitflux_cli.integrations.lora import TernaryLoraLinear, UnfusableLoraError
from bitflux_cli.loader import load_quantized_transformer
from bitflux_cli.models import load_fp_transformer, load_pipeline
from bitflux_cli.teacher import record_transformer_calls, run_pipeline
from bitflux_cli.ternary import TernaryLinear, scoped_linears
from bitflux_kernels import unpack_2bit

RANK, ALPHA = 4, 8  # scaling alpha / r = 2, carried by the file's adapter metadata
PROMPTS = ["a red circle above a blue square", "two green triangles", "a yellow square left of a red circle"]


def _train_lora(transformer, name, targets, inputs, shift, steps=15):
    """A LoRA named ``name`` on the ``targets`` linears, trained to add ``shift`` to the velocity."""
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=targets)
    transformer.add_adapter(config, adapter_name=name)
    transformer.set_adapters([name])
    params = [p for n, p in transformer.named_parameters() if f".{name}." in n]
    transformer.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    transformer.disable_adapters()
    with torch.no_grad():
        target = transformer(**inputs)[0] + shift
    transformer.enable_adapters()
    opt = torch.optim.Adam(params, lr=1e-3)
    for _ in range(steps):
        loss = (transformer(**inputs)[0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    transformer.requires_grad_(False)
    return get_peft_model_state_dict(transformer, adapter_name=name), config


@pytest.fixture(scope="module")
def loras(tiny_chain, tmp_path_factory):
    """Two LoRAs ("up", "down") in diffusers' file format, the FP pipeline that holds them, and the
    FP pipeline's own transformer calls (real prompts and timesteps, recorded before any LoRA)."""
    cfg = tiny_chain["cfg"]
    fp = load_pipeline(cfg.model)
    gen = cfg.generate.model_copy(update={"steps": 8})
    calls, _ = record_transformer_calls(fp, PROMPTS, gen, 0, keep=8)
    torch.manual_seed(0)
    inputs = dummy_inputs(fp.transformer, 4, 48, 12, "cpu", torch.float32)
    files, targets = {}, [n for n, _ in scoped_linears(fp.transformer)]  # every in-scope linear
    for name, shift in (("up", 0.5), ("down", -0.5)):
        state, config = _train_lora(fp.transformer, name, targets, inputs, shift)
        files[name] = tmp_path_factory.mktemp(f"lora-{name}")
        FluxPipeline.save_lora_weights(files[name], transformer_lora_layers=state,
                                       transformer_lora_adapter_metadata=config.to_dict())
    return {"fp": fp, "files": files, "cfg": cfg, "gen": gen, "calls": calls}


@pytest.fixture()
def pipe(tiny_chain, loras):
    """A fresh pipeline around the packed 1.58-bit transformer (loaded as bitflux loads it)."""
    return load_pipeline(tiny_chain["cfg"].model, load_quantized_transformer(tiny_chain["pack"]["path"]))


def test_loading_a_ternary_transformer_enables_lora_which_it_needs(pipe, tiny_chain, loras):
    """Without its adaptations diffusers cannot load a LoRA onto ternary layers; building a ternary
    transformer (here: loading the packed one) puts them in place, no import of ours needed."""
    lora.disable()
    try:
        assert not lora.is_enabled()
        with pytest.raises(Exception):  # noqa: B017 - diffusers' own failure, whichever it is
            pipe.load_lora_weights(loras["files"]["up"], adapter_name="up")
        assert not any(isinstance(m, TernaryLoraLinear) for m in pipe.transformer.modules())
        load_quantized_transformer(tiny_chain["pack"]["path"])
        assert lora.is_enabled()
    finally:
        lora.enable()
    pipe.load_lora_weights(loras["files"]["up"], adapter_name="up")
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, TernaryLoraLinear)


def _file_tensors(path):
    return {k.removeprefix("transformer."): v for k, v in load_file(path / "pytorch_lora_weights.safetensors").items()}


def _velocity(transformer, inputs):
    with torch.no_grad():
        return transformer(**inputs)[0]


def _inputs(transformer):
    torch.manual_seed(1)
    return dummy_inputs(transformer, 1, 48, 12, "cpu", torch.float32)


def test_every_ternary_layer_gets_an_unmerged_branch_and_keeps_its_packed_weight(pipe, loras):
    t = pipe.transformer
    before = {n: (m, m.packed.clone()) for n, m in t.named_modules() if isinstance(m, TernaryLinear)}
    pipe.load_lora_weights(loras["files"]["up"], adapter_name="up")
    wrapped = {n: m for n, m in t.named_modules() if isinstance(m, TernaryLoraLinear)}
    assert set(wrapped) == set(before) and len(wrapped) == 52
    for n, m in wrapped.items():
        assert m.base_layer is before[n][0] and torch.equal(m.base_layer.packed, before[n][1])
        assert m.merged_adapters == [] and m.scaling["up"] == ALPHA / RANK
        assert m.lora_A["up"].weight.dtype == m.base_layer.bias.dtype == torch.float32


def test_layer_output_is_ternary_plus_scaled_low_rank_branch(pipe, loras):
    pipe.load_lora_weights(loras["files"]["up"], adapter_name="up")
    tensors = _file_tensors(loras["files"]["up"])
    torch.manual_seed(2)
    for name, m in pipe.transformer.named_modules():
        if not isinstance(m, TernaryLoraLinear):
            continue
        a, b = tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"]  # [r, K], [N, r]
        assert b.abs().max() > 0  # trained: the branch is not zero
        x = torch.randn(3, 5, m.in_features)
        out = torch.full((3, 5, m.out_features), float("nan"))
        out.copy_(m(x))
        ref = m.base_layer(x).double() + (ALPHA / RANK) * (x.double() @ a.double().T @ b.double().T)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_velocity_moves_as_the_fp_velocity_moves_with_the_same_lora(pipe, loras):
    """On the FP pipeline's own calls, the LoRA moves the 1.58-bit velocity the way it moves the FP
    one (absmean's ternary network is not the FP one: its velocity error is 1.8, so not cos = 1)."""
    fp, calls = loras["fp"].transformer, loras["calls"]

    def velocities(t):
        return torch.cat([_velocity(t, c).flatten().double() for c in calls])

    fp.set_adapters(["up"])
    fp_delta = velocities(fp)
    fp.disable_adapters()
    fp_delta -= velocities(fp)
    fp.enable_adapters()
    q_delta = -velocities(pipe.transformer)
    pipe.load_lora_weights(loras["files"]["up"], adapter_name="up")
    q_delta += velocities(pipe.transformer)
    cos = torch.nn.functional.cosine_similarity(q_delta, fp_delta, dim=0).item()
    assert cos > 0.5, cos
    assert 0.3 < q_delta.norm() / fp_delta.norm() < 3


def test_pipeline_equals_its_dense_twin_with_the_same_lora(tiny_chain, pipe, loras):
    """The packed pipeline + LoRA draws what an FP pipeline with the dequantized ternary weights
    (codes * scale in plain nn.Linear, peft's own LoRA layers) draws with the same file."""
    twin = load_fp_transformer(tiny_chain["cfg"].model).eval()
    for name, m in pipe.transformer.named_modules():
        if isinstance(m, TernaryLinear):
            dense = twin.get_submodule(name)
            dense.weight.data = unpack_2bit(m.packed, m.in_features).float() * m.scale[:, None]  # [N, K]
            dense.bias.data = m.bias.clone()
    twin_pipe = load_pipeline(tiny_chain["cfg"].model, twin)
    for p in (pipe, twin_pipe):
        p.load_lora_weights(loras["files"]["up"], adapter_name="up")
        p.load_lora_weights(loras["files"]["down"], adapter_name="down")
        p.set_adapters(["up", "down"], adapter_weights=[0.8, 0.3])
    assert isinstance(twin.transformer_blocks[0].attn.to_q.base_layer, torch.nn.Linear)
    ours, ref = (run_pipeline(p, PROMPTS, loras["gen"], 0, output_type="latent").double() for p in (pipe, twin_pipe))
    assert (ours - ref).norm() / ref.norm() < 1e-4


def test_adapter_weights_scale_adapters_add_and_unload_restores_the_ternary_output(pipe, loras):
    t = pipe.transformer
    inputs = _inputs(t)
    ternary = _velocity(t, inputs)
    pipe.load_lora_weights(loras["files"]["up"], adapter_name="up")
    pipe.load_lora_weights(loras["files"]["down"], adapter_name="down")
    layer = t.single_transformer_blocks[1].proj_out
    x = torch.randn(2, 7, layer.in_features)
    base = layer.base_layer(x)

    def branch(**weights):
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
        return layer(x) - base

    up, down = branch(up=1.0), branch(down=1.0)
    assert up.abs().max() > 1e-3 and down.abs().max() > 1e-3
    torch.testing.assert_close(branch(up=0.5), 0.5 * up, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(branch(up=-2.0), -2.0 * up, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(branch(up=1.0, down=1.0), up + down, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(branch(up=0.7, down=0.2), 0.7 * up + 0.2 * down, rtol=1e-5, atol=1e-6)

    pipe.set_adapters(["up", "down"], adapter_weights=[1.0, 1.0])
    assert not torch.allclose(_velocity(t, inputs), ternary, atol=1e-3)
    pipe.disable_lora()
    assert torch.equal(_velocity(t, inputs), ternary)
    pipe.enable_lora()

    pipe.delete_adapters("up")
    assert "up" not in layer.lora_A and set(t.peft_config) == {"down"}
    torch.testing.assert_close(layer(x) - base, down, rtol=1e-5, atol=1e-6)

    pipe.unload_lora_weights()
    assert not any(isinstance(m, TernaryLoraLinear) for m in t.modules())
    assert sum(isinstance(m, TernaryLinear) for m in t.modules()) == 52
    assert torch.equal(_velocity(t, inputs), ternary)


def test_fuse_lora_is_refused_and_changes_nothing(pipe, loras):
    t = pipe.transformer
    inputs = _inputs(t)
    pipe.load_lora_weights(loras["files"]["up"], adapter_name="up")
    with_lora = _velocity(t, inputs)
    with pytest.raises(UnfusableLoraError, match="cannot absorb a LoRA.*Keep it unfused"):
        pipe.fuse_lora(lora_scale=0.5)
    with pytest.raises(UnfusableLoraError, match="transformer_blocks.0.attn.to_q"):
        t.transformer_blocks[0].attn.to_q.merge()  # peft's own merge path (merge_and_unload, merge_adapter)
    assert torch.equal(_velocity(t, inputs), with_lora)  # no layer scaled or merged before the refusal
    assert not any(m.merged_adapters for m in t.modules() if isinstance(m, TernaryLoraLinear))


def test_kohya_lora_lands_on_the_same_ternary_layers(pipe, loras):
    """sd-scripts names (``lora_unet_double_blocks_0_img_attn_qkv``: q, k, v fused, alpha per module),
    made from the "up" LoRA, convert in diffusers to the same deltas on the same ternary layers."""
    tensors = _file_tensors(loras["files"]["up"])
    kohya = {}

    def put(key, names):
        downs = [tensors[f"{n}.lora_A.weight"] for n in names]
        ups = [tensors[f"{n}.lora_B.weight"] for n in names]
        kohya[f"lora_unet_{key}.lora_down.weight"] = torch.cat(downs)  # [len * r, K]
        kohya[f"lora_unet_{key}.lora_up.weight"] = torch.block_diag(*ups)  # q, k, v each reads its own rows
        kohya[f"lora_unet_{key}.alpha"] = torch.tensor(float(ALPHA * len(names)))  # alpha / rank = 2, as "up"

    fused = {"img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
             "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]}
    single = {"img_attn_proj": "attn.to_out.0", "img_mlp_0": "ff.net.0.proj", "img_mlp_2": "ff.net.2",
              "img_mod_lin": "norm1.linear", "txt_attn_proj": "attn.to_add_out", "txt_mlp_0": "ff_context.net.0.proj",
              "txt_mlp_2": "ff_context.net.2", "txt_mod_lin": "norm1_context.linear"}
    covered = []
    for i in range(len(pipe.transformer.transformer_blocks)):
        for key, names in fused.items():
            put(f"double_blocks_{i}_{key}", [f"transformer_blocks.{i}.{n}" for n in names])
            covered += [f"transformer_blocks.{i}.{n}" for n in names]
        for key, n in single.items():
            put(f"double_blocks_{i}_{key}", [f"transformer_blocks.{i}.{n}"])
            covered.append(f"transformer_blocks.{i}.{n}")
    for i in range(len(pipe.transformer.single_transformer_blocks)):
        for key, n in {"linear2": "proj_out", "modulation_lin": "norm.linear"}.items():
            put(f"single_blocks_{i}_{key}", [f"single_transformer_blocks.{i}.{n}"])
            covered.append(f"single_transformer_blocks.{i}.{n}")

    pipe.load_lora_weights(kohya, adapter_name="kohya")
    layers = dict(pipe.transformer.named_modules())
    assert sorted(n for n, m in layers.items() if isinstance(m, TernaryLoraLinear)) == sorted(covered)
    for n in covered:
        a, b = tensors[f"{n}.lora_A.weight"].double(), tensors[f"{n}.lora_B.weight"].double()
        delta = layers[n].get_delta_weight("kohya").double()  # [N, K]
        torch.testing.assert_close(delta, (ALPHA / RANK) * b @ a, rtol=1e-5, atol=1e-7)


def test_a_lora_of_the_wrong_width_is_refused_in_one_line(pipe, loras):
    tensors = _file_tensors(loras["files"]["up"])
    bad = {f"transformer.{k}": v for k, v in tensors.items() if k.startswith("transformer_blocks.0.attn.to_q.")}
    bad["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.randn(RANK, 3)
    with pytest.raises(ValueError, match="ternary layer transformer_blocks.0.attn.to_q takes 128 inputs"):
        pipe.load_lora_weights(bad, adapter_name="bad")


def test_a_lora_on_fused_projections_is_refused_and_changes_nothing(tiny_chain, loras):
    from bitflux_cli.errors import UsageError
    from bitflux_cli.fusion import fuse_projections

    transformer = load_quantized_transformer(tiny_chain["pack"]["path"])
    fuse_projections(transformer)
    fused = load_pipeline(tiny_chain["cfg"].model, transformer)
    with pytest.raises(UsageError, match=r"attn\.to_[qkv], which model\.fuse_projections fused into one linear"):
        fused.load_lora_weights(loras["files"]["up"], adapter_name="up")
    assert not any(isinstance(m, TernaryLoraLinear) for m in transformer.modules())


def test_a_ternary_layer_with_two_adapters_compiles_to_one_graph(pipe, loras):
    """``torch.compile(fullgraph=True)`` through peft's LoRA forward: one graph, the ternary matmul one
    ``torch.ops.bitflux`` call beside the low-rank branches, eager's output."""
    pipe.load_lora_weights(loras["files"]["up"], adapter_name="up")
    pipe.load_lora_weights(loras["files"]["down"], adapter_name="down")
    pipe.set_adapters(["up", "down"], adapter_weights=[0.8, 0.3])
    layer = pipe.transformer.transformer_blocks[1].ff.net[2]
    x = torch.randn(2, 9, layer.in_features)
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        out = torch.compile(layer, fullgraph=True, backend=record)(x)
        ref = layer(x)
    assert len(graphs) == 1
    assert sum("bitflux" in str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function") == 1
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_dora_is_refused_on_a_ternary_layer(pipe):
    config = LoraConfig(r=2, use_dora=True, target_modules=["transformer_blocks.0.attn.to_q"])
    with pytest.raises(ValueError, match="transformer_blocks.0.attn.to_q: only plain LoRA"):
        pipe.transformer.add_adapter(config, adapter_name="dora")
