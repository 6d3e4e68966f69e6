"""End to end through the CLI on the embedded model: the chain, JSON outputs, errors and exit codes."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bitflux_cli.cli import app

runner = CliRunner()
STAGES = ["calibrate", "quantize", "pack", "generate", "bench", "eval"]


def bitflux(*args):
    return runner.invoke(app, [str(a) for a in args])


def as_json(result):
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_help_lists_the_five_subcommands():
    out = bitflux("--help").stdout
    assert all(stage in out for stage in STAGES)
    for stage in STAGES:
        res = bitflux(stage, "--help")
        assert res.exit_code == 0 and "--json" in res.stdout and "--config" in res.stdout


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    wd = tmp_path_factory.mktemp("cli")
    # the default method (block-recon, calibrating first) on fewer prompts and steps: its quality is tested in test_methods
    res = bitflux("quantize", "--workdir", wd, "--json", "--set", "calibration.prompts.limit=32",
                  "--set", "quantization.block_recon.steps=50")
    p = as_json(bitflux("pack", "--workdir", wd, "--json"))
    return wd, (as_json(res), res.stderr), p


def test_quantize_reports_counts_and_error_vs_fp(chain):
    _, (q, stderr), _ = chain
    assert {"quantized_params", "total_params", "fraction"} <= set(q)
    assert 0 < q["fraction"] < 1 and q["quantized_params"] < q["total_params"]
    fid = q["fidelity"]
    # the 1.58-bit output next to the FP output: relative error reported, finite and not zero
    # (absmean on the trained mini model is off by more than the velocity itself: 1.8)
    assert 0 < fid["velocity_rel_error"] < 10 and np.isfinite(fid["image_psnr_db"])
    assert len(fid["block_rel_error"]) == 6
    assert "single_transformer_blocks.3" in stderr and "image PSNR" in stderr  # the table on stderr


def test_pack_reports_storage(chain):
    _, _, p = chain
    assert p["codec"] == "2bit" and p["packed_bytes"] > 0
    assert p["storage_ratio"] == pytest.approx(p["bf16_bytes"] / p["packed_bytes"])


def test_a_stray_rank_variable_does_not_silence_a_single_process(chain):
    wd, _, p = chain
    # RANK alone (a shell script's variable, a scheduler's) is not a torchrun job: WORLD_SIZE says so
    res = runner.invoke(app, ["pack", "--workdir", str(wd), "--json"], env={"RANK": "16", "WORLD_SIZE": None})
    assert as_json(res)["packed_bytes"] == p["packed_bytes"]
    res = runner.invoke(app, ["pack", "--workdir", str(wd), "--json"], env={"RANK": "1", "WORLD_SIZE": "2"})
    assert res.exit_code == 0 and res.stdout == ""  # under torchrun, rank 0 speaks for the job


def test_generate_same_seed_same_image(chain, tmp_path):
    wd, _, _ = chain
    outs = []
    for name in ("a.png", "b.png"):
        g = as_json(bitflux("generate", "a red circle above a blue square", "--workdir", wd, "--out", tmp_path / name,
                            "--seed", 3, "--steps", 4, "--json"))
        assert g["seed"] == 3 and g["seconds"] > 0 and g["backend"] == "torch"
        outs.append(np.asarray(Image.open(g["path"])))
    assert outs[0].shape == (48, 48, 3) and outs[0].std() > 1  # not a constant image
    assert np.array_equal(outs[0], outs[1])


def test_base3_round_trip_generates_the_same_image(chain, tmp_path):
    wd, _, _ = chain
    args = ("generate", "three blue squares", "--workdir", wd, "--steps", 4, "--json")
    two = np.asarray(Image.open(as_json(bitflux(*args, "--out", tmp_path / "2.png"))["path"]))
    assert as_json(bitflux("pack", "--workdir", wd, "--codec", "base3", "--json"))["codec"] == "base3"
    three = np.asarray(Image.open(as_json(bitflux(*args, "--out", tmp_path / "3.png"))["path"]))
    as_json(bitflux("pack", "--workdir", wd, "--json"))  # back to 2-bit for the other tests
    assert np.array_equal(two, three)


def test_missing_artifact_names_the_command(tmp_path):
    res = bitflux("generate", "x", "--config", "flux-dev", "--workdir", tmp_path)
    assert res.exit_code == 2 and "run `bitflux pack` first" in res.stderr
    res = bitflux("pack", "--workdir", tmp_path)
    assert res.exit_code == 2 and "run `bitflux quantize` first" in res.stderr


def test_generate_on_a_fresh_workdir_makes_the_embedded_checkpoint(tmp_path):
    g = as_json(bitflux("generate", "a green triangle left of a yellow circle", "--workdir", tmp_path / "wd",
                        "--out", tmp_path / "img.png", "--steps", 4, "--json",
                        "--set", "quantization.method=absmean"))  # the chain fixture runs the default method
    assert (tmp_path / "wd/ternary/transformer.safetensors").is_file()
    assert (tmp_path / "wd/packed/transformer.safetensors").is_file()
    assert np.asarray(Image.open(g["path"])).std() > 1


def test_bad_config_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantization:\n  method: magic\n")
    res = bitflux("quantize", "--config", bad, "--json")
    assert res.exit_code == 2 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and "quantization.method" in res.stderr
    assert "Traceback" not in res.stderr


def test_set_flag_reaches_the_config_and_a_bad_one_is_one_line(tmp_path):
    res = bitflux("pack", "--workdir", tmp_path, "--set", "pack.codec=3bit", "--json")
    assert res.exit_code == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
    assert "command line: pack.codec" in res.stderr and "Traceback" not in res.stderr


def test_corrupted_packed_file_is_refused_and_left_alone(chain, tmp_path):
    wd, _, _ = chain
    target = tmp_path / "wd"
    (target / "packed").mkdir(parents=True)
    data = bytearray((wd / "packed" / "transformer.safetensors").read_bytes())
    data[-3] ^= 0x01
    (target / "packed" / "transformer.safetensors").write_bytes(bytes(data))
    out = tmp_path / "img.png"
    out.write_bytes(b"previous image")
    res = bitflux("generate", "x", "--workdir", target, "--out", out)
    assert res.exit_code == 1 and "checksum mismatch" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"previous image"  # nothing already written is damaged


def test_eval_mini_reports_categories_and_writes_a_sheet(chain, tmp_path):
    wd, (q, _), _ = chain
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model:\n  dtype: float32\ngenerate:\n  height: 48\n  width: 48\n  steps: 2\n  max_sequence_length: 12\n"
                   "eval:\n  per_category: 1\n  images_per_prompt: 2\n")
    r = as_json(bitflux("eval", "--suite", "mini", "--config", cfg, "--workdir", wd, "--json"))
    assert r["model"] == "1.58-bit" and r["prompts"] == 6 and r["images_per_prompt"] == 2
    assert set(r["categories"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert 0 <= r["overall"] <= 1 and r["seeds"] == [0, 11]
    # the checkpoint's method, not eval.yaml's default (absmean)
    assert (r["method"], r["codec"], r["activations"]) == (q["method"], "2bit", "none") != ("absmean", "2bit", "none")
    fp8 = as_json(bitflux("eval", "--config", cfg, "--workdir", wd, "--activations", "fp8", "--json"))
    assert fp8["activations"] == "fp8" and fp8["method"] == q["method"]  # the mode it ran in, not the file's record
    assert Image.open(r["sheet"]).size[0] > 48 and r["split"] == "test"
    train = as_json(bitflux("eval", "--config", cfg, "--workdir", wd, "--split", "train", "--json"))
    assert train["split"] == "train" and train["prompts"] == 6
    res = bitflux("eval", "--config", "flux-dev", "--workdir", wd)
    assert res.exit_code == 2 and "no programmatic scorer" in res.stderr
