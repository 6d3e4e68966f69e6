"""``bitflux export --format diffusers``: a transformer directory that loads back through
``bitflux_cli.integrations.diffusers.from_pretrained`` into a plain ``FluxPipeline`` and draws the
image ``bitflux generate`` draws; plain diffusers refuses it rather than loading random weights."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
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


def test_directory_holds_config_checkpoint_and_model_card(exported, tiny_chain):
    out, result = exported
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "FluxTransformer2DModel" and config["num_layers"] == 2
    quant = config["quantization_config"]
    assert (quant["quant_method"], quant["codec"], quant["method"], quant["activations"]) == ("bitflux", "2bit", "absmean", "none")
    packed = tiny_chain["pack"]["path"]
    assert file_sha256(out / "diffusion_pytorch_model.safetensors") == file_sha256(packed)  # provenance kept as is
    card = (out / "README.md").read_text()
    for text in ("embedded:mini-flux", "absmean", "calibration", "Fidelity", "52 linears", "W2A16"):
        assert text in card, text
    assert result["files"]["README.md"] == (out / "README.md").stat().st_size


def test_plain_diffusers_refuses_the_directory(exported):
    with pytest.raises(ValueError, match="bitflux"):
        FluxTransformer2DModel.from_pretrained(str(exported[0]))


def test_from_pretrained_draws_the_image_bitflux_generate_draws(exported, tiny_chain, tmp_path):
    out, _ = exported
    png = tmp_path / "generate.png"
    res = CliRunner().invoke(app, ["generate", PROMPT, "--workdir", str(tiny_chain["workdir"]), "--steps", "3",
                                   "--seed", "5", "--out", str(png), "--json"])
    assert res.exit_code == 0, res.stderr
    transformer = from_pretrained(out)
    assert isinstance(transformer, FluxTransformer2DModel)
    assert transformer.config.quantization_config["quant_method"] == "bitflux"
    assert not list(scoped_linears(transformer))  # no FP block linear left: all TernaryLinear
    assert sum(isinstance(m, TernaryLinear) for m in transformer.modules()) == 52
    parts = mini.build_pipeline(embedded_weights(tiny_chain["cfg"].model), torch.float32, transformer).components
    pipe = FluxPipeline(**parts)  # a plain diffusers pipeline around the loaded transformer
    gen = tiny_chain["cfg"].generate
    image = pipe(PROMPT, height=gen.height, width=gen.width, num_inference_steps=3, guidance_scale=gen.guidance,
                 generator=[torch.Generator("cpu").manual_seed(5)], max_sequence_length=gen.max_sequence_length).images[0]
    drawn, expected = np.asarray(image), np.asarray(Image.open(png))
    assert drawn.std() > 0 and np.array_equal(drawn, expected)


def test_from_pretrained_refuses_a_directory_without_bitflux_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(ArtifactError, match="not a bitflux transformer"):
        from_pretrained(tmp_path)
