"""safetensors files read and written one tensor at a time, with plain file I/O.

``safetensors.safe_open`` maps the whole file: every page a reader touches stays resident in the
process for as long as the file is open, so reading a 24 GB checkpoint tensor by tensor would still
count 24 GB. Here a tensor is read with one ``readinto`` into memory it owns, and a file is written
from tensors produced one at a time (``write_tensorfile``), so peak memory is one tensor, whatever
the file's size. The files are ordinary safetensors files (the library reads them).
"""

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import atomic_file
from .errors import ArtifactError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 << 20  # the safetensors library's own limit
CHECKSUMS = "checksums"  # metadata key of write_tensorfile's per-tensor sha256 (JSON)


@dataclass(frozen=True)
class Entry:
    """One tensor of a file: dtype, shape and the byte range of its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class TensorFile:
    """The header of a safetensors file, validated; tensors are read on demand with ``read``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > min(MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} exceeds the file")
                header = json.loads(f.read(n))
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{self.path}: not a readable safetensors file ({exc})") from None
        if not isinstance(header, dict):
            raise ArtifactError(f"{self.path}: damaged safetensors header")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ArtifactError(f"{self.path}: damaged safetensors metadata")
        self.metadata: dict[str, str] = meta
        self.entries: dict[str, Entry] = {}
        base, ends = 8 + n, []
        for name, e in header.items():
            try:
                dtype, shape, (lo, hi) = DTYPES[e["dtype"]], tuple(int(s) for s in e["shape"]), e["data_offsets"]
                assert all(s >= 0 for s in shape) and 0 <= lo <= hi
            except Exception:
                raise ArtifactError(f"{self.path}: damaged header entry for tensor {name}") from None
            numel = 1
            for s in shape:
                numel *= s
            if hi - lo != numel * dtype.itemsize or base + hi > size:
                raise ArtifactError(f"{self.path}: tensor {name} does not match its declared shape and dtype, or the file is truncated")
            self.entries[name] = Entry(dtype, shape, base + lo, base + hi)
            ends.append((lo, hi))
        if sorted(ends) and any(a[1] != b[0] for a, b in zip(sorted(ends), sorted(ends)[1:])):
            raise ArtifactError(f"{self.path}: overlapping or non-contiguous tensor data")

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in memory of its own (not a view of the file)."""
        e = self.entries[name]
        buf = torch.empty(e.end - e.start, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            f.seek(e.start)
            if f.readinto(memoryview(buf.numpy())) != e.end - e.start:
                raise ArtifactError(f"{self.path}: truncated while reading {name}")
        return buf.view(e.dtype).reshape(e.shape)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes."""
    return hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


Spec = tuple[torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write_tensorfile(path: Path, specs: dict[str, Spec], metadata: dict[str, str]) -> int:
    """Write a safetensors file atomically from {name: (dtype, shape, make)}; returns its size.

    ``make()`` is called once per tensor, in name order, and its result dropped after writing: the
    file is never whole in memory. Metadata gets ``checksums`` (JSON {name: sha256}); the header is
    written first with placeholders of the same length and rewritten at the end, so one pass does.
    Keys and tensors are sorted: the same tensors and metadata give the same bytes.
    """
    names = sorted(specs)
    layout, offset = {}, 0
    for name in names:
        dtype, shape, _ = specs[name]
        numel = 1
        for s in shape:
            numel *= int(s)
        layout[name] = {"dtype": NAMES[dtype], "shape": [int(s) for s in shape], "data_offsets": [offset, offset + numel * dtype.itemsize]}
        offset += numel * dtype.itemsize

    def header(sums: dict[str, str]) -> bytes:
        meta = dict(metadata) | {CHECKSUMS: json.dumps(sums, sort_keys=True)}
        raw = json.dumps({"__metadata__": dict(sorted(meta.items()))} | layout, separators=(",", ":")).encode()
        return raw + b" " * (-len(raw) % 8)

    sums = dict.fromkeys(names, "0" * 64)
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            first = header(sums)
            f.write(struct.pack("<Q", len(first)) + first)
            for name in names:
                dtype, shape, make = specs[name]
                t = make().detach().contiguous().cpu()
                if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                    raise ValueError(f"{name}: made {t.dtype} {list(t.shape)}, declared {dtype} {list(shape)}")
                data = t.view(-1).view(torch.uint8).numpy()
                sums[name] = hashlib.sha256(data).hexdigest()
                f.write(data.tobytes() if not data.flags.c_contiguous else data)
            f.seek(8)
            f.write(header(sums))  # same length: every sha256 is 64 hex digits
            f.flush()
            os.fsync(f.fileno())
    return Path(path).stat().st_size


def specs_of(tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, Spec]:
    """Specs for tensors already in memory."""
    return {name: (t.dtype, tuple(t.shape), lambda t=t: t) for name, t in tensors}


STATE = "bitflux.state"  # metadata key of write_state's scalars (JSON)


def write_state(path: Path, tensors: dict[str, torch.Tensor], scalars: dict) -> None:
    """Resume state without pickle, atomically: ``tensors`` and, in the header, ``scalars`` (JSON:
    step, fingerprint, settings) and each tensor's sha256."""
    write_tensorfile(path, specs_of(tensors.items()), {STATE: json.dumps(scalars, sort_keys=True)})


def read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, scalars) of a ``write_state`` file; anything else, or a tensor whose bytes do not
    match its recorded sha256, is refused with one line naming the file (``ArtifactError``)."""
    def damaged(why: str) -> ArtifactError:
        return ArtifactError(f"{path}: {why}; delete it to start over")

    try:
        f = TensorFile(path)
    except ArtifactError as exc:
        raise damaged(f"not a readable safetensors state file ({str(exc).removeprefix(f'{path}: ')})") from None
    try:
        scalars, sums = json.loads(f.metadata[STATE]), json.loads(f.metadata[CHECKSUMS])
    except (KeyError, ValueError):
        raise damaged("no bitflux state in its header") from None
    if not isinstance(scalars, dict) or not isinstance(sums, dict) or sums.keys() != f.entries.keys():
        raise damaged("its header does not list the tensors it holds")
    tensors = {}
    for name in f.entries:
        tensors[name] = f.read(name)
        if tensor_sha256(tensors[name]) != sums[name]:
            raise damaged(f"tensor {name} does not match its recorded sha256")
    return tensors, scalars
