"""The optional low-rank residual (``quantization.residual_rank``): its optimality, the format (version 2,
validated on load), quantize -> pack -> load for both codecs, compile, fused Q/K/V, LoRA, exports and
the storage accounting, on the embedded model (absmean codes: fast); block-recon training it with the
codes (a short run on an eight-prompt calibration)."""

import copy

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from bitflux_cli.bench.accounting import storage
from bitflux_cli.bench.memory import dummy_inputs
from bitflux_cli.checkpoint import RESIDUAL, CheckpointFile, read_checkpoint, save_checkpoint
from bitflux_cli.cli import app
from bitflux_cli.calibrate import load_calibration
from bitflux_cli.config import load_config
from bitflux_cli.errors import ArtifactError, UsageError
from bitflux_cli.export import export
from bitflux_cli.fusion import fuse_projections
from bitflux_cli.fidelity import REPORT_PROMPTS
from bitflux_cli.loader import load_quantized_transformer
from bitflux_cli.methods.act_aware import search, threshold_codes
from bitflux_cli.methods.block_recon import reconstruct
from bitflux_cli.methods.ste import STELinear, optimizer
from bitflux_cli.models import build_meta_transformer, load_fp_transformer, load_pipeline
from bitflux_cli.packing import pack
from bitflux_cli.quantize import quantize
from bitflux_cli.residual import low_rank_residual
from bitflux_cli.teacher import record_transformer_calls
from bitflux_cli.tensorfile import CHECKSUMS, TensorFile, specs_of, write_tensorfile
from bitflux_cli.ternary import TernaryLinear, _set_submodule, scoped_linears, ternarize
from compiled import compile_one_graph
from test_methods import block_error, tiny

RANK = 4


def _rel(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def weighted_error(weight, codes, scale, residual, d):
    """sum_nk d_k (W - s Q - up @ down)_nk^2, in float64."""
    w_hat = scale.double()[:, None] * codes.double()
    if residual is not None:
        w_hat = w_hat + residual[0].double() @ residual[1].double()
    return float((d.double() * (weight.double() - w_hat) ** 2).sum())


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The embedded model quantized (absmean) with a rank-4 residual, packed 2bit and base3 (in a copy)."""
    out = {}
    for codec in ("2bit", "base3"):
        workdir = tmp_path_factory.mktemp(f"resid-{codec}")
        if out:
            shutil.copytree(out["2bit"]["workdir"] / "ternary", workdir / "ternary")
        cfg = load_config("tiny", {"workdir": str(workdir), "quantization.method": "absmean", "pack.codec": codec},
                          {"quantization.residual_rank": RANK})
        q = out.get("2bit", {}).get("quantize") or quantize(cfg)
        out[codec] = {"cfg": cfg, "workdir": workdir, "quantize": q, "pack": pack(cfg)}
    return out


def test_weighted_error_falls_with_the_rank_and_is_the_svd_tail():
    torch.manual_seed(0)
    weight = torch.randn(96, 160) * torch.linspace(0.2, 2, 160)  # [N, K]
    d = torch.rand(160) ** 4 * 10  # [K]: second moments over a wide range, as activations have
    codes, scale = ternarize(weight)
    errors = [weighted_error(weight, codes, scale, low_rank_residual(weight, codes, scale, r, d) if r else None, d)
              for r in (0, 1, 2, 4, 8, 16, 32, 64, 96)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    sv = torch.linalg.svdvals((weight - scale[:, None] * codes) * d.sqrt()).double()  # Eckart-Young: the tail
    for r, err in zip((4, 16), (errors[3], errors[5])):
        assert err == pytest.approx(float((sv[r:] ** 2).sum()), rel=2e-2)  # bf16 factors: ~1% off the optimum
    plain = low_rank_residual(weight, codes, scale, 8)  # unweighted SVD: worse under the weighted error
    assert weighted_error(weight, codes, scale, plain, d) > 1.2 * errors[4]
    up, down = low_rank_residual(weight, codes, scale, 8, d)
    assert up.shape == (96, 8) and down.shape == (8, 160) and up.dtype == down.dtype == torch.bfloat16


def test_ste_linear_trains_its_residual_and_exports_what_it_runs():
    torch.manual_seed(0)
    lin, d = torch.nn.Linear(40, 24), torch.rand(40) + 0.1  # [N=24, K=40], d [K]
    threshold, scale = search(lin.weight, d, [0.5, 0.7])
    start = low_rank_residual(lin.weight, threshold_codes(lin.weight.detach(), threshold), scale, RANK, d)
    m = STELinear(lin, threshold, scale, True, start)
    opt = optimizer({"lin": m}, 1e-4, 1e-3, 1e-3)
    x, target = torch.randn(64, 40), torch.randn(64, 24)
    for _ in range(5):
        opt.zero_grad()
        (m(x) - target).square().mean().backward()
        opt.step()
    codes, scale, (up, down) = m.export()
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert up.dtype == down.dtype == torch.bfloat16 and up.shape == (24, RANK) and down.shape == (RANK, 40)
    assert not torch.equal(up, start[0]) and not torch.equal(down, start[1])  # trained
    with torch.no_grad():  # the STE forward uses the factors rounded as exported: the same layer
        assert _rel(TernaryLinear.from_codes(codes, scale, lin.bias, "none", (up, down))(x), m(x)) < 1e-6


@pytest.fixture(scope="module")
def recon(tmp_path_factory):
    """block-recon's trained STE linears at ranks 0 and RANK (eight-prompt calibration, 10 steps a block),
    and the RANK run again through quantize and pack."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threads as the stage's run below: the same training, bit for bit
    cfg = tiny(tmp_path_factory.mktemp("recon"), **{"quantization.method": "block-recon", "quantization.block_recon.steps": 10,
                                                    "quantization.block_recon.batch": 4, "quantization.residual_rank": RANK})
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    calib = load_calibration(cfg)
    ste = {r: reconstruct(cfg, pipe, calib, lambda m: m, r) for r in (0, RANK)}
    held_out, _ = record_transformer_calls(pipe, REPORT_PROMPTS[:2], cfg.generate, seed=10_000, keep=4)
    yield {"cfg": cfg, "pipe": pipe, "ste": ste, "held_out": held_out, "quantize": quantize(cfg), "pack": pack(cfg)}
    torch.set_num_threads(n)


def test_block_recon_with_a_residual_lowers_the_block_error(recon):
    errors = {r: block_error(recon["pipe"], {name: m.export() for name, m in ste.items()}, recon["held_out"])
              for r, ste in recon["ste"].items()}
    assert errors[RANK] < 0.9 * errors[0], errors


def test_learned_rounding_trains_the_residual_with_its_codes(recon):
    cfg = recon["cfg"].model_copy(deep=True)
    cfg.quantization.block_recon.rounding = "adaround"
    ste = {r: reconstruct(cfg, recon["pipe"], load_calibration(cfg), lambda m: m, r) for r in (0, RANK)}
    for m in ste[RANK].values():
        codes, scale, (up, down) = m.export()
        assert set(codes.unique().tolist()) <= {-1, 0, 1} and up.shape[1] == down.shape[0] == RANK
    errors = {r: block_error(recon["pipe"], {name: m.export() for name, m in s.items()}, recon["held_out"]) for r, s in ste.items()}
    assert errors[RANK] < 0.95 * errors[0], errors  # measured 0.204 against 0.238


def test_block_recon_exports_its_trained_residual_and_packs_its_forward(recon):
    ternary = read_checkpoint(recon["quantize"]["path"])
    for name, m in recon["ste"][RANK].items():
        codes, scale, (up, down) = m.export()
        assert torch.equal(ternary.codes(name), codes) and torch.equal(ternary.tensors[f"{name}.scale"], scale)
        assert torch.equal(ternary.tensors[f"{name}.residual_up"], up), name  # the trained one, not refitted after
        assert torch.equal(ternary.tensors[f"{name}.residual_down"], down), name
    student = copy.deepcopy(recon["pipe"].transformer)
    for name, m in recon["ste"][RANK].items():
        _set_submodule(student, name, m)
    packed = load_quantized_transformer(recon["pack"]["path"])
    inputs = dummy_inputs(packed, 1, 64, 8, "cpu", torch.float32)
    with torch.no_grad():
        assert _rel(packed(**inputs)[0], student(**inputs)[0]) < 1e-5


def test_distill_trains_pure_ternary_and_gets_the_residual_fitted_after(recon, tmp_path):
    shutil.copytree(recon["cfg"].workdir / "calib", tmp_path / "calib")
    cfg = tiny(tmp_path, **{"quantization.method": "distill", "quantization.distill.steps": 2, "quantization.residual_rank": RANK})
    ternary = read_checkpoint(quantize(cfg)["path"])
    calib, fp = load_calibration(cfg), recon["pipe"].transformer
    for name in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.proj_out"):  # not only the first block's
        scale = ternary.tensors[f"{name}.scale"]
        up, down = low_rank_residual(fp.get_submodule(name).weight, ternary.codes(name), scale, RANK, calib.second_moment(name))
        assert torch.equal(ternary.tensors[f"{name}.residual_up"], up) and torch.equal(ternary.tensors[f"{name}.residual_down"], down)


def test_dead_input_channels_stay_finite():
    weight, d = torch.randn(8, 16), torch.rand(16)
    d[:5] = 0
    up, down = low_rank_residual(weight, *ternarize(weight), 2, d)
    assert up.isfinite().all() and down.isfinite().all()
    up, down = low_rank_residual(weight, *ternarize(weight), 2, torch.zeros(16))  # no signal at all: plain SVD
    assert down.isfinite().all()


def test_quantize_records_the_residual_and_its_fidelity_is_better(chain, tiny_chain):
    meta = CheckpointFile(chain["2bit"]["quantize"]["path"]).meta
    assert meta["format_version"] == "2" and meta["residual_rank"] == str(RANK)
    assert meta["config"]["quantization"]["residual_rank"] == RANK
    pure = CheckpointFile(tiny_chain["quantize"]["path"]).meta["config"]["quantization"]
    assert "residual_rank" not in pure and "residual_lr" not in pure["block_recon"]
    ours, pure = chain["2bit"]["quantize"]["fidelity"], tiny_chain["quantize"]["fidelity"]
    assert ours["velocity_rel_error"] < 0.8 * pure["velocity_rel_error"]  # same absmean codes, plus the residual
    assert ours["image_psnr_db"] > pure["image_psnr_db"]


@pytest.mark.parametrize("codec", ["2bit", "base3"])
def test_quantize_pack_load_equals_the_dense_reference(chain, codec):
    ternary = read_checkpoint(chain[codec]["quantize"]["path"])
    t = load_quantized_transformer(chain[codec]["pack"]["path"])
    fp = load_fp_transformer(chain[codec]["cfg"].model).eval()  # its block weights become s*Q + up @ down
    g = torch.Generator().manual_seed(0)
    for name, layer in scoped_linears(fp):
        up, down = (ternary.tensors[f"{name}.{leaf}"] for leaf in RESIDUAL)
        dense = ternary.tensors[f"{name}.scale"][:, None] * ternary.codes(name).float() + up.float() @ down.float()
        with torch.no_grad():
            layer.weight.copy_(dense)
        x = torch.randn(3, layer.in_features, generator=g)
        ours = t.get_submodule(name)
        assert ours.residual_up.dtype == torch.bfloat16 and ours.residual_up.shape == (layer.out_features, RANK)
        with torch.no_grad():
            assert _rel(ours(x), layer(x)) < 1e-5, name
    inputs = dummy_inputs(t, 1, 64, 8, "cpu", torch.float32)
    with torch.no_grad():
        assert _rel(t(**inputs)[0], fp(**inputs)[0]) < 1e-4


def test_residual_transformer_compiles_to_one_graph(chain):
    t = load_quantized_transformer(chain["2bit"]["pack"]["path"])
    inputs = dummy_inputs(t, 1, 64, 8, "cpu", torch.float32)
    with torch.no_grad():
        ref = t(**inputs)[0]
    assert _rel(compile_one_graph(t, "aot_eager", **inputs)[0], ref) < 1e-5


@pytest.mark.parametrize("activations", ["none", "int8"])
def test_fused_projections_with_residuals(chain, activations):
    t = load_quantized_transformer(chain["2bit"]["pack"]["path"], activations=activations)
    inputs = dummy_inputs(t, 1, 64, 8, "cpu", torch.float32)
    with torch.no_grad():
        ref = t(**inputs)[0]
        assert fuse_projections(t) == 2 * 2 + 4
        out = t(**inputs)[0]
    qkv = t.transformer_blocks[0].attn.to_qkv
    assert qkv.residual_up.shape == (3 * 128, 3 * RANK) and qkv.residual_down.shape == (3 * RANK, 128)
    assert torch.equal(qkv.residual_up[:128, RANK:], torch.zeros(128, 2 * RANK, dtype=torch.bfloat16))  # block-diagonal
    assert _rel(out, ref) < 1e-6  # the same products; the other parts add exact zeros


def test_fusing_a_residual_with_a_plain_layer_is_refused(chain):
    t = load_quantized_transformer(chain["2bit"]["pack"]["path"])
    attn = t.transformer_blocks[0].attn
    k = attn.to_k
    attn.to_k = TernaryLinear(k.in_features, k.out_features, True, dtype=k.bias.dtype)
    with pytest.raises(UsageError, match="residual"):
        fuse_projections(t)


def test_lora_on_a_layer_with_a_residual(chain):
    from peft import LoraConfig

    from bitflux_cli.integrations.lora import TernaryLoraLinear

    t = load_quantized_transformer(chain["2bit"]["pack"]["path"])
    base = t.transformer_blocks[0].attn.to_q
    x = torch.randn(2, 5, base.in_features)
    with torch.no_grad():
        ref = base(x)
    t.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"], init_lora_weights="gaussian"), adapter_name="a")
    wrapped = t.transformer_blocks[0].attn.to_q
    assert isinstance(wrapped, TernaryLoraLinear) and wrapped.base_layer is base
    with torch.no_grad():
        wrapped.lora_B["a"].weight.normal_()  # peft starts B at zero
        y, lora = wrapped(x), wrapped.lora_B["a"](wrapped.lora_A["a"](x)) * wrapped.scaling["a"]
    assert lora.abs().max() > 0 and torch.allclose(y, ref + lora, rtol=1e-5, atol=1e-6)


def test_pack_and_bench_count_the_residual_bytes_exactly(chain):
    for codec in ("2bit", "base3"):
        result, f = chain[codec]["pack"], TensorFile(chain[codec]["pack"]["path"])
        sizes = {n: e.end - e.start for n, e in f.entries.items()}
        modules = CheckpointFile(result["path"]).modules
        residual = sum(v for n, v in sizes.items() if n.rpartition(".")[2] in RESIDUAL)
        ternary = sum(v for n, v in sizes.items() if n.rpartition(".")[0] in modules
                      and n.rpartition(".")[2] in ("codes", "scale", *RESIDUAL))
        weights = sum(n * k for n, k in modules.values())
        assert result["residual_rank"] == RANK and result["residual_bytes"] == residual
        assert residual == 2 * RANK * sum(n + k for n, k in modules.values())
        assert result["bits_per_weight"] == pytest.approx(8 * ternary / weights)
        acc = storage(build_meta_transformer(chain[codec]["cfg"].model), RANK)
        assert acc["codecs"][codec]["residual_bytes"] == residual
        assert acc["codecs"][codec]["bits_per_weight"] == pytest.approx(result["bits_per_weight"])


def test_accounting_equals_a_written_file_with_a_residual(tmp_path):
    cfg = load_config("tiny", {"model.dtype": "bfloat16"})
    model = load_fp_transformer(cfg.model)
    linears = dict(scoped_linears(model))
    ternary = {name: ternarize(m.weight) for name, m in linears.items()}
    dense = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in linears}
    for name, m in linears.items():
        up, down = low_rank_residual(m.weight, *ternary[name], 3)
        dense |= {f"{name}.residual_up": up, f"{name}.residual_down": down}
    path = tmp_path / "r3.safetensors"
    size = save_checkpoint(path, ternary, dense, "base3", {"base_model": "embedded", "stage": "pack"})
    with open(path, "rb") as f:
        header = 8 + int.from_bytes(f.read(8), "little")
    assert size - header == storage(model, 3)["codecs"]["base3"]["bytes"]


def test_bfl_export_folds_the_residual_and_the_others_refuse_it(chain, tmp_path):
    cfg = chain["2bit"]["cfg"]
    export(cfg, "bfl", tmp_path / "bfl.safetensors")
    ckpt = CheckpointFile(chain["2bit"]["pack"]["path"])
    parts = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    want = torch.cat([(ckpt.codes(m).float() * ckpt.read(f"{m}.scale")[:, None]
                       + ckpt.read(f"{m}.residual_up").float() @ ckpt.read(f"{m}.residual_down").float()).bfloat16()
                      for m in parts])
    with safe_open(str(tmp_path / "bfl.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("double_blocks.0.img_attn.qkv.weight"), want)
    runner = CliRunner()
    for flags in (["--format", "gguf"], ["--format", "bfl", "--ternary"]):
        res = runner.invoke(app, ["export", "--workdir", str(chain["2bit"]["workdir"]), *flags, str(tmp_path / "x")])
        line = res.stderr.strip()
        assert res.exit_code == 2 and "\n" not in line and "quantization.residual_rank" in line, line
        assert not (tmp_path / "x").exists()


def test_diffusers_export_carries_the_residual(chain, tmp_path):
    from diffusers import FluxTransformer2DModel

    export(chain["base3"]["cfg"], "diffusers", tmp_path / "out")
    weights = tmp_path / "out" / "diffusion_pytorch_model.safetensors"
    assert weights.read_bytes() == open(chain["base3"]["pack"]["path"], "rb").read()
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["format_version"] == 2 and f"rank {RANK}" in (tmp_path / "out" / "README.md").read_text()
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    assert loaded.transformer_blocks[0].attn.to_q.residual_up.dtype == torch.bfloat16  # as stored, not cast
    ours = load_quantized_transformer(weights)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ours.state_dict().items())
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / weights.name).read_bytes() == weights.read_bytes()


def _rewrite(src, dst, tensors=None, **meta):
    """``src`` written again at ``dst`` with changed tensors and metadata (checksums recomputed)."""
    f = TensorFile(src)
    t = {n: f.read(n) for n in f.entries} | (tensors or {})
    t = {n: v for n, v in t.items() if v is not None}
    header = {k: v for k, v in f.metadata.items() if k != CHECKSUMS} | meta
    write_tensorfile(dst, specs_of(t.items()), {k: v for k, v in header.items() if v is not None})
    return dst


M = "transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize("case, tensors, meta, match", [
    ("labelled version 1", {}, {"format_version": "1"}, "does not fit format version 1"),
    ("no rank recorded", {}, {"residual_rank": None}, "does not fit format version 2"),
    ("rank not a number", {}, {"residual_rank": "four"}, "residual_rank 'four'"),
    ("rank differs from the tensors", {}, {"residual_rank": "3"}, "residual_up is missing or is not bfloat16"),
    ("up removed", {f"{M}.residual_up": None}, {}, "residual_up is missing"),
    ("down in fp32", {f"{M}.residual_down": torch.zeros(RANK, 128)}, {}, "residual_down is missing or is not bfloat16"),
    ("up transposed", {f"{M}.residual_up": torch.zeros(RANK, 128, dtype=torch.bfloat16)}, {}, "residual_up is missing"),
])
def test_inconsistent_residuals_are_refused(chain, tmp_path, case, tensors, meta, match):
    path = _rewrite(chain["2bit"]["pack"]["path"], tmp_path / "x.safetensors", tensors, **meta)
    with pytest.raises(ArtifactError, match=match):
        load_quantized_transformer(path)


def test_residual_in_a_version_1_file_and_nan_values_are_refused(chain, tiny_chain, tmp_path):
    stray = {f"{M}.residual_up": torch.zeros(128, 2, dtype=torch.bfloat16)}
    path = _rewrite(tiny_chain["pack"]["path"], tmp_path / "v1.safetensors", stray)
    with pytest.raises(ArtifactError, match="no residual_rank"):
        CheckpointFile(path)
    nan = torch.full((128, RANK), float("nan"), dtype=torch.bfloat16)
    path = _rewrite(chain["2bit"]["pack"]["path"], tmp_path / "nan.safetensors", {f"{M}.residual_up": nan})
    with pytest.raises(ArtifactError, match="NaN or infinite"):
        load_quantized_transformer(path)


def test_bad_ranks_are_one_line_usage_errors(tmp_path):
    cfg = load_config("tiny", {"workdir": str(tmp_path), "quantization.method": "absmean"},
                      {"quantization.residual_rank": 129})
    with pytest.raises(UsageError, match=r"min\(N, K\) = 128"):
        quantize(cfg)
    res = CliRunner().invoke(app, ["quantize", "--workdir", str(tmp_path), "--set", "quantization.residual_rank=-1"])
    assert res.exit_code == 2 and "quantization.residual_rank" in res.stderr and "\n" not in res.stderr.strip()
