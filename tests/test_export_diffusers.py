"""``bitflux export --format diffusers``: a transformer directory that diffusers' own
``FluxTransformer2DModel.from_pretrained`` loads (bitflux imported) into a plain ``FluxPipeline``, which
draws the image ``bitflux generate`` draws, also when the pipeline itself is saved and loaded; plain
diffusers (bitflux's quantizer not registered) refuses it rather than loading random weights."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.quantizers import auto
from PIL import Image
from typer.testing import CliRunner

from bitflux_cli.artifacts import file_sha256
from bitflux_cli.cli import app
from bitflux_cli.errors import ArtifactError
from bitflux_cli.integrations.diffusers import from_pretrained
from bitflux_cli.miniworld import model as mini
from bitflux_cli.models.source import embedded_weights
from bitflux_cli.ternary import TernaryLinear, scoped_linears

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def exported(tiny_chain, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "mini-1.58bit"
    res = CliRunner().invoke(app, ["export", "--workdir", str(tiny_chain["workdir"]), "--format", "diffusers",
                                   str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    return out, json.loads(res.stdout)


@pytest.fixture(scope="module")
def generated(tiny_chain, tmp_path_factory):
    """The pixels ``bitflux generate`` draws from the workdir's packed checkpoint (3 steps, seed 5)."""
    png = tmp_path_factory.mktemp("generate") / "generate.png"
    res = CliRunner().invoke(app, ["generate", PROMPT, "--workdir", str(tiny_chain["workdir"]), "--steps", "3",
                                   "--seed", "5", "--out", str(png), "--json"])
    assert res.exit_code == 0, res.stderr
    return np.asarray(Image.open(png))


def draw(pipe, tiny_chain) -> np.ndarray:
    gen = tiny_chain["cfg"].generate
    image = pipe(PROMPT, height=gen.height, width=gen.width, num_inference_steps=3, guidance_scale=gen.guidance,
                 generator=[torch.Generator("cpu").manual_seed(5)], max_sequence_length=gen.max_sequence_length).images[0]
    return np.asarray(image)


def test_directory_holds_config_checkpoint_and_model_card(exported, tiny_chain):
    out, result = exported
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel" and config["num_layers"] == 2
    quant = config["quantization_config"]
    assert (quant["quant_method"], quant["codec"], quant["method"], quant["activations"], quant["dtype"]) == \
        ("bitflux", "2bit", "absmean", "none", "float32")
    packed = tiny_chain["pack"]["path"]
    # written by diffusers' save_pretrained, then in bitflux's canonical layout: the packed file byte for byte
    assert file_sha256(out / "diffusion_pytorch_model.safetensors") == file_sha256(packed)
    card = (out / "README.md").read_text()
    for text in ("embedded:mini-flux", "absmean", "calibration", "Fidelity", "52 linears", "W2A16", "import bitflux_cli"):
        assert text in card, text
    report = tiny_chain["quantize"]["fidelity"]  # quantize's report, carried by pack into the packed metadata
    assert f"| velocity relative error | {report['velocity_rel_error']:.4f} |" in card
    assert f"| image PSNR vs full precision | {report['image_psnr_db']:.2f} dB |" in card
    assert result["files"]["README.md"] == (out / "README.md").stat().st_size


def test_plain_diffusers_refuses_the_directory(exported, monkeypatch):
    for table in (auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING):  # as without bitflux
        monkeypatch.delitem(table, "bitflux")
    with pytest.raises(ValueError, match="bitflux"):
        FluxTransformer2DModel.from_pretrained(str(exported[0]))


def test_diffusers_from_pretrained_draws_the_image_bitflux_generate_draws(exported, tiny_chain, generated):
    transformer = FluxTransformer2DModel.from_pretrained(exported[0])  # diffusers' own, through BitfluxQuantizer
    assert transformer.config.quantization_config.quant_method == "bitflux"
    assert not list(scoped_linears(transformer))  # no FP block linear left: all TernaryLinear
    assert sum(isinstance(m, TernaryLinear) for m in transformer.modules()) == 52
    parts = mini.build_pipeline(embedded_weights(tiny_chain["cfg"].model), torch.float32, transformer).components
    drawn = draw(FluxPipeline(**parts), tiny_chain)  # a plain diffusers pipeline around the loaded transformer
    assert drawn.std() > 0 and np.array_equal(drawn, generated)


def test_flux_pipeline_from_pretrained_draws_the_same_image(exported, tiny_chain, generated, tmp_path):
    """A saved full-precision pipeline with the transformer passed in, and a pipeline saved with its 1.58-bit
    transformer and loaded whole (the transformer from its subfolder through the quantizer)."""
    base = tmp_path / "base"
    mini.build_pipeline(embedded_weights(tiny_chain["cfg"].model)).save_pretrained(base)
    pipe = FluxPipeline.from_pretrained(base, transformer=FluxTransformer2DModel.from_pretrained(exported[0]))
    assert np.array_equal(draw(pipe, tiny_chain), generated)
    pipe.save_pretrained(tmp_path / "whole")
    assert (tmp_path / "whole/transformer/README.md").is_file()
    pipe = FluxPipeline.from_pretrained(tmp_path / "whole")
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, TernaryLinear)
    assert np.array_equal(draw(pipe, tiny_chain), generated)


def test_wrapper_loads_with_an_activation_mode(exported, tmp_path):
    transformer = from_pretrained(exported[0], activations="int8")
    assert {m.activations for m in transformer.modules() if isinstance(m, TernaryLinear)} == {"int8"}
    transformer.save_pretrained(tmp_path)  # the mode is recorded in config.json and in the checkpoint
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["activations"] == "int8"
    assert "W2A8" in (tmp_path / "README.md").read_text()


def test_from_pretrained_refuses_a_directory_without_bitflux_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ArtifactError, match="not a bitflux transformer"):
        from_pretrained(tmp_path)
