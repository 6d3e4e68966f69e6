"""Reading what a stage wrote, trusting nothing: one-line refusals that name the file and the command
that remakes it.

A stage's artifact is checked where it is read, against what its writer recorded: a JSON manifest
(written last, atomically) listing the sha256 of each file, and in each ``tensorfile`` the
sha256 of each tensor (metadata ``checksums``). A mismatch, a damaged header or a file of the wrong
kind is an ``ArtifactError`` (exit 1); a missing file a ``MissingArtifactError`` (exit 2). Never a
raw ``JSONDecodeError``, ``SafetensorError`` or ``KeyError``.
"""

import json
from pathlib import Path

import torch

from .artifacts import file_sha256
from .errors import ArtifactError, MissingArtifactError
from .tensorfile import CHECKSUMS, TensorFile, tensor_sha256


def remake_hint(command: str) -> str:
    """The end of a refusal: how to make the artifact again."""
    return f"run `{command}` (same --config/--workdir/--set) to remake it"


def require_file(path: Path, command: str) -> Path:
    """``path``, which must be a regular file; a missing one names ``command``."""
    path = Path(path)
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        raise MissingArtifactError(f"{path} {what}: {remake_hint(command)}")
    return path


def read_json(path: Path, command: str) -> dict:
    """A JSON object from ``path`` (a manifest); damaged, not UTF-8 or not an object: ``ArtifactError``."""
    try:
        data = json.loads(require_file(path, command).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ArtifactError(f"{path}: damaged ({why}): {remake_hint(command)}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: damaged (a JSON {type(data).__name__}, not an object): {remake_hint(command)}")
    return data


def check_sha256(path: Path, expected: str, listed_in: Path, command: str) -> None:
    """Refuse ``path`` when its bytes do not hash to ``expected``, the sha256 that ``listed_in`` recorded."""
    if file_sha256(require_file(path, command)) != expected:
        raise ArtifactError(f"{path} does not match the sha256 recorded in {listed_in.name} "
                            f"(damaged or replaced since it was written): {remake_hint(command)}")


class VerifiedFile:
    """A ``tensorfile`` whose tensors are checked against their recorded sha256 as they are read.

    Opening checks the header (``TensorFile``) and that ``checksums`` lists exactly the tensors it holds.
    """

    def __init__(self, path: Path, command: str):
        self.path, self.command = Path(path), command
        try:
            self.file = TensorFile(require_file(self.path, command))
        except ArtifactError as exc:
            raise ArtifactError(f"{exc}: {remake_hint(command)}") from None
        try:
            sums = json.loads(self.file.metadata[CHECKSUMS])
        except (KeyError, ValueError):
            sums = None
        if not isinstance(sums, dict) or sums.keys() != self.file.entries.keys():
            raise ArtifactError(f"{self.path}: its header does not list a sha256 for each tensor it holds "
                                f"(not written by this bitflux, or edited): {remake_hint(command)}")
        self.sums: dict[str, str] = sums
        self.metadata = self.file.metadata

    @property
    def names(self) -> list[str]:
        return sorted(self.file.entries)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, refused when its bytes do not match the recorded sha256."""
        try:
            t = self.file.read(name)
        except OSError as exc:
            raise ArtifactError(f"{self.path}: cannot read tensor {name} ({exc.strerror or exc}): {remake_hint(self.command)}") from None
        except ArtifactError as exc:
            raise ArtifactError(f"{exc}: {remake_hint(self.command)}") from None
        if tensor_sha256(t) != self.sums[name]:
            raise ArtifactError(f"{self.path}: tensor {name} does not match its recorded sha256 "
                                f"(damaged or edited): {remake_hint(self.command)}")
        return t

    def read_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, each verified."""
        return {name: self.read(name) for name in self.names}
