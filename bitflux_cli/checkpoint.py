"""The bitflux checkpoint: a ternary transformer in one self-describing safetensors file.

Specified in docs/FORMAT.md. Tensors, for every quantized linear ``<m>`` (full module path):
``<m>.codes`` (codec-encoded ternary codes), ``<m>.scale`` [N] fp32 and ``<m>.bias`` [N] if any;
every other transformer tensor under its state-dict name, in the model dtype. Metadata (strings):
``format``, ``format_version``, ``codec``, ``base_model``, ``revision``, ``stage``,
``tool_version``, ``activations``, ``quantized_modules`` (JSON {name: [N, K]}), ``config``
(resolved config, JSON), ``inputs`` (JSON) and ``checksums`` (JSON {tensor: sha256}).
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bitflux_kernels as bk
from bitflux_kernels.layout import base3_bytes, padded_k

from .artifacts import atomic_file
from .errors import ArtifactError

FORMAT = "bitflux.ternary"
FORMAT_VERSION = 1
CODECS = ("int8", "2bit", "base3")  # int8: one code per byte (the quantize stage's output)
TOOL_VERSION = "0.1.0"


def pack(codes: torch.Tensor, codec: str = "2bit") -> torch.Tensor:
    """Ternary codes [N, K] int8 -> the packed tensor of ``codec`` ("2bit", "base3" or "int8")."""
    if codec == "int8":
        return codes.contiguous()
    if codec == "2bit":
        return bk.pack_2bit(codes)
    if codec == "base3":
        return bk.pack_base3(codes)
    raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def unpack(data: torch.Tensor, shape: tuple[int, int], codec: str = "2bit") -> torch.Tensor:
    """Inverse of ``pack``: back to codes of ``shape`` [N, K] int8."""
    n, k = shape
    if codec == "int8":
        return data
    if codec == "2bit":
        return bk.unpack_2bit(data, k)
    return bk.unpack_base3(data, n, k)


def to_runtime_2bit(data: torch.Tensor, codec: str, n: int, k: int) -> torch.Tensor:
    """Stored codes -> the 2-bit runtime layout [N, Kp/4] (no work when already 2-bit)."""
    return data if codec == "2bit" else bk.pack_2bit(unpack(data, (n, k), codec))


def _expected_shape(codec: str, n: int, k: int) -> tuple[int, ...]:
    return {"int8": (n, k), "2bit": (n, padded_k(k) // 4), "base3": (base3_bytes(n, k),)}[codec]


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes."""
    return hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


@dataclass
class Checkpoint:
    """A validated checkpoint: its metadata (JSON fields decoded) and its tensors."""

    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        return {m: tuple(s) for m, s in self.meta["quantized_modules"].items()}

    def codes(self, module: str) -> torch.Tensor:
        """Ternary codes [N, K] int8 of one quantized module."""
        n, k = self.modules[module]
        return unpack(self.tensors[f"{module}.codes"], (n, k), self.meta["codec"])


def save_checkpoint(path: Path, ternary: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    dense: dict[str, torch.Tensor], codec: str, meta: dict) -> int:
    """Write a checkpoint atomically; returns its size in bytes.

    ternary: {module: (codes [N, K] int8, scale [N])}; dense: every other tensor by name
    (biases of quantized modules included); meta: base_model, revision, stage, activations,
    config, inputs.
    """
    tensors = {name: t.detach().contiguous().cpu() for name, t in dense.items()}
    shapes = {}
    for m, (codes, scale) in ternary.items():
        tensors[f"{m}.codes"] = pack(codes.cpu(), codec)
        tensors[f"{m}.scale"] = scale.detach().float().contiguous().cpu()
        shapes[m] = list(codes.shape)
    header = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "codec": codec, "tool_version": TOOL_VERSION,
        "base_model": str(meta["base_model"]), "revision": str(meta.get("revision") or ""),
        "stage": meta["stage"], "activations": meta.get("activations", "none"),
        "quantized_modules": json.dumps(shapes), "config": json.dumps(meta.get("config", {})),
        "inputs": json.dumps(meta.get("inputs", {})),
        "checksums": json.dumps({name: tensor_sha256(t) for name, t in sorted(tensors.items())}),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return Path(path).stat().st_size


def read_metadata(path: Path) -> dict:
    """The checkpoint's metadata, checked for format, version and codec; JSON fields decoded."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:
        raise ArtifactError(f"{path}: not a readable bitflux checkpoint (truncated or not safetensors: {exc})") from None
    if raw.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a bitflux checkpoint (format {raw.get('format')!r}, expected {FORMAT!r})")
    if raw.get("format_version") != str(FORMAT_VERSION):
        raise ArtifactError(f"{path}: format version {raw.get('format_version')!r} is not supported (this bitflux reads {FORMAT_VERSION})")
    if raw.get("codec") not in CODECS:
        raise ArtifactError(f"{path}: unknown codec {raw.get('codec')!r}")
    try:
        return {**raw, **{k: json.loads(raw[k]) for k in ("quantized_modules", "config", "inputs", "checksums")}}
    except (KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: damaged metadata ({exc})") from None


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and validate a checkpoint: metadata, tensor set, checksums and shapes.

    A truncated, edited or inconsistent file raises ``ArtifactError`` naming what is wrong.
    """
    meta = read_metadata(path)
    sums = meta["checksums"]
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if names != set(sums):
            diff = sorted(names ^ set(sums))
            raise ArtifactError(f"{path}: tensor list does not match its checksums ({len(diff)} differ, e.g. {diff[0]})")
        tensors = {}
        for name in sorted(names):
            # own memory, not a view into the file: its alignment would follow the header's length,
            # and CPU matmul kernels round differently at different alignments
            t = f.get_tensor(name).clone()
            if tensor_sha256(t) != sums[name]:
                raise ArtifactError(f"{path}: checksum mismatch in tensor {name}: the file was edited or corrupted")
            tensors[name] = t
    ckpt = Checkpoint(meta, tensors)
    for m, (n, k) in ckpt.modules.items():
        for suffix, shape in (("codes", _expected_shape(meta["codec"], n, k)), ("scale", (n,))):
            t = tensors.get(f"{m}.{suffix}")
            if t is None or tuple(t.shape) != shape:
                raise ArtifactError(f"{path}: {m}.{suffix} is missing or has the wrong shape (expected {list(shape)})")
    return ckpt
