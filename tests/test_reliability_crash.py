"""Crash safety, the suite's short run of ``benchmarks/reliability.py``: real ``bitflux`` processes are
killed with SIGKILL mid-write (an inotify event on their temp file), then the next stage and a rerun
go through the CLI here. Three kill points: calibrate (run by quantize act-aware, its second shard's
temp just opened: a 0-byte temp), quantize act-aware (the checkpoint's temp past 1 MB of 3: truncated),
pack (the packed temp past 0.5 MB of 1.4). About 30 s; the long run (every stage, 55 kill points, the next
stage after each) is ``python benchmarks/reliability.py OUT.json``.

The uninterrupted reference is made in this process with the same settings at the same workdir path
(artifacts record it), so byte equality also shows the CLI and the stage functions agree.
"""

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bitflux_cli.calibrate import calibrate
from bitflux_cli.cli import app
from bitflux_cli.config import load_config, parse_assignments
from bitflux_cli.packing import pack
from bitflux_cli.quantize import quantize

_spec = importlib.util.spec_from_file_location("reliability", Path(__file__).parents[1] / "benchmarks/reliability.py")
rel = importlib.util.module_from_spec(_spec)
sys.modules["reliability"] = rel  # dataclasses look their module up
_spec.loader.exec_module(rel)


def cli(args: list[str], workdir: Path):
    """The CLI in this process, with the harness's settings (what ``rel.cli`` runs as a subprocess)."""
    return CliRunner().invoke(app, rel.command(args, workdir)[1:])


def only_temps_differ(state: dict, before: dict, after: dict) -> None:
    assert rel.partial_artifacts(state, before, after) == [], "a partial file under an artifact's name"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The reference states, then the killed runs, each followed by what a user would run next."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("crash")
    workdir = work / "wd"
    cfg = load_config("tiny", {"workdir": str(workdir)}, parse_assignments(rel.SETTINGS))  # what `bitflux pack` gets
    ref = {"empty": {}}
    calibrate(cfg)
    ref["calibrate"] = rel.snapshot(workdir)
    quantize(cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"method": "act-aware"})}))
    ref["quantize"] = rel.snapshot(workdir)
    pack(cfg)
    ref["pack"] = rel.snapshot(workdir)
    shutil.rmtree(workdir)
    workdir.mkdir()
    out = {"ref": ref, "workdir": workdir}

    # 1. quantize act-aware on an empty workdir runs calibrate first: killed as it opens its second shard's temp
    out["calibrate"] = rel.run_killed(["quantize", "--method", "act-aware"], workdir,
                                      rel.Trigger("modify", "calib/.shard-00001.safetensors.*.tmp", 1))
    out["calibrate_state"] = rel.snapshot(workdir)
    # 2. quantize again: calibration resumes, then killed mid-way through writing the checkpoint
    out["quantize"] = rel.run_killed(["quantize", "--method", "act-aware"], workdir,
                                     rel.Trigger("size", "ternary/.parts-*/.transformer.safetensors.*.tmp", 1_000_000))
    out["quantize_state"] = rel.snapshot(workdir)
    out["pack_refused"] = cli(["pack"], workdir)  # the next stage, on what the kill left
    out["pack_refused_state"] = rel.snapshot(workdir)
    out["quantize_rerun"] = cli(["quantize", "--method", "act-aware"], workdir)
    out["quantize_rerun_state"] = rel.snapshot(workdir)
    # 3. pack killed mid-write, rerun
    out["pack"] = rel.run_killed(["pack"], workdir, rel.Trigger("size", "packed/.transformer.safetensors.*.tmp", 500_000))
    out["pack_state"] = rel.snapshot(workdir)
    out["pack_rerun"] = cli(["pack"], workdir)
    out["pack_rerun_state"] = rel.snapshot(workdir)
    return out


def test_calibrate_killed_leaves_only_whole_shards(run):
    killed, state, ref = run["calibrate"], run["calibrate_state"], run["ref"]
    assert killed.reached and killed.returncode == -9, killed
    assert any(p.startswith("calib/.shard-00001.safetensors.") for p in killed.leftovers), killed.leftovers
    only_temps_differ(state, ref["empty"], ref["calibrate"])
    assert state["calib/shard-00000.safetensors"] == ref["calibrate"]["calib/shard-00000.safetensors"]
    assert "calib/manifest.json" not in state and "calib/shard-00001.safetensors" not in state


def test_quantize_killed_mid_write_resumed_calibration_and_left_no_checkpoint(run):
    killed, state, ref = run["quantize"], run["quantize_state"], run["ref"]
    assert killed.reached and killed.returncode == -9, killed
    temp = [p for p in killed.leftovers if p.startswith("ternary/.parts-") and "/.transformer.safetensors." in p]
    assert temp and 0 < killed.leftovers[temp[0]], killed.leftovers  # a truncated temp file
    only_temps_differ(state, ref["calibrate"], ref["quantize"])
    assert {p: s for p, s in state.items() if p.startswith("calib/") and not rel.is_temp(p)} == ref["calibrate"]
    assert "ternary/transformer.safetensors" not in state


def test_next_stage_refuses_what_the_kill_left(run):
    res, workdir = run["pack_refused"], run["workdir"]
    assert res.exit_code == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert f"{workdir}/ternary/transformer.safetensors does not exist: run `bitflux quantize` first" in res.stderr
    assert run["pack_refused_state"] == run["quantize_state"]  # it wrote nothing


def test_quantize_rerun_is_byte_identical(run):
    assert run["quantize_rerun"].exit_code == 0, run["quantize_rerun"].stderr
    state, ref = run["quantize_rerun_state"], run["ref"]["quantize"]
    assert {p: s for p, s in state.items() if not rel.is_temp(p)} == ref
    assert not [p for p in state if p.startswith("ternary/.transformer.safetensors.")]  # its temp was cleaned


def test_quantize_rerun_leaves_no_stale_parts(run):
    # the killed run's ternary/.parts-* (a TemporaryDirectory, whose cleanup a kill skips) is removed by the rerun
    assert [p for p in run["quantize_rerun_state"] if rel.is_temp(p)] == []


def test_pack_killed_then_rerun_is_byte_identical(run):
    killed, ref = run["pack"], run["ref"]
    assert killed.reached and killed.returncode == -9, killed
    assert [p for p in killed.leftovers if p.startswith("packed/.transformer.safetensors.")], killed.leftovers
    assert "packed/transformer.safetensors" not in run["pack_state"]
    assert run["pack_rerun"].exit_code == 0, run["pack_rerun"].stderr
    assert run["pack_rerun_state"] == ref["pack"]  # whole and identical, its temp file gone
