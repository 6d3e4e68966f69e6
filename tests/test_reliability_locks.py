"""One writer per workdir stage, and no temp file left behind by a killed write.

Another process holds the stage locks (``artifacts.stage_lock``) while the CLI runs here: every
command that would write one of those stages exits at once with one line naming the holder.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bitflux_cli.artifacts import atomic_dir, atomic_file, stage_lock
from bitflux_cli.cli import app
from bitflux_cli.errors import BusyError

STAGES = ("calibrate", "quantize", "pack", "generate", "eval")
HOLD = textwrap.dedent("""
    import sys
    from contextlib import ExitStack
    from bitflux_cli.artifacts import stage_lock
    with ExitStack() as stack:
        for stage in sys.argv[2:]:
            stack.enter_context(stage_lock(sys.argv[1], stage))
        print("held", flush=True)
        sys.stdin.read()
""")


def hold(workdir: Path, *stages: str) -> subprocess.Popen:
    """A second process holding ``stages``' locks of ``workdir`` until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir), *stages], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture(scope="module")
def held(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("locked")
    proc = hold(workdir, *STAGES)
    yield workdir, proc
    proc.stdin.close()
    proc.wait(timeout=30)


@pytest.mark.parametrize("command, stage", [(["calibrate"], "calibrate"), (["quantize"], "calibrate"), (["pack"], "pack"),
                                            (["generate", "x", "--steps", "1"], "generate"), (["eval"], "eval")])
def test_a_second_writer_is_refused_naming_the_first(held, command, stage):
    workdir, proc = held
    res = CliRunner().invoke(app, [*command, "--workdir", str(workdir)])
    err = res.stderr.strip()
    assert res.exit_code == 1 and res.stdout == "" and len(err.splitlines()) == 1, res.stderr
    assert f"another run is writing its {stage} stage (pid {proc.pid} on " in err and "Traceback" not in err
    assert sorted(p.name for p in workdir.iterdir()) == sorted(f".lock-{s}" for s in STAGES)  # nothing written


def test_the_lock_goes_with_a_killed_holder(tmp_path):
    proc = hold(tmp_path, "quantize")
    with pytest.raises(BusyError, match=f"pid {proc.pid} on .*: .*-c {tmp_path} quantize"):
        with stage_lock(tmp_path, "quantize"):
            pass
    with stage_lock(tmp_path, "pack"):  # other stages are free
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with stage_lock(tmp_path, "quantize"):  # no stale lock after kill -9
        with pytest.raises(BusyError, match=f"pid {os.getpid()} on "):  # and it excludes this process's next holder too
            with stage_lock(tmp_path, "quantize"):
                pass


def test_stale_temps_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "packed" / "transformer.safetensors"
    target.parent.mkdir()
    stale = target.with_name(".transformer.safetensors.k1ll3d.tmp")
    stale.write_bytes(b"")  # a kill -9 mid-write leaves this
    other = target.with_name(".other.safetensors.k1ll3d.tmp")  # another artifact's temp: not this write's business
    other.write_bytes(b"")
    live = target.with_name(".transformer.safetensors.l1ve.tmp")
    writer = hold_temp(live)  # a writer still running
    with atomic_file(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and not stale.exists() and other.exists() and live.exists()
    writer.stdin.close()
    writer.wait(timeout=30)

    calib = tmp_path / "calib"
    (tmp_path / ".calib.k1ll3d.tmp").mkdir()
    (tmp_path / ".calib.k1ll3d.tmp" / "shard.safetensors").write_bytes(b"half")
    (tmp_path / ".calib.old").mkdir()  # killed between atomic_dir's two renames: it blocked every later write
    (tmp_path / ".calib.old" / "manifest.json").write_text("{}")
    for content in ("first", "second"):
        with atomic_dir(calib) as tmp:
            (tmp / "manifest.json").write_text(content)
    assert (calib / "manifest.json").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "packed"]


def hold_temp(path: Path) -> subprocess.Popen:
    """A process holding ``path`` open and locked, as atomic_file's writer does."""
    path.write_bytes(b"partial")
    code = "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc
