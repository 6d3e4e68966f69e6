"""Config: bundled names, precedence (flags > YAML > defaults), one-line errors."""

from pathlib import Path

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


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; a strict float field then refused what a user typed
    cfg = load_config("tiny", None, parse_assignments(["generate.guidance=4e0", "quantization.block_recon.scale_lr=1e-3"]))
    assert cfg.generate.guidance == 4.0 and cfg.quantization.block_recon.scale_lr == 1e-3
    path = tmp_path / "c.yaml"
    path.write_text("generate:\n  guidance: 35E-1\n")
    assert load_config(str(path)).generate.guidance == 3.5
    assert parse_assignments(["x=1e", "y=1.2.3", "z=4"]) == {"x": "1e", "y": "1.2.3", "z": 4}  # still strings, ints
    with pytest.raises(ConfigError, match="generate.guidance: input should be a finite number"):
        load_config("tiny", None, parse_assignments(["generate.guidance=1e999"]))


@pytest.mark.parametrize("items, expected", [
    (["generate.steps"], "expected KEY=VALUE"),
    (["generate.steps=[1"], "not YAML"),
    (["generate.steps=-1"], "command line: generate.steps"),
    (["generate.stepz=4"], "command line: generate.stepz: unknown key"),
    (["workdir.x=1"], "workdir is a value, not a section"),
    (["foo.bar=1"], "command line: foo: unknown key"),  # a whole section the command line made up
    (["model.device=[cuda]"], "model.device: input should be a valid string or a valid dictionary"),
    (["model.device={transformer: cpu, gpu: cuda}"], "model.device.gpu: input should be 'transformer'"),
    (["model.device=banana"], "model.device: expected a device"),
    (["bench.resolutions=[-512]"], "bench.resolutions: must be a multiple of 16"),
    (["bench.resolutions=[]"], "bench.resolutions: list should have at least 1 item"),
    (["generate.max_sequence_length=513"], "less than or equal to 512"),
    (['workdir=""'], "workdir: is empty"),
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


@pytest.mark.parametrize("text, expected", [
    ("generate:\n  steps: true\n", r"generate.steps: input should be a valid integer \(got True\)"),
    ("generate:\n  height: yes\n", "generate.height: input should be a valid integer"),
    ("generate:\n  guidance: .nan\n", "generate.guidance: input should be a finite number"),
    ("generate:\n  guidance: -.inf\n", "generate.guidance: input should be a finite number"),
    ("generate:\n  guidance: true\n", "generate.guidance: input should be a valid number"),
    ("generate:\n  height: 50\n", r"generate.height: must be a multiple of 16 in \[16, 4096\]; nearest valid: 48 or 64 \(got 50\)"),
    ("generate:\n  width: 17\n", "nearest valid: 16 or 32"),
    ("generate:\n  width: 8\n", "nearest valid: 16 "),
    ("generate:\n  height: 100000\n", "nearest valid: 4096 "),
    ("generate:\n  seed: -1\n", "generate.seed: input should be greater than or equal to 0"),
    ("generate:\n  seed: 4294967296\n", "generate.seed: input should be less than or equal to 4294967295"),
    ("calibration:\n  prompts:\n    sets: []\n", "calibration.prompts.sets"),
    ("calibration:\n  prompts:\n    limit: true\n", "calibration.prompts.limit"),
])
def test_generate_values_are_checked_up_front(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as exc:
        load_config(str(path))
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_valid_generate_edges_pass(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generate:\n  height: 16\n  width: 4096\n  seed: 4294967295\n  guidance: 0\n  steps: 1\n")
    g = load_config(str(path)).generate
    assert (g.height, g.width, g.seed, g.guidance, g.steps) == (16, 4096, 2**32 - 1, 0.0, 1)
    assert isinstance(g.guidance, float)


def test_generate_flags_are_checked_against_the_command_line():
    for override, expected in [({"generate.guidance": float("nan")}, "command line: generate.guidance: input should be a finite number"),
                               ({"generate.seed": 2**64}, "command line: generate.seed"),
                               ({"generate.height": 40}, "command line: generate.height: .*nearest valid: 32 or 48")]:
        with pytest.raises(ConfigError, match=expected):
            load_config("tiny", override)
    with pytest.raises(ConfigError, match="command line: generate.steps: input should be a valid integer"):
        load_config("tiny", None, parse_assignments(["generate.steps=true"]))


def test_duplicate_yaml_keys_are_refused_naming_key_file_and_line(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text("generate:\n  steps: 4\n  seed: 1\n  steps: 8\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'steps' appears twice in one mapping \(line 4\)") as exc:
        load_config(str(path))
    assert str(path) in str(exc.value)
    path.write_text("generate:\n  steps: 4\ngenerate:\n  seed: 1\n")  # sections too
    with pytest.raises(ConfigError, match="key 'generate' appears twice"):
        load_config(str(path))
    path.write_text("base: &b {steps: 3, seed: 2}\n")  # a merge key's values may be overridden
    with pytest.raises(ConfigError, match="base: unknown key"):
        load_config(str(path))
    path.write_text("generate:\n  <<: {steps: 3, seed: 2}\n  steps: 5\n")
    assert (load_config(str(path)).generate.steps, load_config(str(path)).generate.seed) == (5, 2)
    with pytest.raises(ConfigError, match=r"--set generate=\{steps: 1, steps: 2\}: key 'steps' appears twice"):
        parse_assignments(["generate={steps: 1, steps: 2}"])


@pytest.mark.parametrize("text, expected", [
    ("a: 2001-13-01\n", r"not valid YAML \(month must be in 1..12\)"),
    ("[" * 5000, "not valid YAML"),
    ("x: !!python/object/apply:os.system ['true']\n", r"not valid YAML \(could not determine a constructor"),
    ("generate:\n  steps: 3\n bad indent\n", "not valid YAML .* at line 3"),
    ('generate:\n  "a\\nb": 1\n', r"generate.'a\\nb': unknown key"),
])
def test_unreadable_yaml_is_one_line(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as exc:
        load_config(str(path))
    assert "\n" not in str(exc.value)


def test_workdir_expands_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config("tiny", None, parse_assignments(["workdir=~/runs"])).workdir == tmp_path / "runs"


@pytest.mark.parametrize("name, expected", [("", "--config is empty"), (".", "is a directory, not a config file")])
def test_an_empty_or_directory_config_is_refused(name, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(name)


def test_text_fields_take_the_value_as_typed():
    sets = parse_assignments(["workdir=123", "model.revision=1234e56", "model.path=null", "generate.steps=5",
                              "calibration.prompts.data_dir=2024-01-01", "bench.gpu=on"])
    assert sets == {"workdir": "123", "model.revision": "1234e56", "model.path": None, "generate.steps": 5,
                    "calibration.prompts.data_dir": "2024-01-01", "bench.gpu": "on"}
    cfg = load_config("tiny", None, sets | {"bench.gpu": None})
    assert cfg.workdir == Path("123") and cfg.model.revision == "1234e56" and cfg.model.path is None
