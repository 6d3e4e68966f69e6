"""The calibrate stage: shards and manifest, resume after a kill, torchrun merge equal to one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from bitflux_cli.calibrate import calibrate, load_calibration
from bitflux_cli.config import load_config

DATA = (Path(__file__).parents[1] / "../shared/data").resolve()
pytestmark = [pytest.mark.skipif(not DATA.is_dir(), reason=f"calibration prompts (paper set) not found at {DATA}: needs the shared/data checkout beside the repo"),
              pytest.mark.usefixtures("one_thread")]
CALIBRATION = {"prompts": {"sets": ["paper"], "limit": 4, "data_dir": str(DATA)},
               "steps": 4, "timesteps": 2, "tokens": 8, "shard_size": 2, "batch": 2}


def config_file(tmp_path: Path, workdir: Path) -> Path:
    """A tiny config with a four-prompt calibration in ``workdir``."""
    data = yaml.safe_load(Path(__file__).parents[1].joinpath("configs/tiny.yaml").read_text())
    data |= {"workdir": str(workdir), "calibration": CALIBRATION}
    path = tmp_path / f"{workdir.name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def shard_tensors(workdir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted((workdir / "calib").glob("shard-*.safetensors")):
        out |= {f"{shard.name}:{k}": v for k, v in load_file(str(shard)).items()}
    return out | {f"stats:{k}": v for k, v in load_file(str(workdir / "calib/stats.safetensors")).items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One single-process calibration: its config, result and tensors."""
    tmp = tmp_path_factory.mktemp("calib")
    cfg = load_config(str(config_file(tmp, tmp / "single")))
    result = calibrate(cfg)
    return {"cfg": cfg, "result": result, "tensors": shard_tensors(cfg.workdir), "tmp": tmp}


def test_shards_manifest_and_statistics(single):
    cfg, result = single["cfg"], single["result"]
    assert result["prompts"] == 4 and result["shards"] == 2 and result["computed_shards"] == 2
    assert result["calls"] == 4 * 2  # prompts x recorded timesteps
    manifest = json.loads((cfg.workdir / "calib/manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert manifest["counts"]["selected"] == 4 and len(manifest["prompts_sha256"]) == 64
    calib = load_calibration(cfg)
    d = calib.second_moment("transformer_blocks.0.attn.to_q")  # [K]
    assert d.shape == (128,) and torch.isfinite(d).all() and (d > 0).all()
    assert (calib.stats["stats.transformer_blocks.0.attn.to_q.absmax"] ** 2 >= d).all()
    records = calib.records()
    assert records["calls.velocity"].shape == records["calls.hidden_states"].shape == (8, 9, 64)  # [calls, image tokens of 48x48, channels]
    assert records["blocks.single_transformer_blocks.3"].shape == (8, 8, 128)
    assert sorted(records["calls.prompt_index"].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_resume_after_kill_gives_the_same_result(single, tmp_path):
    workdir = tmp_path / "resumed"
    shutil.copytree(single["cfg"].workdir, workdir)
    (workdir / "calib/shard-00001.safetensors").unlink()  # the shard being written when killed ...
    (workdir / "calib/.shard-00001.safetensors.x.tmp").write_bytes(b"half")  # ... left its temp file
    (workdir / "calib/stats.safetensors").unlink()
    result = calibrate(load_config(str(config_file(tmp_path, workdir))))
    assert result["computed_shards"] == 1
    assert_same(shard_tensors(workdir), single["tensors"])


def test_torchrun_two_ranks_merge_to_the_single_process_result(single, tmp_path):
    workdir = tmp_path / "ranks"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    bitflux = str(Path(sys.executable).with_name("bitflux"))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29517",
                          bitflux, "calibrate", "-c", str(config_file(tmp_path, workdir)), "--json"],
                         check=True, env=env, capture_output=True, text=True, timeout=300)
    assert_same(shard_tensors(workdir), single["tensors"])
    assert len(run.stdout.splitlines()) == 1, run.stdout  # one JSON object for the job, from rank 0
    assert json.loads(run.stdout)["computed_shards"] >= 1


def test_load_calibration_runs_calibrate_when_missing(single, tmp_path):
    cfg = load_config(str(config_file(tmp_path, tmp_path / "fresh")))
    calib = load_calibration(cfg)
    assert (cfg.workdir / "calib/manifest.json").is_file()
    assert torch.equal(calib.stats["stats.transformer_blocks.1.ff.net.2.sq_sum"],
                       single["tensors"]["stats:stats.transformer_blocks.1.ff.net.2.sq_sum"])
