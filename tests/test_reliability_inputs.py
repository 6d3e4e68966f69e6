"""Bad input is refused before any work, through the CLI: one line on stderr, exit 2, nothing written.

A fresh workdir with the embedded model would be quantized and packed by ``generate`` before it
draws, so an empty (or absent) workdir after a refused ``generate`` shows that no model was loaded.
"""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from bitflux_cli.cli import app

runner = CliRunner()


def bitflux(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(res, *expected: str, code: int = 2) -> str:
    """The one-line error of ``res``, checked: exit ``code``, nothing on stdout, no traceback."""
    err = res.stderr.strip()
    assert res.exit_code == code, (res.exit_code, res.stderr, res.stdout)
    assert res.stdout == "" and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def written(workdir: Path) -> list[str]:
    """What a run left in ``workdir`` besides stage locks."""
    if not workdir.exists():
        return []
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if not p.name.startswith(".lock-"))


@pytest.mark.parametrize("flags, expected", [
    (["--guidance", "nan"], "command line: generate.guidance: input should be a finite number"),
    (["--guidance", "inf"], "generate.guidance: input should be a finite number"),
    (["--height", "50"], "generate.height: must be a multiple of 16 in [16, 4096]; nearest valid: 48 or 64"),
    (["--width", "17"], "nearest valid: 16 or 32"),
    (["--height", "100000", "--width", "100000"], "nearest valid: 4096"),
    (["--seed", str(2**64)], "generate.seed: input should be less than or equal to 4294967295"),
    (["--seed", str(2**32)], "generate.seed: input should be less than or equal to 4294967295"),  # would draw seed 0
    (["--seed", "-1"], "generate.seed: input should be greater than or equal to 0"),
    (["--set", "generate.steps=true"], "generate.steps: input should be a valid integer"),
    (["--steps", "0"], "generate.steps: input should be greater than or equal to 1"),
])
def test_generate_values(tmp_path, flags, expected):
    refused(bitflux("generate", "a red circle", "--workdir", tmp_path / "wd", "--out", tmp_path / "x.png", *flags), expected)
    assert written(tmp_path / "wd") == [] and not (tmp_path / "x.png").exists()


def test_eval_guidance_and_duplicate_yaml_keys(tmp_path):
    refused(bitflux("eval", "--workdir", tmp_path / "wd", "--set", "generate.guidance=.inf"), "generate.guidance")
    config = tmp_path / "dup.yaml"
    config.write_text("generate:\n  steps: 4\n  steps: 8\n")
    refused(bitflux("eval", "-c", config, "--workdir", tmp_path / "wd"), str(config), "key 'steps' appears twice")
    assert written(tmp_path / "wd") == []


@pytest.mark.parametrize("out, expected", [
    ("dir", "is a directory"),
    ("file/x.png", "is a file, not a directory"),
    ("/proc/bitflux-test/x.png", "cannot write in /proc"),  # not writable, even by root
])
def test_generate_out_is_checked_before_the_model_loads(tmp_path, out, expected):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("not a directory")
    target = out if out.startswith("/") else tmp_path / out
    refused(bitflux("generate", "a red circle", "--workdir", tmp_path / "wd", "--out", target, "--steps", 1), "--out", expected)
    assert written(tmp_path / "wd") == []  # no quantize, no pack: nothing was loaded


@pytest.mark.parametrize("command", [["calibrate"], ["quantize"], ["pack"], ["generate", "x"], ["eval"]])
def test_workdir_that_is_a_file(tmp_path, command):
    workdir = tmp_path / "wd"
    workdir.write_text("a file")
    refused(bitflux(*command, "--workdir", workdir), f"--workdir {workdir} is a file, not a directory")
    assert workdir.read_text() == "a file"


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "absent.txt", "no such file"),
    (lambda d: d, "is a directory"),
    (lambda d: d / "bin.txt", "is not UTF-8 text (byte 0x89 at offset 0)"),
    (lambda d: d / "empty.txt", "holds no prompts"),
    (lambda d: "partii", "unknown prompt set 'partii'"),
])
def test_bad_prompt_sets_are_usage_errors(tmp_path, make, expected):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "bin.txt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    (prompts / "empty.txt").write_text("\n  \n")
    name = make(prompts)
    res = bitflux("calibrate", "--workdir", tmp_path / "wd", "--set", f"calibration.prompts.sets=['{name}']")
    refused(res, expected)
    assert written(tmp_path / "wd") == []


def test_pack_without_its_input_creates_nothing(tmp_path):
    refused(bitflux("pack", "--workdir", tmp_path / "new" / "wd"), "run `bitflux quantize` first")
    assert not (tmp_path / "new").exists()  # the stage lock's mkdir used to leave the whole tree


def test_a_cuda_device_on_a_machine_without_one_is_a_usage_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    refused(bitflux("generate", "x", "--workdir", tmp_path, "--out", tmp_path / "x.png", "--set", "model.device=cuda"),
            "model.device cuda", "0 CUDA devices")


def test_a_packed_file_runs_only_in_the_dtype_it_was_quantized_in(tiny_chain, tmp_path):
    refused(bitflux("generate", "x", "--workdir", tiny_chain["workdir"], "--out", tmp_path / "x.png",
                    "--set", "model.dtype=bfloat16"), "a float32 model", "--set model.dtype=float32")
    assert not (tmp_path / "x.png").exists()


def test_bad_flags_are_answered_before_torch_loads(tmp_path):
    """The stage's modules (torch, diffusers: seconds) are imported only once the config is valid."""
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from bitflux_cli.cli import app; "
            "r = CliRunner().invoke(app, ['generate', 'x', '--steps', '0']); "
            "print(r.exit_code, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path).stdout.split()
    assert out == ["2", "False", "False"]


def test_generate_writes_the_format_its_out_suffix_names(tiny_chain, tmp_path):
    from PIL import Image

    res = bitflux("generate", "a red circle", "--workdir", tiny_chain["workdir"], "--steps", 1, "--out", tmp_path / "x.jpg")
    assert res.exit_code == 0, res.stderr
    assert Image.open(tmp_path / "x.jpg").format == "JPEG"


def test_a_missing_model_path_is_named(tiny_chain, tmp_path):
    refused(bitflux("generate", "x", "--workdir", tiny_chain["workdir"], "--out", tmp_path / "x.png",
                    "--set", f"model.path={tmp_path / 'none'}"), "model.path", "no such directory")


def test_a_file_where_a_stage_keeps_its_artifacts_is_named(tmp_path):
    (tmp_path / "calib").write_text("not a folder")
    refused(bitflux("calibrate", "--workdir", tmp_path), "calib is a file", "bitflux calibrate")
    assert (tmp_path / "calib").read_text() == "not a folder"


@pytest.mark.parametrize("argv, expected", [
    (["quantize", "--bogus"], "No such option: --bogus (see `bitflux quantize --help`)"),
    (["generate", "--steps", "abc", "x"], "Invalid value for '--steps'"),
    (["generate"], "Missing argument 'prompt'"),
    (["nosuch"], "No such command 'nosuch'"),
])
def test_the_console_script_puts_clicks_usage_errors_on_one_line(tmp_path, argv, expected):
    import subprocess
    import sys

    code = f"import sys; sys.argv = ['bitflux', *{argv!r}]; from bitflux_cli.cli import main; main()"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and res.stdout == "", (res.returncode, res.stdout)
    assert len(res.stderr.strip().splitlines()) == 1 and expected in res.stderr, res.stderr
