"""The optional rotation in front of the codes (``quantization.rotation: hadamard``): the op against a dense
float64 R, the rotated moments, ``TernaryLinear``/``STELinear`` forwards, the format (version 3, validated on
load), quantize -> pack -> load (absmean codes: fast; block-recon: a short run), compile, fused Q/K/V, the
exports that fold it and those that refuse it, and the refusal of distill."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import bitflux_kernels as bk
from bitflux_cli.bench.accounting import storage
from bitflux_cli.bench.measure import random_transformer
from bitflux_cli.bench.memory import dummy_inputs
from bitflux_cli.checkpoint import CheckpointFile, read_checkpoint, save_checkpoint
from bitflux_cli.cli import app
from bitflux_cli.config import load_config
from bitflux_cli.errors import ArtifactError, UsageError
from bitflux_cli.export import dequantized, export
from bitflux_cli.fusion import fuse_projections
from bitflux_cli.loader import load_quantized_transformer
from bitflux_cli.methods.block_recon import reconstruct
from bitflux_cli.methods.ste import STELinear, absmean_init
from bitflux_cli.models import load_fp_transformer, load_pipeline
from bitflux_cli.calibrate import load_calibration
from bitflux_cli.packing import pack
from bitflux_cli.quantize import quantize
from bitflux_cli.rotation import rotated_moment, rotated_weight, signs
from bitflux_cli.ternary import TernaryLinear, _set_submodule, scoped_linears, ternarize
from bitflux_kernels.hadamard import rotate_reference, sylvester
from bitflux_kernels.hadamard_triton import fits, hadamard_triton
from compiled import compile_one_graph
from test_bench_accounting import header_bytes
from test_methods import tiny
from test_residual import _rel, _rewrite


def dense_rotation(s: torch.Tensor) -> torch.Tensor:
    """R [K, K] float64 = diag(signs) @ blockdiag(H_b / sqrt(b)), written out."""
    k = s.shape[0]
    b = bk.block_size(k)
    return s.double()[:, None] * torch.block_diag(*[sylvester(b)] * (k // b))


@pytest.mark.parametrize("k", [640, 128, 3072, 96, 7])
def test_op_is_an_orthogonal_dense_rotation_on_every_backend(k):
    s, x = signs(k), torch.randn(2, 3, k)
    r = dense_rotation(s)
    assert torch.allclose(r @ r.T, torch.eye(k, dtype=torch.float64), atol=1e-12)
    want = (x.double() @ r).float()
    for backend in ("reference", "torch", "triton"):
        assert torch.allclose(torch.ops.bitflux.hadamard(x, s, backend), want, atol=1e-5), backend
    assert torch.allclose(bk.unrotate(want, s), x, atol=1e-5)  # x R R^T
    assert bk.block_size(3072) == 1024 and bk.block_size(12288) == 4096 and bk.block_size(15360) == 1024


F32, BF16, F16 = (torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)


@pytest.mark.parametrize("k, dtype, tol", [(3072, *F32), (3072, *BF16), (3072, *F16), (12288, *BF16), (15360, *F32),
                                           (512, *F16)])  # FLUX's blocks 1024 and 4096; 512 = 16 x 32
def test_triton_kernel_rotates_in_one_pass_against_the_float64_reference(k, dtype, tol):
    # bf16's bound is loose for the interpreter, which truncates fp32 -> bf16 (a GPU rounds to nearest)
    s = signs(k)
    x = torch.randn(7, 2 * k)[:, ::2].to(dtype)  # [7, K], strided: the launcher makes it contiguous
    y = hadamard_triton(x, s)
    assert y.dtype == dtype and y.shape == x.shape
    assert _rel(y, rotate_reference(x.double(), s)) < tol
    assert torch.equal(torch.ops.bitflux.hadamard(x, s, "triton"), y)  # the op's triton backend is this kernel
    assert hadamard_triton(x[:0], s).shape == (0, k)
    assert not fits(640) and fits(512)  # 640's block of 128 (8 x 16) is below tl.dot's 16 x 16: the torch path
    with pytest.raises(ValueError, match="torch"):
        hadamard_triton(torch.randn(2, 640), signs(640))


@pytest.mark.gpu
@pytest.mark.parametrize("k", [3072, 12288, 15360])
def test_compiled_kernel_on_cuda_rounds_once_per_product(k):
    s, x = signs(k).cuda(), torch.randn(4608, k, device="cuda", dtype=torch.bfloat16)
    y = hadamard_triton(x, s)
    ref = rotate_reference(x.double(), s)
    assert _rel(y, ref) < 4e-3 and _rel(bk.rotate_torch(x, s), ref) < 4e-3  # two bf16 roundings each
    assert torch.equal(torch.ops.bitflux.hadamard(x, s, "triton"), y)


def test_signs_are_fixed_per_width_and_the_rotated_moments_are_exact():
    assert torch.equal(signs(640), signs(640)) and not torch.equal(signs(640)[:128], signs(128))
    assert signs(640).dtype == torch.int8 and set(signs(640).tolist()) == {-1, 1}
    d, s = torch.rand(640), signs(640)
    r = dense_rotation(s)
    assert torch.allclose(rotated_moment(d, s).double(), (r.square() * d.double()[:, None]).sum(0), atol=1e-6)  # E[(xR)_j^2]
    assert torch.allclose(rotated_weight(torch.eye(640), s).double(), r, atol=1e-6)  # the rows of I R


def test_ternary_and_ste_layers_compute_x_r_times_the_codes():
    torch.manual_seed(0)
    lin, s = torch.nn.Linear(640, 24), signs(640)
    codes, scale = ternarize(rotated_weight(lin.weight, s))
    layer = TernaryLinear.from_codes(codes, scale, lin.bias.detach(), rotation=s)
    x = torch.randn(5, 640)
    dense = (codes.double() * scale.double()[:, None]) @ dense_rotation(s).T  # W = (s q) R^T
    with torch.no_grad():
        assert _rel(layer(x), x.double() @ dense.T + lin.bias.double()) < 1e-6
        ste = STELinear(lin, *absmean_init(rotated_weight(lin.weight, s)), rotation=s)
        assert _rel(ste(x), layer(x)) < 1e-6  # absmean's start: the same codes, in the same basis
    assert torch.equal(ste.export()[0], codes)
    assert "rotation=hadamard" in repr(layer)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The embedded model quantized (absmean) with the rotation, packed 2-bit."""
    workdir = tmp_path_factory.mktemp("rotated")
    cfg = load_config("tiny", {"workdir": str(workdir), "quantization.method": "absmean"}, {"quantization.rotation": "hadamard"})
    return {"cfg": cfg, "workdir": workdir, "quantize": quantize(cfg), "pack": pack(cfg)}


def test_quantize_pack_load_equals_the_dense_reference(chain, tiny_chain):
    ckpt = CheckpointFile(chain["pack"]["path"])
    assert ckpt.meta["format_version"] == "3" and ckpt.meta["rotation"] == "hadamard" and ckpt.rotated
    assert ckpt.meta["config"]["quantization"]["rotation"] == "hadamard"
    assert "rotation" not in CheckpointFile(tiny_chain["pack"]["path"]).meta["config"]["quantization"]  # default: not recorded
    pure = chain["pack"]
    assert pure["rotation"] == "hadamard" and pure["rotation_bytes"] == sum(k for _, k in ckpt.modules.values())
    t = load_quantized_transformer(chain["pack"]["path"])
    fp = load_fp_transformer(chain["cfg"].model).eval()  # its block weights become (s q) R^T
    with torch.no_grad():
        for name, layer in scoped_linears(fp):
            assert torch.equal(ckpt.read(f"{name}.rotation"), signs(layer.in_features))
            codes, _ = ternarize(rotated_weight(layer.weight, signs(layer.in_features)))
            assert torch.equal(ckpt.codes(name), codes), name  # absmean of W R
            layer.weight.copy_(dequantized(ckpt, name, torch.float32))
        inputs = dummy_inputs(t, 1, 64, 8, "cpu", torch.float32)
        assert _rel(t(**inputs)[0], fp(**inputs)[0]) < 1e-4


def test_a_rotation_with_a_residual_loads_as_its_folded_weights(tmp_path):
    cfg = load_config("tiny", {"workdir": str(tmp_path), "quantization.method": "absmean"},
                      {"quantization.rotation": "hadamard", "quantization.residual_rank": 2})
    quantize(cfg)
    ckpt = CheckpointFile(pack(cfg)["path"])
    assert ckpt.meta["format_version"] == "3" and ckpt.residual_rank == 2 and ckpt.rotated
    t, fp = load_quantized_transformer(ckpt.path), load_fp_transformer(cfg.model).eval()
    with torch.no_grad():
        for name, layer in scoped_linears(fp):
            layer.weight.copy_(dequantized(ckpt, name, torch.float32))  # ((s q) + up @ down) R^T
        inputs = dummy_inputs(t, 1, 64, 8, "cpu", torch.float32)
        assert _rel(t(**inputs)[0], fp(**inputs)[0]) < 1e-4


def test_rotated_transformer_compiles_to_one_graph_and_fuses(chain):
    t = load_quantized_transformer(chain["pack"]["path"])
    inputs = dummy_inputs(t, 1, 64, 8, "cpu", torch.float32)
    with torch.no_grad():
        ref = t(**inputs)[0]
        assert _rel(compile_one_graph(t, "aot_eager", **inputs)[0], ref) < 1e-5
        assert fuse_projections(t) == 2 * 2 + 4
        assert torch.equal(t.transformer_blocks[0].attn.to_qkv.rotation, signs(128))
        assert _rel(t(**inputs)[0], ref) < 1e-6


def test_fusing_a_rotated_layer_with_a_plain_one_is_refused(chain):
    t = load_quantized_transformer(chain["pack"]["path"])
    attn = t.transformer_blocks[0].attn
    k = attn.to_k
    attn.to_k = TernaryLinear(k.in_features, k.out_features, True, dtype=k.bias.dtype)
    with pytest.raises(UsageError, match="rotation"):
        fuse_projections(t)


def test_bfl_export_folds_the_rotation_and_the_ternary_ones_refuse_it(chain, tmp_path):
    export(chain["cfg"], "bfl", tmp_path / "bfl.safetensors")
    ckpt = CheckpointFile(chain["pack"]["path"])
    parts = [f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")]
    want = torch.cat([(ckpt.codes(m).double() * ckpt.read(f"{m}.scale").double()[:, None]
                       @ dense_rotation(ckpt.read(f"{m}.rotation")).T) for m in parts])
    with safe_open(str(tmp_path / "bfl.safetensors"), "pt") as f:
        got = f.get_tensor("double_blocks.0.img_attn.qkv.weight")
    assert got.dtype == torch.bfloat16 and _rel(got, want) < 4e-3  # bf16 rounding
    runner = CliRunner()
    for flags in (["--format", "gguf"], ["--format", "bfl", "--ternary"]):
        res = runner.invoke(app, ["export", "--workdir", str(chain["workdir"]), *flags, str(tmp_path / "x")])
        line = res.stderr.strip()
        assert res.exit_code == 2 and "\n" not in line and "quantization.rotation" in line, line
        assert not (tmp_path / "x").exists()


def test_diffusers_export_carries_the_rotation(chain, tmp_path):
    from diffusers import FluxTransformer2DModel

    export(chain["cfg"], "diffusers", tmp_path / "out")
    weights = tmp_path / "out" / "diffusion_pytorch_model.safetensors"
    assert weights.read_bytes() == open(chain["pack"]["path"], "rb").read()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["format_version"] == 3
    assert "randomized Hadamard" in (tmp_path / "out" / "README.md").read_text()
    loaded = FluxTransformer2DModel.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
    assert loaded.transformer_blocks[0].attn.to_q.rotation.dtype == torch.int8
    ours = load_quantized_transformer(weights)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in ours.state_dict().items())
    loaded.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / weights.name).read_bytes() == weights.read_bytes()


def test_storage_accounting_equals_a_written_rotated_file_and_bench_builds_rotated_layers(tmp_path):
    cfg = load_config("tiny", {"model.dtype": "bfloat16"})
    model = load_fp_transformer(cfg.model)
    linears = dict(scoped_linears(model))
    ternary = {name: ternarize(rotated_weight(m.weight, signs(m.in_features))) for name, m in linears.items()}
    dense = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in linears}
    dense |= {f"{name}.rotation": signs(m.in_features) for name, m in linears.items()}
    path = tmp_path / "rotated.safetensors"
    size = save_checkpoint(path, ternary, dense, "2bit", {"base_model": "embedded", "stage": "pack"})
    acc = storage(model, rotated=True)
    assert CheckpointFile(path).rotated and size - header_bytes(path) == acc["codecs"]["2bit"]["bytes"]
    assert acc["rotation"]["bytes"] == sum(m.in_features for m in linears.values())
    net = random_transformer(cfg.model, "w2a16", "cpu", rotated=True)
    layers = [m for m in net.modules() if isinstance(m, TernaryLinear)]
    assert len(layers) == len(linears) and all(torch.equal(m.rotation, signs(m.in_features)) for m in layers)
    with torch.inference_mode():
        assert net(**dummy_inputs(net, 1, 64, 8, "cpu"))[0].isfinite().all()


M = "transformer_blocks.0.attn.to_q"


@pytest.mark.parametrize("tensors, meta, match", [
    ({f"{M}.rotation": None}, {}, "rotation is missing"),
    ({f"{M}.rotation": torch.ones(64, dtype=torch.int8)}, {}, "rotation is missing or is not int8 \\[128\\]"),
    ({f"{M}.rotation": torch.ones(128)}, {}, "rotation is missing or is not int8"),
    ({}, {"rotation": None}, "does not fit format version 3"),
    ({}, {"format_version": "2"}, "does not fit format version 2"),
    ({f"{M}.rotation": torch.full((128,), 2, dtype=torch.int8)}, {}, "a sign other than -1 or \\+1"),
    ({f"{M}.rotation": torch.full((128,), -128, dtype=torch.int8)}, {}, "a sign other than -1 or \\+1"),
])
def test_inconsistent_rotations_are_refused(chain, tmp_path, tensors, meta, match):
    path = _rewrite(chain["pack"]["path"], tmp_path / "x.safetensors", tensors, **meta)
    with pytest.raises(ArtifactError, match=match):
        load_quantized_transformer(path)


def test_a_rotation_in_a_version_1_file_is_refused(tiny_chain, tmp_path):
    path = _rewrite(tiny_chain["pack"]["path"], tmp_path / "v1.safetensors", {f"{M}.rotation": signs(128)})
    with pytest.raises(ArtifactError, match="records none"):
        CheckpointFile(path)


def test_distill_with_a_rotation_is_a_one_line_usage_error(tmp_path):
    res = CliRunner().invoke(app, ["quantize", "--workdir", str(tmp_path), "--method", "distill",
                                   "--set", "quantization.rotation=hadamard"])
    line = res.stderr.strip()
    assert res.exit_code == 2 and "\n" not in line and "quantization.rotation" in line, line
    res = CliRunner().invoke(app, ["quantize", "--workdir", str(tmp_path), "--set", "quantization.rotation=haar"])
    assert res.exit_code == 2 and "quantization.rotation" in res.stderr and "\n" not in res.stderr.strip()


@pytest.fixture(scope="module", params=["ste", "adaround"])
def recon(tmp_path_factory, request):
    """block-recon with the rotation (eight-prompt calibration, 10 steps a block), through quantize and
    pack, and its trained STE linears, with each of ``block_recon.rounding``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same threads as the stage's run below: the same training, bit for bit
    cfg = tiny(tmp_path_factory.mktemp("rot-recon"), **{"quantization.method": "block-recon", "quantization.block_recon.steps": 10,
                                                        "quantization.block_recon.batch": 4, "quantization.rotation": "hadamard",
                                                        "quantization.block_recon.rounding": request.param})
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    ste = reconstruct(cfg, pipe, load_calibration(cfg), lambda m: m)
    yield {"cfg": cfg, "pipe": pipe, "ste": ste, "quantize": quantize(cfg), "pack": pack(cfg)}
    torch.set_num_threads(n)


def test_block_recon_trains_in_the_rotated_basis_and_packs_its_forward(recon):
    ternary = read_checkpoint(recon["quantize"]["path"])
    assert ternary.meta["format_version"] == "3"
    student = copy.deepcopy(recon["pipe"].transformer)
    for name, m in recon["ste"].items():
        codes, scale = m.export()
        assert torch.equal(m.rotation, signs(m.weight.shape[1])) and torch.equal(ternary.codes(name), codes), name
        assert torch.equal(ternary.tensors[f"{name}.scale"], scale) and torch.equal(ternary.tensors[f"{name}.rotation"], m.rotation)
        _set_submodule(student, name, m)
    packed = load_quantized_transformer(recon["pack"]["path"])
    inputs = dummy_inputs(packed, 1, 64, 8, "cpu", torch.float32)
    with torch.no_grad():
        assert _rel(packed(**inputs)[0], student(**inputs)[0]) < 1e-5
