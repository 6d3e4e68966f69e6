"""The activation mode a file records is the one it runs in: quantize records ``--activations``, pack
carries it, and generate / eval / the loader run it unless ``--activations`` overrides it."""

import pytest

from bitflux_cli.checkpoint import CheckpointFile
from bitflux_cli.config import load_config
from bitflux_cli.loader import packed_transformer, runtime_activations
from bitflux_cli.packing import pack
from bitflux_cli.quantize import quantize
from bitflux_cli.ternary import TernaryLinear


def modes(transformer) -> set[str]:
    return {m.activations for m in transformer.modules() if isinstance(m, TernaryLinear)}


@pytest.fixture(scope="module")
def int8_workdir(tmp_path_factory):
    """The tiny model quantized with ``--activations int8``, then packed by a config that does not say."""
    workdir = tmp_path_factory.mktemp("int8")
    quantize(load_config("tiny", {"workdir": str(workdir), "quantization.method": "absmean",
                                  "quantization.activations": "int8"}))
    pack(load_config("tiny", {"workdir": str(workdir)}))
    return workdir


def test_pack_carries_the_mode_quantize_recorded(int8_workdir):
    cfg = load_config("tiny", {"workdir": str(int8_workdir)})
    assert cfg.quantization.activations is None
    for stage in ("ternary", "packed"):
        assert CheckpointFile(int8_workdir / stage / "transformer.safetensors").meta["activations"] == "int8"


@pytest.mark.parametrize("override, expected", [(None, "int8"), ("none", "none"), ("fp8", "fp8")])
def test_the_packed_model_runs_the_recorded_mode_unless_overridden(int8_workdir, override, expected):
    cfg = load_config("tiny", {"workdir": str(int8_workdir), "quantization.activations": override})
    assert modes(packed_transformer(cfg)) == {expected}
    assert runtime_activations(cfg, CheckpointFile(int8_workdir / "packed" / "transformer.safetensors")) == expected


def test_a_config_that_sets_the_mode_at_pack_time_records_it(int8_workdir, tmp_path):
    (tmp_path / "ternary").mkdir()
    (tmp_path / "ternary" / "transformer.safetensors").symlink_to(int8_workdir / "ternary" / "transformer.safetensors")
    info = pack(load_config("tiny", {"workdir": str(tmp_path), "quantization.activations": "fp8"}))
    assert CheckpointFile(info["path"]).meta["activations"] == "fp8"
    assert modes(packed_transformer(load_config("tiny", {"workdir": str(tmp_path)}))) == {"fp8"}
