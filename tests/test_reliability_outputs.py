"""Outputs never replace what is already there by accident: a stage artifact of the workdir, a
directory of other files, a device or a pipe. Each is refused with one line and exit 2, untouched."""

import hashlib
import os

import pytest
from test_reliability_inputs import bitflux, refused

from bitflux_cli.artifacts import stage_lock
from bitflux_cli.config import load_config
from bitflux_cli.errors import BusyError
from bitflux_cli.loader import packed_checkpoint


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def packed(tiny_chain):
    path = tiny_chain["workdir"] / "packed" / "transformer.safetensors"
    before = digest(path)
    yield tiny_chain["workdir"], path
    assert digest(path) == before


def test_generate_refuses_to_write_over_a_stage_artifact(packed):
    wd, path = packed
    refused(bitflux("generate", "x", "--workdir", wd, "--out", path), "inside", "bitflux pack")
    refused(bitflux("generate", "x", "--workdir", wd, "--out", wd / "calib" / "x.png"), "bitflux calibrate")


def test_generate_refuses_a_device_or_a_pipe(packed, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    refused(bitflux("generate", "x", "--workdir", packed[0], "--out", fifo), "not a regular file")
    assert fifo.is_fifo()  # (as root, /dev/null was replaced by a PNG the same way)


def test_export_refuses_the_workdir_its_artifacts_and_a_folder_of_other_files(packed, tmp_path):
    wd, path = packed
    refused(bitflux("export", path, "--format", "bfl", "--workdir", wd), "bitflux pack")
    refused(bitflux("export", wd, "--format", "diffusers", "--workdir", wd), "holds the work directory")
    refused(bitflux("export", wd.parent, "--format", "diffusers", "--workdir", wd), "holds the work directory")
    refused(bitflux("export", wd / "ternary", "--format", "diffusers", "--workdir", wd), "bitflux quantize")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    refused(bitflux("export", mine, "--format", "diffusers", "--workdir", wd), "other files")
    assert (mine / "notes.txt").read_text() == "keep me"


def test_export_replaces_its_own_earlier_export_but_not_once_a_file_is_added(packed, tmp_path):
    out = tmp_path / "export"
    for _ in range(2):  # the second run replaces the first export
        res = bitflux("export", out, "--format", "diffusers", "--workdir", packed[0])
        assert res.exit_code == 0, res.stderr
    (out / "extra.txt").write_text("mine")
    refused(bitflux("export", out, "--format", "diffusers", "--workdir", packed[0]), "other files")
    assert (out / "extra.txt").read_text() == "mine" and (out / "config.json").is_file()


def test_bench_checks_its_plot_path_before_it_runs(tmp_path):
    refused(bitflux("bench", "--gpu", "a10", "--workdir", tmp_path / "wd", "--plot", tmp_path), "--plot", "is a directory")


def test_making_the_embedded_checkpoint_waits_for_no_one(tmp_path):
    """generate / eval make a missing embedded checkpoint under the locks of the stages they write:
    a run that holds one of them is named, and nothing is written beside it."""
    cfg = load_config("tiny", {"workdir": str(tmp_path), "quantization.method": "absmean"})
    with stage_lock(tmp_path, "quantize"):
        with pytest.raises(BusyError, match="quantize stage"):
            packed_checkpoint(cfg)
    assert not (tmp_path / "ternary").exists() and not (tmp_path / "packed").exists()
