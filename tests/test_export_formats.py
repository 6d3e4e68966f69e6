"""Exports read back by the other libraries' own readers: the BFL key table by diffusers' converter,
GGUF by the ``gguf`` package's reader and dequantizer, the BFL single file by diffusers'
``FluxTransformer2DModel.from_single_file`` (whose converter fixes the width at 3072, as does
FLUX.1-dev: hence the full-width model with one double and one single block)."""

import json

import gguf
import numpy as np
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from safetensors import safe_open
from typer.testing import CliRunner

from bitflux_cli.artifacts import artifact_path
from bitflux_cli.checkpoint import CheckpointFile, save_checkpoint, unpack, write_checkpoint
from bitflux_cli.cli import app
from bitflux_cli.config import load_config
from bitflux_cli.errors import UsageError
from bitflux_cli.export import export, tensor_bytes
from bitflux_cli.export.gguf import tq1_0_blocks
from bitflux_cli.export.keys import bfl_table, to_diffusers
from bitflux_cli.loader import load_quantized_transformer
from bitflux_cli.models.source import KNOWN_ARCHITECTURES, build_meta_transformer
from bitflux_cli.ternary import in_scope

FULL = dict(KNOWN_ARCHITECTURES["black-forest-labs/FLUX.1-dev"], num_layers=1, num_single_layers=1)
# width 256 (2 heads of 128): every K is a multiple of 256, as in FLUX.1-dev, at 1/150 of the size
NARROW = dict(FULL, num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32)


def make_packed(workdir, arch, seed=0):
    """A packed (2-bit) checkpoint in ``workdir`` as ``bitflux pack`` lays it out: random ternary codes
    (random bytes whose 2-bit field 3 becomes 1: fast at 480 M weights), positive scales, bf16 tensors."""
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    model = build_meta_transformer(arch)
    scoped = {n for n, m in model.named_modules() if in_scope(n, m)}
    specs, modules = {}, {}
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        shape = tuple(t.shape)
        if module in scoped and leaf == "weight":
            n, k = modules[module] = shape  # every K here is a multiple of 128: no padding
            b = rng.integers(0, 256, size=(n, k // 4), dtype=np.uint8)
            packed = torch.from_numpy(b ^ ((b & (b >> 1) & 0x55) << 1))  # fields 0b11 -> 0b01 (code 0)
            scale = (0.5 + torch.rand(n, generator=gen)) * k ** -0.5
            specs |= {f"{module}.codes": (torch.uint8, (n, k // 4), lambda p=packed: p),
                      f"{module}.scale": (torch.float32, (n,), lambda s=scale: s)}
            continue
        if len(shape) == 1:
            t = 1 + 0.1 * torch.randn(shape, generator=gen) if "norm" in name else 0.02 * torch.randn(shape, generator=gen)
        else:
            t = torch.randn(shape, generator=gen) * shape[-1] ** -0.5
        specs[name] = (torch.bfloat16, shape, lambda t=t.bfloat16(): t)
    cfg = load_config("flux-dev", {"workdir": str(workdir)})
    source = {"base_model": "test:random-flux", "revision": "r0", "weights_sha256": {"w.safetensors": "ab" * 32}}
    write_checkpoint(artifact_path(workdir, "pack"), modules, specs, "2bit", {
        "base_model": "test:random-flux", "revision": "r0", "stage": "pack", "config": cfg.resolved(),
        "architecture": arch, "source": source, "inputs": {"method": "absmean"}})
    return cfg


def expected_state(ckpt: CheckpointFile, scale_dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The packed model in diffusers names, fp32: quantized weights codes x scale (scale rounded to ``scale_dtype``)."""
    out = {}
    for name in ckpt.names:
        module, _, leaf = name.rpartition(".")
        if module in ckpt.modules and leaf == "codes":
            out[f"{module}.weight"] = ckpt.codes(module).float() * ckpt.read(f"{module}.scale").to(scale_dtype).float()[:, None]
        elif not (module in ckpt.modules and leaf == "scale"):
            out[name] = ckpt.read(name).float()
    return out


TABLE_FULL = {e.bfl: e for e in bfl_table(FULL)}


def expected_rows(ckpt: CheckpointFile, entry, step: int) -> torch.Tensor:
    """Rows 0, step, 2 step, .. of one BFL tensor, fp32, from the checkpoint: codes x fp16(scale), or as stored."""
    if entry.swap:
        a, b = ckpt.read(entry.parts[0]).float().chunk(2)
        return torch.cat([b, a])[::step]
    out, offset = [], 0
    for name in entry.parts:
        module, _, leaf = name.rpartition(".")
        quantized = leaf == "weight" and module in ckpt.modules
        n = ckpt.modules[module][0] if quantized else ckpt.file.entries[name].shape[0]
        rows = torch.arange(-offset % step, n, step)
        if quantized:
            codes = unpack(ckpt.read(f"{module}.codes")[rows], (len(rows), ckpt.modules[module][1]), ckpt.codec)
            out.append(codes.float() * ckpt.read(f"{module}.scale")[rows].half().float()[:, None])
        else:
            out.append(ckpt.read(name)[rows].float())
        offset += n
    return torch.cat(out)


def read_gguf(path) -> tuple[gguf.GGUFReader, dict[str, torch.Tensor]]:
    """Every tensor of a GGUF file, dequantized by the gguf package, in torch's dim order."""
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(v) for v in reversed(t.shape.tolist()))
        out[t.name] = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type))).reshape(shape)
    return reader, out


def field(reader, key):
    f = reader.get_field(key)
    return None if f is None else f.contents()


@pytest.fixture(scope="module")
def narrow(tmp_path_factory):
    wd = tmp_path_factory.mktemp("narrow")
    return make_packed(wd, NARROW), wd


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    wd = tmp_path_factory.mktemp("full")
    yield make_packed(wd, FULL), wd
    torch.set_num_threads(n)


def test_key_table_covers_the_model_once_and_is_what_diffusers_converts_back():
    for arch in (FULL, dict(FULL, guidance_embeds=False, num_layers=2, num_single_layers=3)):
        sd = build_meta_transformer(arch).state_dict()
        parts = [p for e in bfl_table(arch) for p in e.parts]
        assert sorted(parts) == sorted(sd) and len(parts) == len(set(parts))
    # diffusers' own converter, fed BFL tensors built by the table, gives back the diffusers tensors
    arch = dict(FULL, joint_attention_dim=8, pooled_projection_dim=8, in_channels=8)
    gen = torch.Generator().manual_seed(0)
    # each tensor as a vector of its rows: the converter only splits, swaps and stacks along dim 0
    sd = {k: torch.randn(tuple(v.shape)[:1], generator=gen) for k, v in build_meta_transformer(arch).state_dict().items()}
    bfl = {e.bfl: torch.cat([sd[p] for p in e.parts]) for e in bfl_table(arch)}
    for e in bfl_table(arch):
        if e.swap:
            a, b = bfl[e.bfl].chunk(2)
            bfl[e.bfl] = torch.cat([b, a])
    converted = convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))
    assert converted.keys() == sd.keys()
    assert all(torch.equal(converted[k], sd[k]) for k in sd)
    back = to_diffusers(bfl, arch)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_tq1_0_bytes_equal_the_gguf_packages_own_quantizer():
    codes = torch.from_numpy(np.random.default_rng(1).integers(-1, 2, size=(8, 1024), dtype=np.int8))
    codes[:, ::7] = 1  # every block holds a +1, so gguf's absmax scale is the row's scale
    half = (0.01 + torch.rand(8)).half()
    w = (codes.float() * half.float()[:, None]).numpy()
    ours = tq1_0_blocks(codes, half).numpy()
    assert np.array_equal(ours, gguf.quants.quantize(w, gguf.GGMLQuantizationType.TQ1_0))


@pytest.mark.parametrize("codec", ["tq2_0", "tq1_0", "q2_k"])
def test_gguf_reads_back_as_codes_times_fp16_scale(narrow, tmp_path, codec):
    cfg, wd = narrow
    out = tmp_path / f"m-{codec}.gguf"
    res = export(cfg, "gguf", out, codec)
    reader, tensors = read_gguf(out)
    assert field(reader, "general.architecture") == "flux" and res["bytes"] == out.stat().st_size
    ckpt = CheckpointFile(artifact_path(wd, "pack"))
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert {kinds[f"{m}.weight"] for m in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1")} == {codec.upper()}
    assert kinds["img_in.weight"] == "BF16" and kinds["double_blocks.0.img_attn.qkv.bias"] == "F32"
    got = to_diffusers(tensors, NARROW)
    want, exact = expected_state(ckpt), expected_state(ckpt, torch.float32)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    for m in ckpt.modules:  # and within fp16 rounding (2^-11 relative) of the fp32 scale
        w = f"{m}.weight"
        assert ((got[w] - exact[w]).abs() <= exact[w].abs() * 2.0 ** -11).all()
    assert field(reader, "bitflux.base_model") == "test:random-flux" and field(reader, "bitflux.method") == "absmean"
    assert json.loads(field(reader, "bitflux.source"))["weights_sha256"] == {"w.safetensors": "ab" * 32}


def test_gguf_refuses_narrow_rows_and_scales_fp16_cannot_hold(tiny_chain, tmp_path):
    res = CliRunner().invoke(app, ["export", "--workdir", str(tiny_chain["workdir"]), "--format", "gguf",
                                   str(tmp_path / "mini.gguf")])
    assert res.exit_code == 2 and not (tmp_path / "mini.gguf").exists()
    line = res.stderr.strip()
    assert "\n" not in line and "K % 256 == 0" in line and "K = 128" in line and "--format bfl" in line
    cfg = make_packed(tmp_path / "big", NARROW, seed=3)
    ckpt = CheckpointFile(artifact_path(tmp_path / "big", "pack"))
    with pytest.raises(UsageError):
        export(cfg, "bfl", tmp_path / "x", codec="tq2_0")  # --codec is for gguf only
    tensors = {n: ckpt.read(n) for n in ckpt.names}
    tensors["single_transformer_blocks.0.proj_out.scale"][3] = 1e6  # above fp16's 65504
    ternary = {m: (ckpt.codes(m), tensors[f"{m}.scale"]) for m in ckpt.modules}
    dense = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in ckpt.modules or n.endswith(".bias")}
    save_checkpoint(artifact_path(tmp_path / "big", "pack"), ternary, dense, "2bit",
                    {k: ckpt.meta[k] for k in ("base_model", "revision", "stage", "config", "architecture", "source", "inputs")})
    with pytest.raises(UsageError, match="single_blocks.0.linear2.*fp16"):
        export(cfg, "gguf", tmp_path / "big.gguf")
    assert not (tmp_path / "big.gguf").exists()


def test_bfl_ternary_is_a_valid_checkpoint_with_bfl_names_that_safetensors_reads(narrow, tmp_path):
    cfg, wd = narrow
    export(cfg, "bfl", tmp_path / "t.safetensors", ternary=True)
    export(cfg, "bfl", tmp_path / "b.safetensors")
    with safe_open(tmp_path / "t.safetensors", "pt") as f:
        meta, names = f.metadata(), set(f.keys())
    assert "single_blocks.0.linear1.codes" in names and "double_blocks.0.img_attn.qkv.scale" in names
    assert not any(n.startswith("transformer_blocks") for n in names)
    assert meta["stage"] == "export:bfl" and json.loads(meta["inputs"])["naming"] == "bfl"
    tern = CheckpointFile(tmp_path / "t.safetensors")  # checksums, codes and scales validated
    with safe_open(tmp_path / "b.safetensors", "pt") as f:
        for m, (n, k) in tern.modules.items():
            w = tern.codes(m).bfloat16() * tern.read(f"{m}.scale").bfloat16()[:, None]
            assert torch.equal(f.get_tensor(f"{m}.weight"), w), m
        assert f.metadata()["base_model"] == "test:random-flux" and f.metadata()["method"] == "absmean"


@pytest.mark.parametrize("codec", ["tq2_0", "q2_k"])
def test_full_width_gguf_holds_every_tensor_as_codes_times_fp16_scale(full, tmp_path, codec):
    cfg, wd = full
    res = CliRunner().invoke(app, ["export", "--workdir", str(wd), "--format", "gguf", "--codec", codec,
                                   str(tmp_path / "f.gguf"), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["ternary_tensors"] == 13
    ckpt = CheckpointFile(artifact_path(wd, "pack"))
    reader = gguf.GGUFReader(tmp_path / "f.gguf")
    # names and shapes: diffusers' own converter turns the file's tensors into the packed model's
    shapes = {t.name: torch.empty(tuple(int(v) for v in reversed(t.shape.tolist())), device="meta") for t in reader.tensors}
    converted = convert_flux_transformer_checkpoint_to_diffusers(shapes)
    want = {n: (ckpt.modules[n.rpartition(".")[0]] if n.rpartition(".")[0] in ckpt.modules and n.endswith(".weight")
                else ckpt.file.entries[n].shape) for n in build_meta_transformer(FULL).state_dict()}
    assert {n: tuple(t.shape) for n, t in converted.items()} == {n: tuple(s) for n, s in want.items()}
    # values: every 61st row of every tensor, dequantized by gguf, against the checkpoint's
    for t in reader.tensors:
        got = torch.from_numpy(np.array(gguf.quants.dequantize(np.asarray(t.data)[::61], t.tensor_type)))
        want = expected_rows(ckpt, TABLE_FULL[t.name], 61)
        assert torch.equal(got.reshape(want.shape), want), t.name


def test_full_width_bfl_file_loads_with_from_single_file_and_matches_the_packed_model(full, tmp_path):
    cfg, wd = full
    out = tmp_path / "flux-bfl.safetensors"
    res = CliRunner().invoke(app, ["export", "--workdir", str(wd), "--format", "bfl", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    with safe_open(out, "pt") as f:
        meta = f.metadata()
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {"BF16"}
    assert meta["base_model"] == "test:random-flux" and meta["codec"] == "2bit" and meta["method"] == "absmean"
    assert json.loads(meta["source"])["revision"] == "r0"
    build_meta_transformer(FULL).save_config(tmp_path / "config")
    model = FluxTransformer2DModel.from_single_file(str(out), config=str(tmp_path / "config"), torch_dtype=torch.bfloat16)
    ckpt = CheckpointFile(artifact_path(wd, "pack"))
    sd = model.state_dict()
    assert sd.keys() == set(build_meta_transformer(FULL).state_dict())
    for name, t in sd.items():  # every 61st row: codes x bf16(scale), exactly bf16(codes x scale)
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and module in ckpt.modules:
            rows = torch.arange(0, t.shape[0], 61)
            codes = unpack(ckpt.read(f"{module}.codes")[rows], (len(rows), t.shape[1]), ckpt.codec)
            assert torch.equal(t[rows], codes.bfloat16() * ckpt.read(f"{module}.scale")[rows].bfloat16()[:, None]), name
        else:
            assert torch.equal(t, ckpt.read(name)), name

    packed = load_quantized_transformer(artifact_path(wd, "pack"))  # bf16, as FLUX runs
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 64, generator=gen).bfloat16(),
                  encoder_hidden_states=torch.randn(1, 8, 4096, generator=gen).bfloat16(),
                  pooled_projections=torch.randn(1, 768, generator=gen).bfloat16(), timestep=torch.tensor([0.7]),
                  img_ids=torch.stack([torch.zeros(16), torch.arange(16.) // 4, torch.arange(16.) % 4], -1),
                  txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]), return_dict=False)
    with torch.no_grad():
        a, b = packed(**inputs)[0], model(**inputs)[0]
    assert torch.isfinite(a).all() and a.std() > 0
    rel = ((a.float() - b.float()).norm() / a.float().norm()).item()
    assert rel < 3e-2, rel  # bf16 rounding (each row's scale, the activations); a wrong key is O(1)


def test_tensor_bytes_predicts_the_exported_sizes(narrow, tmp_path):
    cfg, wd = narrow
    planned = tensor_bytes(NARROW)

    def safetensors_data(path):
        with open(path, "rb") as f:
            return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")

    assert safetensors_data(artifact_path(wd, "pack")) == planned["packed_2bit"]
    export(cfg, "bfl", tmp_path / "b.safetensors")
    assert safetensors_data(tmp_path / "b.safetensors") == planned["bf16"]
    for codec in ("tq2_0", "tq1_0", "q2_k"):
        export(cfg, "gguf", tmp_path / f"{codec}.gguf", codec)
        reader = gguf.GGUFReader(tmp_path / f"{codec}.gguf")
        data = sum(int(t.n_bytes) for t in reader.tensors)
        assert data == planned[f"gguf_{codec}"], codec
