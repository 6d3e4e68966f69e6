"""The work directory: where each stage's artifact lives, atomic writes, one writer per stage."""

import fcntl
import glob
import hashlib
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import BusyError, MissingArtifactError, UsageError

# stage -> (artifact path inside the workdir, command that makes it)
LAYOUT = {
    "calibrate": ("calib", "bitflux calibrate"),
    "quantize": ("ternary/transformer.safetensors", "bitflux quantize"),
    "pack": ("packed/transformer.safetensors", "bitflux pack"),
    "generate": ("images", "bitflux generate"),
    "eval": ("eval", "bitflux eval"),
}


STAGE_ARTIFACTS = ("calibrate", "quantize", "pack")  # what no output of another command may replace


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def artifact_path(workdir: Path, stage: str) -> Path:
    """Where ``stage`` writes its artifact in ``workdir``."""
    return Path(workdir) / LAYOUT[stage][0]


def require(workdir: Path, stage: str) -> Path:
    """The artifact of ``stage``; a missing one names the command that makes it."""
    path = artifact_path(workdir, stage)
    if not path.exists():
        raise MissingArtifactError(f"{path} does not exist: run `{LAYOUT[stage][1]}` first (same --config/--workdir)")
    return path


def _hold(path: str) -> int:
    """An open descriptor of ``path`` with an exclusive lock: the mark of a live writer of a temp file."""
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _remove_stale(path: Path) -> None:
    """Remove what killed writes of ``path`` left beside it: temp files and dirs ``.<name>.*.tmp`` and
    ``atomic_dir``'s ``.<name>.old``. A temp whose writer is alive is locked by it and left alone."""
    for stale in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        try:
            fd = os.open(stale, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live writer
        else:
            shutil.rmtree(stale, ignore_errors=True) if os.path.isdir(stale) else Path(stale).unlink(missing_ok=True)
        finally:
            os.close(fd)
    shutil.rmtree(path.with_name(f".{path.name}.old"), ignore_errors=True)


@contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Temp files that a killed earlier write of ``path`` left are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    held = _hold(tmp)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp, path)
    finally:
        os.close(held)
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary directory beside ``path``; on success it replaces ``path``.

    Temp dirs (and a ``.<name>.old``) that a killed earlier write of ``path`` left are removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    held = _hold(str(tmp))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        os.close(held)
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _can_create_in(directory: Path) -> bool:
    # a real probe: os.access says yes to root, even on a read-only mount or in /proc
    try:
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse (``UsageError``, exit 2) a directory ``path`` that is a file or cannot be made or written.

    ``what`` names it in the message (``--workdir``). Nothing is created but a probe file, removed at once.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a directory")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UsageError(f"{what} {path}: {base} is a file, not a directory")
    if not _can_create_in(base):
        raise UsageError(f"{what} {path}: cannot write in {base}")


def artifact_folder(workdir: Path, stage: str) -> Path:
    """The folder that holds ``stage``'s artifact in ``workdir`` (``calib/``, ``ternary/``, ``packed/``, ...)."""
    path = artifact_path(workdir, stage)
    return path.parent if path.suffix == ".safetensors" else path


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_not_an_artifact(path: Path, what: str, workdir: Path) -> None:
    """Refuse (``UsageError``, exit 2) an output ``path`` that would replace stage artifacts of
    ``workdir``: inside its ``calib/``, ``ternary/`` or ``packed/``, or the workdir or a folder holding it."""
    path, workdir = Path(os.path.abspath(path)), Path(os.path.abspath(workdir))
    if _within(workdir, path):
        raise UsageError(f"{what} {path} holds the work directory {workdir}: write it elsewhere")
    for stage in STAGE_ARTIFACTS:
        root = artifact_folder(workdir, stage)
        if _within(path, root):
            raise UsageError(f"{what} {path} is inside {root}, where `{LAYOUT[stage][1]}` keeps its artifact: write it elsewhere")


def check_stage_dirs(workdir: Path, stages) -> None:
    """Refuse (``UsageError``, exit 2) a file where one of ``stages`` keeps its artifacts (``calib/``, ``packed/``...)."""
    for stage in stages:
        folder = artifact_folder(workdir, stage)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"{folder} is a file, where `{LAYOUT[stage][1]}` keeps its artifacts: move it away")


def check_output_file(path: Path, what: str, workdir: Path | None = None) -> None:
    """Refuse (``UsageError``, exit 2) an output file ``path`` that is a directory, an existing special
    file (a device, a pipe: the rename would replace it), a stage artifact of ``workdir``, or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory: give the path of the file to write")
    if path.exists() and not path.is_file():
        raise UsageError(f"{what} {path} is not a regular file (a device or a pipe): give the path of a file to write")
    if workdir is not None:
        check_not_an_artifact(path, what, workdir)
    check_writable_dir(path.parent, f"{what} {path}: the directory")


@contextmanager
def stage_lock(workdir: Path, stage: str):
    """Hold ``<workdir>/.lock-<stage>`` (an advisory ``flock``) while one run writes that stage's artifact.

    A second holder is refused at once with ``BusyError`` (exit 1), naming the run that holds it; the
    lock goes with the process (a killed run leaves no stale lock). The file stays: removing a lock
    file another process has open would let a third lock a new one.
    """
    path = Path(workdir) / f".lock-{stage}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "a process that has not said who it is yet"
            raise BusyError(f"{workdir}: another run is writing its {stage} stage ({holder}); "
                            f"wait for it to finish, or use another --workdir") from None
        os.ftruncate(fd, 0)
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300].replace("\n", " ")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {since}: {command}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
