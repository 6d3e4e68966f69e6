"""Real FLUX loading: offline with no local copy gives one line saying how to get it."""

import pytest

from bitflux_cli.config import load_config
from bitflux_cli.errors import ModelUnavailableError
from bitflux_cli.models import load_pipeline, transformer_config


def test_offline_hub_model_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    cfg = load_config("flux-dev")
    with pytest.raises(ModelUnavailableError) as exc:
        load_pipeline(cfg.model)
    msg = str(exc.value)
    assert "huggingface-cli download black-forest-labs/FLUX.1-dev" in msg and "model.path" in msg and "\n" not in msg


def test_missing_local_directory(tmp_path):
    cfg = load_config("flux-dev", {"model.path": str(tmp_path / "nope")})
    with pytest.raises(ModelUnavailableError, match="model.path"):
        load_pipeline(cfg.model)


def test_known_architecture_needs_no_download(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert transformer_config(load_config("flux-schnell").model)["guidance_embeds"] is False
    assert transformer_config(load_config("flux-dev").model)["num_single_layers"] == 38
