"""``quant_method: bitflux`` inside diffusers: registration, loading without FP block weights, the
``save_pretrained`` -> ``from_pretrained`` round trip (byte-identical), push_to_hub's folder (offline:
the hub calls are replaced), refusals of damaged files and of full-precision checkpoints."""

import json
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.quantizers import auto
from diffusers.utils import hub_utils
from huggingface_hub import ModelCard
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from bitflux_cli.artifacts import file_sha256
from bitflux_cli.checkpoint import CheckpointFile
from bitflux_cli.config import load_config
from bitflux_cli.errors import ArtifactError, UsageError
from bitflux_cli.export import export
from bitflux_cli.integrations import diffusers_quantizer as dq
from bitflux_cli.integrations import hooks
from bitflux_cli.integrations.diffusers import from_pretrained
from bitflux_cli.loader import load_quantized_transformer
from bitflux_cli.packing import pack
from bitflux_cli.ternary import TernaryLinear, scoped_linears

WEIGHTS = "diffusion_pytorch_model.safetensors"


def export_dir(cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    export(cfg, "diffusers", out)
    return out, cfg


@pytest.fixture(scope="module")
def exported_2bit(tiny_chain, tmp_path_factory):
    return export_dir(tiny_chain["cfg"], tmp_path_factory)


@pytest.fixture(scope="module", params=["2bit", "base3"])
def exported(request, tiny_chain, exported_2bit, tmp_path_factory):
    """``export --format diffusers`` of the tiny chain packed with each codec (base3: repacked in a copy)."""
    if request.param == "2bit":
        return exported_2bit
    workdir = tmp_path_factory.mktemp("base3")
    shutil.copytree(tiny_chain["workdir"] / "ternary", workdir / "ternary")
    cfg = load_config("tiny", {"workdir": str(workdir), "quantization.method": "absmean", "pack.codec": "base3"})
    pack(cfg)
    return export_dir(cfg, tmp_path_factory)


class NewStorages(TorchDispatchMode):
    """(phase, op, dtype, bytes) of each tensor an op returns off the meta device in a storage none of its
    inputs had (views and in-place ops add nothing). ``phase`` is "build" until the quantizer gets the file."""

    def __init__(self):
        super().__init__()
        self.phase, self.seen = "build", []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        live = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.device.type != "meta"]
        inputs = {t.untyped_storage().data_ptr() for t in live}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
                self.seen.append((self.phase, str(func), t.dtype, t.untyped_storage().nbytes()))
        return out


def test_from_pretrained_never_materialises_full_precision_block_weights(exported, monkeypatch):
    out, _ = exported
    mode, hook = NewStorages(), dq.BitfluxQuantizer.maybe_update_loaded_keys
    monkeypatch.setattr(dq.BitfluxQuantizer, "maybe_update_loaded_keys",
                        lambda self, *a: (setattr(mode, "phase", "load"), hook(self, *a))[1])
    with mode:
        transformer = FluxTransformer2DModel.from_pretrained(out)
    assert not list(scoped_linears(transformer)) and transformer.is_quantized
    ternary = [m for m in transformer.modules() if isinstance(m, TernaryLinear)]
    assert len(ternary) == 52 and all(m.packed.dtype == torch.uint8 and m.scale.dtype == torch.float32 for m in ternary)
    floats = [(phase, op, n) for phase, op, dtype, n in mode.seen if dtype.is_floating_point]
    # diffusers builds the skeleton under accelerate's init_empty_weights: each parameter is an uninitialised
    # torch.empty moved to the meta device at once; nothing else makes a float tensor before the file is read
    assert {op for phase, op, _ in floats if phase == "build"} == {"aten.empty.memory_format"}
    fp_block_weights = sum(4 * m.in_features * m.out_features for m in ternary)  # fp32, the model's dtype
    loaded = sum(n for phase, _, n in floats if phase == "load")  # scales and dense tensors are views of the reads
    assert loaded < 0.02 * fp_block_weights, (loaded, fp_block_weights)


def test_torch_dtype_casts_the_dense_tensors_not_the_scales(exported_2bit, tmp_path):
    transformer = FluxTransformer2DModel.from_pretrained(exported_2bit[0], torch_dtype=torch.bfloat16)
    layer = transformer.transformer_blocks[0].attn.to_q
    assert (layer.scale.dtype, layer.bias.dtype, transformer.x_embedder.weight.dtype) == \
        (torch.float32, torch.bfloat16, torch.bfloat16)
    transformer.save_pretrained(tmp_path)  # config.json records the dtype it now stores
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["dtype"] == "bfloat16"
    again = FluxTransformer2DModel.from_pretrained(tmp_path)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in transformer.state_dict().items())


def test_save_pretrained_round_trip_is_byte_identical(exported, tmp_path):
    out, cfg = exported
    transformer = FluxTransformer2DModel.from_pretrained(out)
    transformer.save_pretrained(tmp_path / "a")
    for name in (WEIGHTS, "README.md"):
        assert file_sha256(tmp_path / "a" / name) == file_sha256(out / name), name
    config = [json.loads((d / "config.json").read_text()) for d in (out, tmp_path / "a")]
    assert config[1].pop("_name_or_path") == str(out) and config[0].pop("_name_or_path")  # where each came from
    assert config[0] == config[1]
    again = FluxTransformer2DModel.from_pretrained(tmp_path / "a")
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in transformer.state_dict().items())
    meta = CheckpointFile(tmp_path / "a" / WEIGHTS).meta  # bitflux's own loader reads it: same tensors, metadata kept
    assert meta["codec"] == cfg.pack.codec and meta["base_model"].startswith("embedded:mini-flux")
    ours = load_quantized_transformer(tmp_path / "a" / WEIGHTS)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in transformer.state_dict().items())


def test_push_to_hub_uploads_the_bitflux_card(exported_2bit, tmp_path, monkeypatch):
    """diffusers' own push_to_hub with its hub calls replaced (no network): the folder it would upload."""
    out, _ = exported_2bit
    uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(hub_utils, "create_repo", lambda repo_id, **kw: type("Repo", (), {"repo_id": repo_id}))
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **kw: ModelCard("generic diffusers card"))
    monkeypatch.setattr(hub_utils, "upload_folder", lambda folder_path, **kw: shutil.copytree(folder_path, uploaded))
    FluxTransformer2DModel.from_pretrained(out).push_to_hub("me/mini-1.58bit")
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", WEIGHTS]
    assert file_sha256(uploaded / WEIGHTS) == file_sha256(out / WEIGHTS)
    assert (uploaded / "README.md").read_text() == (out / "README.md").read_text()


def test_damaged_directories_are_refused_in_one_line(exported_2bit, tmp_path):
    out, _ = exported_2bit
    bad = shutil.copytree(out, tmp_path / "flipped")
    ckpt = CheckpointFile(bad / WEIGHTS)
    entry = ckpt.file.entries["transformer_blocks.0.attn.to_q.codes"]
    data = bytearray((bad / WEIGHTS).read_bytes())
    data[entry.start] ^= 0x01  # one bit of one code byte: still valid codes, the checksum catches it
    (bad / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch in tensor transformer_blocks.0.attn.to_q.codes") as err:
        FluxTransformer2DModel.from_pretrained(bad)
    assert "\n" not in str(err.value)

    other = shutil.copytree(out, tmp_path / "other-config")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"axes_dims_rope": [4, 12, 16]}))
    with pytest.raises(ArtifactError, match="config.json has axes_dims_rope=.* made for axes_dims_rope=\\[8, 12, 12\\]"):
        FluxTransformer2DModel.from_pretrained(other)

    cut = shutil.copytree(out, tmp_path / "truncated")
    (cut / WEIGHTS).write_bytes((cut / WEIGHTS).read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="truncated") as err:
        from_pretrained(cut)  # the wrapper reads the header first; plain diffusers' safetensors refuses it too
    assert "\n" not in str(err.value)
    with pytest.raises(OSError):
        FluxTransformer2DModel.from_pretrained(cut)


def test_a_full_precision_checkpoint_is_not_quantized_on_the_fly(tmp_path):
    tiny = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])
    FluxTransformer2DModel(**tiny).save_pretrained(tmp_path)
    assert isinstance(FluxTransformer2DModel.from_pretrained(tmp_path).transformer_blocks[0].attn.to_q, torch.nn.Linear)
    with pytest.raises(UsageError, match="does not quantize a full-precision checkpoint on the fly"):
        FluxTransformer2DModel.from_pretrained(tmp_path, quantization_config=dq.BitfluxConfig())


def test_registration_is_idempotent_and_refuses_a_changed_diffusers(monkeypatch):
    dq.register()
    hooks.install()
    assert auto.AUTO_QUANTIZER_MAPPING["bitflux"] is dq.BitfluxQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["bitflux"] is dq.BitfluxConfig
    assert not [f for f in sys.meta_path if isinstance(f, hooks._AfterImport)]  # diffusers was loaded: no hook left
    monkeypatch.delattr(auto, "AUTO_QUANTIZER_MAPPING")
    with pytest.raises(dq.DiffusersVersionError, match="diffusers has no AUTO_QUANTIZER_MAPPING"):
        dq.register()
    with warnings.catch_warnings(record=True) as caught:  # what the import hook does: warn, never break diffusers
        warnings.simplefilter("always")
        hooks._register()
    assert "could not register" in str(caught[0].message)


def test_import_bitflux_then_diffusers_registers_without_loading_torch(exported_2bit):
    """A fresh interpreter: ``import bitflux_cli`` stays light, and diffusers imported after it loads the directory."""
    code = ("import sys, bitflux_cli; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules; "
            "from diffusers import FluxTransformer2DModel; "
            f"t = FluxTransformer2DModel.from_pretrained({str(exported_2bit[0])!r}); "
            "print(type(t.transformer_blocks[0].attn.to_q).__name__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "TernaryLinear", res.stderr[-2000:]


def test_importing_the_quantizer_module_first_registers_without_a_warning():
    """Its own import of diffusers' table fired the import hook while it was half loaded: a spurious
    "could not register ... circular import" warning; the module registers itself when it ends."""
    code = ("import warnings; warnings.simplefilter('error', RuntimeWarning); "
            "import bitflux_cli.integrations.diffusers_quantizer; "
            "from diffusers.quantizers.auto import AUTO_QUANTIZER_MAPPING; print('bitflux' in AUTO_QUANTIZER_MAPPING)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "True", res.stderr[-2000:]
