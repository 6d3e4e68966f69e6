"""Config: bundled names, precedence (flags > YAML > defaults), one-line errors."""

import pytest

from bitflux_cli.config import bundled_configs, load_config, parse_assignments
from bitflux_cli.errors import ConfigError


def test_bundled_configs_by_name_or_file_name():
    assert {"tiny", "flux-dev", "flux-schnell"} <= set(bundled_configs())
    dev = load_config("flux-dev")
    assert load_config("flux-dev.yaml") == dev
    assert dev.model.source == "black-forest-labs/FLUX.1-dev"
    assert (dev.generate.height, dev.generate.width, dev.generate.steps, dev.generate.guidance) == (1024, 1024, 28, 3.5)
    assert load_config("flux-schnell").generate.steps == 4
    assert load_config().model.source == "embedded"  # no --config: the embedded model


def test_precedence_flag_over_yaml_over_default(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generate:\n  steps: 7\n")
    cfg = load_config(str(path))
    assert cfg.generate.steps == 7 and cfg.generate.seed == 0  # YAML over default, default kept
    assert load_config(str(path), {"generate.steps": 3, "generate.seed": None}).generate.steps == 3
    sets = parse_assignments(["generate.steps=5", "calibration.prompts.sets=[mini, parti]", "calibration.prompts.limit=null"])
    cfg = load_config(str(path), {"generate.steps": None}, sets)
    assert cfg.generate.steps == 5 and cfg.calibration.prompts.sets == ["mini", "parti"]
    assert cfg.calibration.prompts.limit is None
    assert load_config(str(path), {"generate.steps": 3}, sets).generate.steps == 3  # a named flag over --set


@pytest.mark.parametrize("items, expected", [
    (["generate.steps"], "expected KEY=VALUE"),
    (["generate.steps=[1"], "not YAML"),
    (["generate.steps=-1"], "command line: generate.steps"),
    (["generate.stepz=4"], "command line: generate.stepz: unknown key"),
    (["workdir.x=1"], "workdir is a value, not a section"),
])
def test_bad_set_flag_is_one_line_naming_the_command_line(items, expected):
    with pytest.raises(ConfigError, match=expected) as exc:
        load_config("tiny", None, parse_assignments(items))
    assert "\n" not in str(exc.value) and "tiny.yaml" not in str(exc.value)


@pytest.mark.parametrize("text, key, expected", [
    ("quantization:\n  methd: absmean\n", "quantization.methd", "unknown key"),
    ("generate:\n  steps: many\n", "generate.steps", "integer"),
    ("pack:\n  codec: 3bit\n", "pack.codec", "'2bit' or 'base3'"),
    ("- a\n- b\n", "", "mapping"),
])
def test_bad_config_names_file_key_and_expectation(tmp_path, text, key, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    msg = str(exc.value)
    assert str(path) in msg and key in msg and expected in msg and "\n" not in msg


def test_missing_config_file():
    with pytest.raises(ConfigError, match="no such config file.*bundled: flux-dev"):
        load_config("no-such-config.yaml")
