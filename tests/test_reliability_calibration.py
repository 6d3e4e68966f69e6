"""Calibration is verified where it is read: a damaged, replaced or foreign file is refused in one line
naming it and `bitflux calibrate`, which then remakes exactly what was wrong, byte for byte.

One small calibration (4 mini prompts, 2 steps, 2 shards) is made once; each test damages a copy.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bitflux_cli.calibrate import calibrate, load_calibration
from bitflux_cli.cli import app
from bitflux_cli.config import load_config
from bitflux_cli.errors import ArtifactError, BitfluxError, MissingArtifactError
from bitflux_cli.tensorfile import TensorFile, specs_of, write_tensorfile

SETTINGS = {"calibration.prompts.sets": ["mini"], "calibration.prompts.limit": 4, "calibration.steps": 2,
            "calibration.shard_size": 2, "calibration.batch": 2}
FILES = ("manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "stats.safetensors")
REMAKE = "run `bitflux calibrate` (same --config/--workdir/--set) to remake it"


def config(workdir: Path, **extra):
    return load_config("tiny", {"workdir": str(workdir), **SETTINGS, **extra})


def calib_bytes(workdir: Path) -> dict[str, bytes]:
    return {name: (workdir / "calib" / name).read_bytes() for name in FILES}


def same_calibration(a: dict[str, bytes], b: dict[str, bytes]) -> None:
    """Byte-identical, manifest included (it names no workdir)."""
    assert a == b
    assert "workdir" not in json.loads(a["manifest.json"])["config"]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A finished calibration, its bytes, and a shard of another config (calibration.seed 1)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("calib-verify")
    calibrate(config(tmp / "clean"))
    calibrate(config(tmp / "other", **{"calibration.seed": 1}))
    return {"clean": tmp / "clean", "bytes": calib_bytes(tmp / "clean"),
            "foreign": (tmp / "other/calib/shard-00001.safetensors").read_bytes()}


@pytest.fixture
def workdir(made, tmp_path):
    """A copy of the clean calibration to damage."""
    shutil.copytree(made["clean"], tmp_path / "wd")
    return tmp_path / "wd"


def refused(workdir: Path, name: str, *expected: str, kind=ArtifactError) -> str:
    """load_calibration refuses in one line naming ``calib/<name>`` and the command that remakes it."""
    with pytest.raises(kind) as info:
        load_calibration(config(workdir))
    msg = str(info.value)
    assert str(workdir / "calib" / name) in msg and REMAKE in msg and "\n" not in msg, msg
    for text in expected:
        assert text in msg, (text, msg)
    return msg


def remade(workdir: Path, made: dict, computed: int) -> None:
    """`calibrate` recomputes ``computed`` shards and the calibration is byte-identical to the clean one."""
    assert calibrate(config(workdir))["computed_shards"] == computed
    same_calibration(calib_bytes(workdir), made["bytes"])
    load_calibration(config(workdir))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_clean_calibration_loads(made):
    calib = load_calibration(config(made["clean"]))
    assert calib.records()["calls.step"].shape == (8,) and len(calib.fingerprint) == 64
    assert calib_bytes(made["clean"]) == made["bytes"]  # reading wrote nothing


def test_flipped_byte_in_a_shard(made, workdir):
    flip(workdir / "calib/shard-00001.safetensors", -100)  # in the last tensor's data
    refused(workdir, "shard-00001.safetensors", "does not match the sha256 recorded in manifest.json")
    remade(workdir, made, computed=1)


def test_shard_copied_from_another_config(made, workdir):
    (workdir / "calib/shard-00001.safetensors").write_bytes(made["foreign"])
    refused(workdir, "shard-00001.safetensors", "was made for another calibration")
    remade(workdir, made, computed=1)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not json", "a list", "binary", "edited", "no stats",
                                    "path outside", "deep"])
def test_damaged_manifest(made, workdir, damage):
    file = workdir / "calib/manifest.json"
    m = json.loads(file.read_text())
    text = {"truncated": file.read_text()[:200], "empty": "", "not json": "{'shards': []}", "a list": "[1, 2]",
            "binary": "\x89PNG\x00\xff", "edited": file.read_text().replace('"steps": 2', '"steps": 3'),
            "no stats": json.dumps({k: v for k, v in m.items() if k != "stats"}),
            "path outside": json.dumps(m | {"shards": [{"file": "../../x", "sha256": "0" * 64}] * 2}),
            "deep": "[" * 100000}[damage]
    file.write_bytes(text.encode("utf-8", "surrogateescape") if damage != "binary" else b"\x89PNG\x00\xff")
    refused(workdir, "manifest.json", "damaged" if damage not in ("no stats", "path outside") else "")
    remade(workdir, made, computed=0)


def test_manifest_with_its_own_sha256_recomputed_still_checks_the_files(made, workdir):
    # an edit that fixes the manifest's self-hash up still has to match every file it lists
    from bitflux_cli.calibrate import _self_sha256
    file = workdir / "calib/manifest.json"
    m = json.loads(file.read_text())
    m["stats"]["sha256"] = m["shards"][0]["sha256"]
    m["sha256"] = _self_sha256(m)
    file.write_text(json.dumps(m))
    refused(workdir, "stats.safetensors", "does not match the sha256 recorded in manifest.json")


@pytest.mark.parametrize("damage", ["flipped", "truncated", "empty", "a shard"])
def test_damaged_stats(made, workdir, damage):
    file = workdir / "calib/stats.safetensors"
    if damage == "flipped":
        flip(file, len(made["bytes"]["stats.safetensors"]) // 2)
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:-7])
    elif damage == "empty":
        file.write_bytes(b"")
    else:  # of the same calibration, so of the same fingerprint: the sha256 tells
        file.write_bytes(made["bytes"]["shard-00000.safetensors"])
    refused(workdir, "stats.safetensors")
    remade(workdir, made, computed=0)


@pytest.mark.parametrize("name", ["shard-00000.safetensors", "stats.safetensors"])
def test_missing_file(made, workdir, name):
    (workdir / "calib" / name).unlink()
    refused(workdir, name, "does not exist", kind=MissingArtifactError)
    remade(workdir, made, computed=int(name.startswith("shard")))


def test_stats_with_checksums_recomputed_are_still_checked(made, workdir):
    """A NaN written with valid checksums and manifest hashes is refused when the statistic is used."""
    from bitflux_cli.artifacts import file_sha256
    from bitflux_cli.calibrate import _self_sha256
    stats_file = workdir / "calib/stats.safetensors"
    f = TensorFile(stats_file)
    tensors = {n: f.read(n) for n in f.entries}
    key = "stats.transformer_blocks.0.attn.to_q.sq_sum"
    tensors[key] = tensors[key].clone()
    tensors[key][3] = float("nan")
    write_tensorfile(stats_file, specs_of(tensors.items()), {k: v for k, v in f.metadata.items() if k != "checksums"})
    file = workdir / "calib/manifest.json"
    m = json.loads(file.read_text())
    m["stats"]["sha256"] = file_sha256(stats_file)
    m["sha256"] = _self_sha256(m)
    file.write_text(json.dumps(m))
    calib = load_calibration(config(workdir))
    calib.second_moment("transformer_blocks.0.attn.to_k")  # the others are fine
    with pytest.raises(ArtifactError, match="statistics of transformer_blocks.0.attn.to_q are not finite"):
        calib.second_moment("transformer_blocks.0.attn.to_q")
    with pytest.raises(ArtifactError, match="holds no statistics for transformer_blocks.9.attn.to_q"):
        calib.second_moment("transformer_blocks.9.attn.to_q")


def test_a_shard_replaced_after_loading_is_refused_when_read(made, workdir):
    calib = load_calibration(config(workdir))
    (workdir / "calib/shard-00000.safetensors").write_bytes(made["foreign"])
    with pytest.raises(ArtifactError, match="shard-00000.safetensors was made for another calibration"):
        calib.records()


def test_every_single_byte_flip_is_refused(made, workdir):
    """One flipped byte anywhere (sampled: 8 header-length bytes, the JSON header, tensor data) of any
    calibration file: refused in one line naming that file, never another exception; or, where the flip
    made the manifest another config's or format's (its "format" digit), the calibration is remade
    (load_calibration runs calibrate) and ends byte-identical to the clean one."""
    rng = random.Random(0)
    outcomes = {"refused": 0, "remade": 0}
    for name in FILES:
        clean = made["bytes"][name]
        header = 8 + int.from_bytes(clean[:8], "little") if name != "manifest.json" else len(clean)
        offsets = sorted({*range(min(8, header)), *rng.sample(range(header), min(40, header)),
                          *(rng.sample(range(header, len(clean)), 12) if len(clean) > header else [])})
        for offset in offsets:
            file = workdir / "calib" / name
            flip(file, offset)
            try:
                load_calibration(config(workdir))
            except BitfluxError as exc:
                assert name in str(exc) and REMAKE in str(exc) and "\n" not in str(exc), (name, offset, exc)
                outcomes["refused"] += 1
            else:
                assert calib_bytes(workdir) == made["bytes"], f"{name}: byte {offset} flipped and accepted"
                outcomes["remade"] += 1
            for n, data in made["bytes"].items():
                (workdir / "calib" / n).write_bytes(data)
    assert sum(outcomes.values()) >= 150 and outcomes["refused"] >= 140, outcomes
    print(f"byte flips: {outcomes}")


def test_cli_refuses_in_one_line(made, workdir):
    flip(workdir / "calib/shard-00000.safetensors", -5)
    res = CliRunner().invoke(app, ["quantize", "--workdir", str(workdir), "--method", "act-aware",
                                   *[f"--set={k}={json.dumps(v)}" for k, v in SETTINGS.items()]])
    err = res.stderr.strip()
    assert res.exit_code == 1 and res.stdout == "" and len(err.splitlines()) == 1 and "Traceback" not in err, res.stderr
    assert f"{workdir}/calib/shard-00000.safetensors does not match" in err and REMAKE in err
    assert not (workdir / "ternary/transformer.safetensors").exists()


def test_embeds_left_by_a_kill_after_a_shard_was_renamed_are_removed(made, workdir):
    # killed between shard-00000's rename and the removal of its text embeddings: the rerun keeps the shard
    (workdir / "calib/.embeds-00000.safetensors").write_bytes(b"left by a kill")
    assert calibrate(config(workdir))["computed_shards"] == 0
    assert sorted(p.name for p in (workdir / "calib").iterdir()) == sorted(FILES)
