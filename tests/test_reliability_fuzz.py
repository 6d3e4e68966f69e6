"""Property-based tests of the loaders that read what a user types or points at.

- ``--set`` values and YAML config text: ``load_config`` ends in a valid ``Config`` or a one-line
  ``ConfigError``, never another exception; a Config it returns keeps the generate invariants.
- Prompt files (random bytes, text in several encodings, CRLF, BOM, blank, NUL): ``load_prompts``
  ends in the file's prompts or a one-line ``PromptSetError``; UTF-8 text with a prompt always loads.

Budgets are small (a few seconds in all); ``HYPOTHESIS_PROFILE=long`` runs 20x more examples.
"""

import math
import os
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitflux_cli.config import MAX_SIDE, Config, load_config, parse_assignments
from bitflux_cli.errors import ConfigError
from bitflux_cli.prompts import PromptSetError, load_prompts

settings.register_profile("default", max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
SCRATCH = Path(tempfile.mkdtemp(prefix="bitflux-fuzz-"))  # hypothesis reruns a test body; tmp_path is per test


def _keys(data: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        out += _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


KEYS = _keys(Config().model_dump())
SECTIONS = {s: list(v) for s, v in Config().model_dump().items() if isinstance(v, dict)}
YAML_BITS = ["true", "no", "~", "null", ".nan", "-.inf", "1e999", "0x10", "0o17", "1_000", "[1, 2]", "[mini, parti]",
             "{a: 1, a: 2}", "{steps: 3}", "!!binary AA==", "!!python/object/apply:os.system ['true']", "&a [*a]",
             "2001-13-01", "2001-12-14", "'quoted'", '"\\u0000"', "- a", ": :", "[", "{", "|\n  x", "*undefined",
             "16", "48", "4096", "4112", "-16", "4294967295", "4294967296", "9223372036854775808", "3.5", "'3.5'"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                      max_leaves=6)
dates = st.builds("{:04d}-{:02d}-{:02d}".format, st.integers(0, 9999), st.integers(0, 19), st.integers(0, 39))  # YAML dates
set_values = st.one_of(st.sampled_from(YAML_BITS), dates, st.text(max_size=30), st.integers().map(str), st.floats().map(repr))


def assert_valid(cfg: Config) -> None:
    g = cfg.generate
    assert all(type(v) is int for v in (g.height, g.width, g.steps, g.seed, g.max_sequence_length))
    assert all(16 <= v <= MAX_SIDE and v % 16 == 0 for v in (g.height, g.width))
    assert 0 <= g.seed < 2**32 and g.steps >= 1 and math.isfinite(g.guidance)
    assert cfg.calibration.prompts.sets and all(isinstance(s, str) for s in cfg.calibration.prompts.sets)


def one_line(exc: Exception) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg and "\r" not in msg and len(msg) < 1000, msg
    return msg


@settings(settings.get_profile(PROFILE))
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=20), st.sampled_from(KEYS).map(lambda k: k + ".x")),
       value=set_values, flag=st.booleans())
def test_set_values_end_in_a_config_or_a_config_error(key, value, flag):
    try:
        if flag:  # a named flag (typer already parsed it): the value as given
            cfg = load_config("tiny", {key: value})
        else:
            cfg = load_config("tiny", None, parse_assignments([f"{key}={value}"]))
    except ConfigError as exc:
        one_line(exc)
    else:
        assert_valid(cfg)


@st.composite
def config_texts(draw) -> str:
    """YAML of real sections and keys with random values, sometimes with a line repeated, cut or joined."""
    data = {}
    for section in draw(st.lists(st.sampled_from(list(SECTIONS)), max_size=4)):
        keys = st.one_of(st.sampled_from(SECTIONS[section]), st.text(max_size=8))
        data[section] = draw(st.dictionaries(keys, values, max_size=4))
    if draw(st.booleans()):
        data[draw(st.sampled_from(KEYS)).split(".")[0] if draw(st.booleans()) else draw(st.text(max_size=6))] = draw(values)
    lines = yaml.safe_dump(data, allow_unicode=draw(st.booleans())).splitlines()
    if lines and draw(st.booleans()):
        i = draw(st.integers(0, len(lines) - 1))
        mutation = draw(st.sampled_from(["repeat", "cut", "insert"]))
        if mutation == "repeat":
            lines.insert(i, lines[i])
        elif mutation == "cut":
            lines[i] = lines[i][: draw(st.integers(0, len(lines[i])))]
        else:
            lines.insert(i, draw(st.sampled_from(YAML_BITS) | dates.map("x: {}".format)))
    return "\n".join(lines) + "\n"


@settings(settings.get_profile(PROFILE))
@given(text=st.one_of(config_texts(), st.text(max_size=200)),
       raw=st.one_of(st.none(), st.binary(max_size=100)))
def test_config_text_ends_in_a_config_or_a_config_error(text, raw):
    path = SCRATCH / "config.yaml"
    path.write_bytes(raw if raw is not None else text.encode("utf-8"))
    try:
        cfg = load_config(str(path))
    except ConfigError as exc:
        assert str(path) in one_line(exc)
    else:
        assert_valid(cfg)


@st.composite
def prompt_files(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "text", "lines"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "text":
        text = draw(st.text(max_size=100))
    else:
        text = draw(st.sampled_from(["\n", "\r\n", "\r"])).join(draw(st.lists(st.text(max_size=20), max_size=6)))
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1", "cp1252", "utf-32"]))
    return text.encode(encoding, "replace")  # latin-1 and cp1252 cannot hold every character


@settings(settings.get_profile(PROFILE), max_examples=settings.get_profile(PROFILE).max_examples * 2)
@given(data=prompt_files())
def test_prompt_files_end_in_prompts_or_a_one_line_error(data):
    path = SCRATCH / "prompts.txt"
    path.write_bytes(data)
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    expected = [] if text is None or "\0" in text else [line.strip() for line in text.splitlines() if line.strip()]
    try:
        ps = load_prompts([str(path)])
    except PromptSetError as exc:
        assert repr(str(path)) in one_line(exc)
        assert not expected  # refused only when there is no UTF-8 prompt to read
    else:
        assert ps.prompts == expected and ps.counts["selected"] == len(expected)
        assert all(p and p == p.strip() and "\n" not in p and "\r" not in p for p in ps.prompts)
