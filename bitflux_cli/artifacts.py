"""The work directory: where each stage's artifact lives, and atomic writes."""

import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import MissingArtifactError

# stage -> (artifact path inside the workdir, command that makes it)
LAYOUT = {
    "calibrate": ("calib", "bitflux calibrate"),
    "quantize": ("ternary/transformer.safetensors", "bitflux quantize"),
    "pack": ("packed/transformer.safetensors", "bitflux pack"),
    "generate": ("images", "bitflux generate"),
    "eval": ("eval", "bitflux eval"),
}


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


@contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: Path):
    """Yield a temporary directory beside ``path``; on success it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()
