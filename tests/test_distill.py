"""distill at scale, on the tiny model: FSDP over two torchrun CPU ranks equals one process, resumes
across world sizes, and the block-wise mode lowers the velocity error, exports exact codes and resumes.
Resume state holds no pickle: a planted one is never run, a damaged or foreign one is refused."""

import copy
import importlib
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from bitflux_cli.calibrate import calibrate, load_calibration
from bitflux_cli.checkpoint import read_checkpoint
from bitflux_cli.config import load_config
from bitflux_cli.errors import ArtifactError, UsageError
from bitflux_cli.fidelity import REPORT_PROMPTS
from bitflux_cli.methods import METHODS, run_method
from bitflux_cli.methods.ste import read_saved, write_saved
from bitflux_cli.models import load_pipeline
from bitflux_cli.teacher import record_transformer_calls, velocity_errors
from bitflux_cli.ternary import quantize_transformer, scoped_linears

DATA = (Path(__file__).parents[1] / "../shared/data").resolve()
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"calibration prompts (paper set) not found at {DATA}: needs the shared/data checkout beside the repo")
CALIBRATION = {"prompts": {"sets": ["paper"], "limit": 4, "data_dir": str(DATA)},
               "steps": 4, "timesteps": 2, "tokens": 8, "shard_size": 2, "batch": 2}
FULL = {"steps": 4, "batch": 4, "save_every": 2, "gradient_checkpointing": True}
BLOCKWISE = {"mode": "blockwise", "block_steps": 4, "rounds": 2, "batch": 4, "save_every": 3, "gradient_checkpointing": True}
# Ranks sum each batch half apart and reduce the gradients: fp32 rounding, which Adam turns into
# scale differences of ~1e-6 relative (measured: at most 1.4e-6). One Adam step moves a scale
# by ~scale_lr = 1e-3 relative, so 1e-5 is 1% of a single step: any lost or doubled update fails it.
SCALE_RTOL = 1e-5
DISTILL = importlib.import_module("bitflux_cli.methods.distill")  # the module: the package's ``distill`` is the function


def tiny(tmp: Path, name: str, calib: Path | None, rounding: str = "ste", **distill) -> Path:
    """A tiny config file for workdir ``tmp/name``, holding a copy of the calibration in ``calib``."""
    data = yaml.safe_load(Path(__file__).parents[1].joinpath("configs/tiny.yaml").read_text())
    data |= {"workdir": str(tmp / name), "calibration": CALIBRATION}
    data["generate"]["steps"] = 4
    data["quantization"] |= {"eval_prompts": 1, "distill": distill, "block_recon": {"steps": 3, "batch": 4, "rounding": rounding}}
    if calib is not None:
        shutil.copytree(calib, tmp / name / "calib")
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def torchrun(config: Path) -> None:
    """``bitflux quantize --method distill`` on two gloo CPU ranks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bitflux = str(Path(sys.executable).with_name("bitflux"))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
                    bitflux, "quantize", "--method", "distill", "-c", str(config), "--json"],
                   check=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)


def exported(workdir: Path) -> dict:
    """{module: (codes, scale)} of the ternary checkpoint in ``workdir``."""
    ckpt = read_checkpoint(workdir / "ternary/transformer.safetensors")
    return {m: (ckpt.codes(m), ckpt.tensors[f"{m}.scale"]) for m in ckpt.modules}


def distill(config: Path, pipe) -> dict:
    """distill in this process (one rank) with the config file ``config``."""
    cfg = load_config(str(config))
    return METHODS["distill"](cfg, pipe, load_calibration(cfg))


def assert_same_codes(a: dict, b: dict, rtol: float = SCALE_RTOL) -> None:
    """Codes equal and scales within ``rtol`` (0: bit-identical)."""
    assert a.keys() == b.keys()
    for m in a:
        assert torch.equal(a[m][0].cpu(), b[m][0].cpu()), m
        torch.testing.assert_close(a[m][1].cpu(), b[m][1].cpu(), rtol=rtol, atol=0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """One calibration, the pipeline, held-out calls, and one-process full runs of 2 and 4 steps."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with other jobs: two threads per process thrash
    tmp = tmp_path_factory.mktemp("distill")
    cfg = load_config(str(tiny(tmp, "source", None)))
    calibrate(cfg)
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    s = {"tmp": tmp, "calib": tmp / "source/calib", "pipe": pipe,
         "held_out": record_transformer_calls(pipe, REPORT_PROMPTS[:2], cfg.generate, seed=10_000, keep=4)[0]}
    s["single2"] = distill(tiny(tmp, "single2", s["calib"], **FULL | {"steps": 2}), pipe)
    s["single4"] = distill(tiny(tmp, "single4", s["calib"], **FULL), pipe)
    yield s
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def two_ranks(setup):
    """The workdir of a 2-step full distill over two torchrun ranks."""
    torchrun(tiny(setup["tmp"], "ranks2", setup["calib"], **FULL | {"steps": 2}))
    return setup["tmp"] / "ranks2"


def test_two_ranks_equal_one_process(setup, two_ranks):
    assert_same_codes(exported(two_ranks), setup["single2"])
    fsdp, single = (read_saved(w / "distill/state.safetensors") for w in (two_ranks, setup["tmp"] / "single2"))
    assert fsdp.keys() == single.keys() and fsdp["step"] == single["step"] == 2
    shapes = [{k: (v.shape, v.dtype) for k, v in state["model"].items()} for state in (fsdp, single)]
    assert shapes[0] == shapes[1]
    assert fsdp["optimizer"]["param_groups"] == single["optimizer"]["param_groups"]
    assert fsdp["optimizer"]["state"].keys() == single["optimizer"]["state"].keys()


def test_resume_across_world_sizes(setup, two_ranks, tmp_path):
    to_two = tiny(tmp_path, "to-two", setup["calib"], **FULL)  # one process stopped at step 2, two ranks go on
    shutil.copytree(setup["tmp"] / "single2/distill", tmp_path / "to-two/distill")
    torchrun(to_two)
    assert_same_codes(exported(tmp_path / "to-two"), setup["single4"])
    to_one = tiny(tmp_path, "to-one", setup["calib"], **FULL)  # two ranks stopped at step 2, one process goes on
    shutil.copytree(two_ranks / "distill", tmp_path / "to-one/distill")
    assert_same_codes(distill(to_one, setup["pipe"]), setup["single4"])


def test_full_distill_releases_the_teacher_blocks_it_never_runs(setup, tmp_path):
    """quantize's release_teacher: after the start, the teacher's blocks go to meta; training never
    ran them, so the codes are those of a run that kept them."""
    import copy

    pipe = copy.deepcopy(setup["pipe"])
    cfg = load_config(str(tiny(tmp_path, "released", setup["calib"], **FULL)))
    codes = METHODS["distill"](cfg, pipe, load_calibration(cfg), release_teacher=True)
    assert_same_codes(codes, setup["single4"], rtol=0)
    assert all(p.is_meta for b in (*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks)
               for p in b.parameters())


def test_batch_must_divide_by_the_ranks(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(DISTILL, "init_distributed", lambda: (0, 3))
    with pytest.raises(UsageError, match=r"distill.batch \(4\) must be divisible by the number of ranks \(3\)"):
        distill(tiny(tmp_path, "three", setup["calib"], **FULL), setup["pipe"])


@pytest.fixture(scope="module")
def blockwise(setup):
    """Codes of an uninterrupted block-wise run (2 rounds of 4 steps per block)."""
    return distill(tiny(setup["tmp"], "blockwise", setup["calib"], **BLOCKWISE), setup["pipe"])


def test_blockwise_lowers_the_velocity_error_with_exact_codes(setup, blockwise):
    pipe = setup["pipe"]
    linears = dict(scoped_linears(pipe.transformer))
    assert blockwise.keys() == linears.keys()
    for name, (c, s) in blockwise.items():
        assert c.dtype == torch.int8 and c.shape == linears[name].weight.shape and set(c.unique().tolist()) <= {-1, 0, 1}
        assert s.dtype == torch.float32 and s.shape == (c.shape[0],) and (s > 0).all()
    blocks = {".".join(name.split(".")[:2]) for name in linears}  # only the last round's latents are kept
    assert {f.name for f in (setup["tmp"] / "blockwise/distill/blocks").iterdir()} == {f"{b}.r1.safetensors" for b in blocks}
    errors = {}
    for method, codes in (("absmean", None), ("blockwise", blockwise)):
        student = copy.deepcopy(pipe.transformer)
        quantize_transformer(student, codes)
        errors[method] = sum(velocity_errors(pipe.transformer, student, setup["held_out"]))
    assert errors["blockwise"] < 0.95 * errors["absmean"], errors


class _Killed(Exception):
    pass


def test_blockwise_resumes_mid_block(setup, blockwise, tmp_path, monkeypatch):
    train_step = DISTILL.Run.train_step

    def killed_at_34(self, student, opt, step):
        if step == 34:
            raise _Killed
        train_step(self, student, opt, step)

    config = tiny(tmp_path, "killed", setup["calib"], **BLOCKWISE)
    monkeypatch.setattr(DISTILL.Run, "train_step", killed_at_34)
    with pytest.raises(_Killed):
        distill(config, setup["pipe"])
    monkeypatch.undo()
    saved = read_saved(tmp_path / "killed/distill/state.safetensors")  # saved every 3 steps: at 33, in round 1's third block
    assert (saved["step"], saved["round"], saved["block"], saved["block_step"]) == (33, 1, "single_transformer_blocks.0", 1)
    assert_same_codes(distill(config, setup["pipe"]), blockwise, rtol=0)


@pytest.mark.parametrize("mode, rounding", [(FULL | {"steps": 2}, "ste"), (BLOCKWISE | {"rounds": 1, "block_steps": 1}, "ste"),
                                             (FULL | {"steps": 2}, "adaround")], ids=["full", "blockwise", "full-adaround"])
def test_init_block_recon_starts_from_its_result(setup, mode, rounding):
    # learning rates ~0: the export is the start, which must be block-recon's codes and scales (learned rounding's too)
    name = f"{mode.get('mode', 'full')}-{rounding}"
    config = tiny(setup["tmp"], f"init-{name}", setup["calib"], rounding, **mode, init="block-recon", weight_lr=0, scale_lr=1e-12)
    cfg = load_config(str(config))
    recon = run_method(cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"method": "block-recon"})}),
                       setup["pipe"], load_calibration(cfg))
    absmean = distill(tiny(setup["tmp"], f"absmean-{name}", setup["calib"], **mode, weight_lr=0, scale_lr=1e-12),
                      setup["pipe"])
    started = distill(config, setup["pipe"])
    assert_same_codes(started, recon, rtol=1e-9)
    assert any(not torch.equal(started[m][0], absmean[m][0]) for m in started)


def test_a_planted_pickle_state_is_never_run(setup, tmp_path):
    # A state.pt whose unpickling runs a shell command; TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 would make
    # torch.load unpickle it. distill must not open it at all, and still run cleanly.
    from typer.testing import CliRunner

    from bitflux_cli.cli import app

    class Payload:
        def __reduce__(self):
            return os.system, ('touch "$BITFLUX_TEST_MARKER"',)

    config = tiny(tmp_path, "planted", setup["calib"], **FULL | {"steps": 2})
    bomb = pickle.dumps({"fingerprint": "x", "step": 0, "model": Payload()})
    (tmp_path / "planted/distill/blocks").mkdir(parents=True)
    (tmp_path / "planted/distill/state.pt").write_bytes(bomb)
    (tmp_path / "planted/distill/blocks/transformer_blocks.0.r0.pt").write_bytes(bomb)
    live = tmp_path / "live-marker"  # the payload is real: plain unpickling runs it
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))",
                    str(tmp_path / "planted/distill/state.pt")], env=os.environ | {"BITFLUX_TEST_MARKER": str(live)}, check=True)
    assert live.exists()
    marker = tmp_path / "marker"
    res = CliRunner().invoke(app, ["quantize", "--method", "distill", "-c", str(config), "--json"],
                             env={"BITFLUX_TEST_MARKER": str(marker), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    assert res.exit_code == 0, res.stderr
    assert not marker.exists()
    assert "Traceback" not in res.stderr and "pickle state: not read" in res.stderr
    assert (tmp_path / "planted/distill/state.safetensors").is_file()
    assert_same_codes(exported(tmp_path / "planted"), setup["single2"], rtol=0)


def test_fingerprint_includes_the_tool_version(setup, monkeypatch):
    cfg = load_config(str(setup["tmp"] / "single2.yaml"))
    calib = load_calibration(cfg)
    before = DISTILL._fingerprint(cfg, calib)
    monkeypatch.setattr(DISTILL, "TOOL_VERSION", "0.0.0-other")
    assert DISTILL._fingerprint(cfg, calib) != before


def test_damaged_or_foreign_state_is_refused_naming_the_file(setup, tmp_path):
    config = tiny(tmp_path, "damaged", setup["calib"], **FULL)
    shutil.copytree(setup["tmp"] / "single2/distill", tmp_path / "damaged/distill")
    state = tmp_path / "damaged/distill/state.safetensors"
    intact = state.read_bytes()
    data = bytearray(intact)
    data[-5] ^= 0x40  # inside the last tensor's bytes
    state.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"state.safetensors: tensor .* does not match its recorded sha256") as err:
        distill(config, setup["pipe"])
    assert "\n" not in str(err.value) and str(state) in str(err.value)
    state.write_bytes(intact)
    saved = read_saved(state)
    model = dict(saved["model"])  # a checksummed file whose tensors are not this model's
    name = next(k for k in model if k.endswith(".log_scale"))
    model[name] = model[name][:-1]
    write_saved(state, {k: v for k, v in saved.items() if k in ("fingerprint", "step")}, model, saved["optimizer"])
    with pytest.raises(ArtifactError, match=f"its latent tensors do not fit this model .*first {re.escape(name)}"):
        distill(config, setup["pipe"])


def test_recorded_calls_are_the_evenly_spaced_steps_and_only_those_are_kept(setup):
    pipe, gen = setup["pipe"], load_config(str(setup["tmp"] / "source.yaml")).generate
    every = []
    handle = pipe.transformer.register_forward_pre_hook(lambda _m, _a, kw: every.append(kw["timestep"].clone()),
                                                        with_kwargs=True)
    try:
        calls, _ = record_transformer_calls(pipe, REPORT_PROMPTS[:2], gen, seed=10_000, keep=4)
    finally:
        handle.remove()
    assert len(every) == gen.steps and len(calls) == min(4, gen.steps)
    want = np.linspace(0, gen.steps - 1, num=len(calls)).round().astype(int)
    assert [c["timestep"].tolist() for c in calls] == [every[i].tolist() for i in want]
    assert all(t.device.type == "cpu" for c in calls for t in c.values() if torch.is_tensor(t))
