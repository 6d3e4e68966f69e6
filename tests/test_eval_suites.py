"""GenEval / T2I-CompBench generation: the official evaluators' folder layouts, counts against the full
prompt data, resume, two torchrun ranks equal to one process, and a FLUX.1-dev-layout stand-in."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bitflux_cli import eval_suites
from bitflux_cli.artifacts import file_sha256
from bitflux_cli.cli import app
from bitflux_cli.config import load_config
from bitflux_cli.eval_suites import generate_suite, geneval_items, t2i_items
from bitflux_cli.prompts import T2I_CATEGORIES

DATA = (Path(__file__).parents[1] / "../shared/data").resolve()
pytestmark = [pytest.mark.skipif(not DATA.is_dir(), reason=f"GenEval / T2I-CompBench prompts not found at {DATA}: needs the shared/data checkout beside the repo"),
              pytest.mark.usefixtures("one_thread")]
TINY = {"generate.steps": 1, "generate.height": 32, "generate.width": 32, "eval.batch": 1,
        "calibration.prompts.data_dir": str(DATA)}


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def t2i_name(name: str) -> tuple[str, int]:
    """(prompt, question id) as T2I-CompBench's evaluators read them from a file name."""
    return name.split("_")[0], int(name.split("_")[-1].split(".")[0])


def test_counts_and_names_over_the_full_data(tmp_path):
    gen, n = geneval_items(DATA, tmp_path, k=4)
    meta = (DATA / "geneval/evaluation_metadata.jsonl").read_text().splitlines()
    assert n == len(gen) == 553 and [it.index for it in gen] == list(range(553))
    assert [json.loads(next(iter(it.files.values())))["prompt"] for it in gen] == [it.prompt for it in gen]
    assert gen[552].images[3] == tmp_path / "00552/samples/0003.png" and next(iter(gen[7].files.values())) == meta[7] + "\n"

    t2i, n = t2i_items(DATA, tmp_path, k=10)
    assert n == len(t2i) == 2400 and [it.index for it in t2i] == list(range(2400))
    paths = [p for it in t2i for p in it.images]
    assert len(set(paths)) == 24_000
    for c, cat in enumerate(T2I_CATEGORIES):
        mine = t2i[c * 300:(c + 1) * 300]
        assert {it.images[0].parent for it in mine} == {tmp_path / cat / "samples"}
        ids = [t2i_name(p.name) for it in mine for p in it.images]
        assert [q for _, q in ids] == list(range(3000))  # 6-digit running index, 10 a prompt
        assert [p for p, _ in ids] == [it.prompt for it in mine for _ in range(10)]
    assert len(t2i_items(DATA, tmp_path, k=1, limit=2)[0]) == 16  # the first two of each category


def run(tmp_path, suite, full_precision, **overrides):
    cfg = load_config("tiny", {"workdir": str(tmp_path), "eval.suite": suite, **TINY, **overrides})
    return generate_suite(cfg, full_precision)


@pytest.fixture
def counted(monkeypatch):
    calls = []
    real = eval_suites.run_pipeline

    def run_pipeline(pipe, prompts, gen, seed, **kw):
        calls.append(len(prompts))
        return real(pipe, prompts, gen, seed, **kw)

    monkeypatch.setattr(eval_suites, "run_pipeline", run_pipeline)
    return calls


def test_geneval_layout_of_the_packed_model_and_resume(tiny_chain, tmp_path, counted):
    (tmp_path / "packed").mkdir()
    shutil.copy(tiny_chain["pack"]["path"], tmp_path / "packed/transformer.safetensors")
    r = run(tmp_path, "geneval", False, **{"eval.limit": 3, "eval.images_per_prompt": 2})
    root = tmp_path / "eval/geneval-ternary"
    meta = (DATA / "geneval/evaluation_metadata.jsonl").read_text().splitlines()
    expected = {"run.json", "manifest.json"} | {f"{i:05d}/{f}" for i in range(3)
                                                for f in ("metadata.jsonl", "samples/0000.png", "samples/0001.png")}
    assert set(files_under(root)) == expected and sum(counted) == 6
    for i in range(3):
        assert (root / f"{i:05d}/metadata.jsonl").read_text() == meta[i] + "\n"  # json.load reads it, as evaluate_images.py does
        im = np.asarray(Image.open(root / f"{i:05d}/samples/0001.png"))
        assert im.shape == (32, 32, 3) and im.dtype == np.uint8 and im.std() > 0
    m = json.loads((root / "manifest.json").read_text())
    assert m["checkpoint"]["sha256"] == file_sha256(tmp_path / "packed/transformer.safetensors")
    assert (m["checkpoint"]["method"], m["checkpoint"]["codec"]) == ("absmean", "2bit") == (r["method"], r["codec"])
    assert (m["prompts"], m["total_prompts"], m["images"], m["generated"], m["skipped"]) == (3, 553, 6, 6, 0)
    assert m["seeds"] == [0, 553 + 2] and "evaluation/evaluate_images.py" in m["evaluate"][0]

    # resume: one image lost; only it is drawn again, the same pixels, the rest untouched
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.png")}
    lost = root / "00001/samples/0001.png"
    pixels = lost.read_bytes()
    lost.unlink()
    counted.clear()
    r = run(tmp_path, "geneval", False, **{"eval.limit": 3, "eval.images_per_prompt": 2})
    assert counted == [1] and (r["generated"], r["skipped"]) == (1, 5) and lost.read_bytes() == pixels
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != lost)

    # other settings: the folder is emptied, not mixed
    counted.clear()
    run(tmp_path, "geneval", False, **{"eval.limit": 1, "eval.images_per_prompt": 1, "generate.steps": 2})
    assert set(files_under(root)) == {"run.json", "manifest.json", "00000/metadata.jsonl", "00000/samples/0000.png"}


T2I_FLAGS = ["eval", "--suite", "t2i-compbench", "--full-precision", "--limit", "2", "--images", "1", "--json",
             *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]]


@pytest.fixture(scope="module")
def t2i_single(tmp_path_factory):
    wd = tmp_path_factory.mktemp("t2i-single")
    res = CliRunner().invoke(app, [*T2I_FLAGS, "--workdir", str(wd)])
    assert res.exit_code == 0, res.stderr
    return wd / "eval/t2i-compbench-fp", json.loads(res.stdout)


def test_t2i_compbench_layout(t2i_single):
    root, r = t2i_single
    assert (r["prompts"], r["total_prompts"], r["images"], r["generated"]) == (16, 2400, 16, 16)
    for cat in T2I_CATEGORIES:
        prompts = [p.strip() for p in (DATA / f"t2i_compbench/{cat}_val.txt").read_text(encoding="utf-8").splitlines()][:2]
        names = sorted(p.name for p in (root / cat).iterdir())
        assert names == ["samples"]
        assert sorted(t2i_name(p.name) for p in (root / cat / "samples").iterdir()) == sorted(zip(prompts, [0, 1]))
    m = json.loads((root / "manifest.json").read_text())
    assert m["categories"] == dict.fromkeys(T2I_CATEGORIES, 2) and m["checkpoint"] is None
    assert any(c.startswith("cd 3_in_1_eval") and str(root / "complex") in c for c in m["evaluate"])


def test_torchrun_two_ranks_make_the_single_process_files(t2i_single, tmp_path):
    root, _ = t2i_single
    bitflux = str(Path(sys.executable).with_name("bitflux"))
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531",
                          bitflux, *T2I_FLAGS, "--workdir", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout.splitlines()) == 1  # one JSON object, from rank 0
    r = json.loads(run.stdout)
    assert (r["world_size"], r["generated"], r["skipped"]) == (2, 16, 0)  # each image made once, by one rank
    assert "8 to generate on rank 0 of 2" in run.stderr and "8 to generate on rank 1 of 2" in run.stderr
    ranks, single = files_under(tmp_path / "eval/t2i-compbench-fp"), files_under(root)
    assert set(ranks) == set(single)
    assert all(ranks[f] == single[f] for f in ranks if f.endswith(".png"))


def test_flux_layout_standin(standin, tmp_path):
    cfg = load_config("flux-dev", {"workdir": str(tmp_path / "run"), "model.path": str(standin), "model.device": "cpu",
                                   "eval.suite": "geneval", "eval.limit": 1, "eval.images_per_prompt": 1,
                                   "generate.max_sequence_length": 8, **TINY, "generate.height": 16, "generate.width": 16})
    r = generate_suite(cfg, full_precision=True)
    root = tmp_path / "run/eval/geneval-fp"
    assert r["base_model"] == str(standin.resolve()) and r["generated"] == 1
    assert np.asarray(Image.open(root / "00000/samples/0000.png")).shape == (16, 16, 3)
    assert json.loads((root / "00000/metadata.jsonl").read_text())["prompt"] == "a photo of a bench"
