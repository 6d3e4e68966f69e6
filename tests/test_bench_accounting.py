"""Storage accounting against real serialized files, and the FLUX.1-dev storage targets."""

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import save_file

from bitflux_cli.bench.accounting import storage
from bitflux_cli.checkpoint import save_checkpoint
from bitflux_cli.config import Config, load_config
from bitflux_cli.models import build_meta_transformer, load_fp_transformer
from bitflux_cli.ternary import scoped_linears, ternarize


@pytest.fixture
def offline(monkeypatch):
    """The FLUX.1 architecture is known offline; skip the hub's retries."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def header_bytes(path) -> int:
    """8-byte little-endian JSON length + the JSON header of a safetensors file."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def test_accounting_equals_real_files_up_to_the_header(tmp_path):
    cfg = Config()  # embedded mini FLUX, bfloat16
    model = load_fp_transformer(cfg.model)
    assert next(model.parameters()).dtype == torch.bfloat16
    linears = dict(scoped_linears(model))
    ternary = {name: ternarize(m.weight) for name, m in linears.items()}
    quantized = {f"{name}.weight" for name in linears}
    dense = {k: v for k, v in model.state_dict().items() if k not in quantized}
    acc = storage(model)
    assert acc == storage(build_meta_transformer(cfg.model))  # shapes alone suffice

    # Bound: the tensor data bytes match exactly; the file adds only its header.
    for codec in ("2bit", "base3"):
        path = tmp_path / f"{codec}.safetensors"
        size = save_checkpoint(path, ternary, dense, codec, {"base_model": "embedded", "stage": "pack"})
        assert size - header_bytes(path) == acc["codecs"][codec]["bytes"]
    path = tmp_path / "bf16.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    assert path.stat().st_size - header_bytes(path) == acc["bf16_bytes"]
    assert acc["codecs"]["base3"]["bytes"] < acc["codecs"]["2bit"]["bytes"] < acc["bf16_bytes"]


def test_flux_dev_storage_ratios(offline):
    acc = storage(build_meta_transformer(load_config("flux-dev").model))
    assert acc["bf16_bytes"] == 2 * acc["params"]["total_params"] == 23_802_816_640
    assert acc["codecs"]["2bit"]["ratio"] >= 7.6
    assert acc["codecs"]["base3"]["ratio"] >= 9.4
    assert acc["params"]["quantized_modules"] == 494
    assert acc["params"]["fraction"] > 0.99
