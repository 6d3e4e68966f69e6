"""The bitflux checkpoint: a ternary transformer in one self-describing safetensors file.

Specified in docs/FORMAT.md. Tensors, for every quantized linear ``<m>`` (full module path):
``<m>.codes`` (codec-encoded ternary codes), ``<m>.scale`` [N] fp32 and ``<m>.bias`` [N] if any, and in
files with a low-rank residual (format version 2) ``<m>.residual_up`` [N, r] and ``<m>.residual_down``
[r, K] bf16, and in files with a rotation (format version 3) ``<m>.rotation`` [K] int8; every other transformer tensor under its state-dict name, in the model dtype. Metadata (strings):
``format``, ``format_version``, ``codec``, ``base_model``, ``revision``, ``stage``,
``tool_version``, ``activations``, ``quantized_modules`` (JSON {name: [N, K]}), ``config``
(resolved config, JSON), ``inputs`` (JSON), ``architecture`` (the transformer's constructor
arguments, JSON), ``source`` (the base model's hub id and revision or local path, and the sha256 of
its transformer weight files, JSON), ``checksums`` (JSON {tensor: sha256}), ``residual_rank`` (r, in
files with a residual), ``rotation`` ("hadamard", in version-3 files only) and, in packed files whose ternary checkpoint had one, ``fidelity`` (quantize's
fidelity report, JSON). Written and read one
tensor at a time (``tensorfile``): a FLUX.1-dev checkpoint is never whole in memory.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch

import bitflux_kernels as bk
from bitflux_kernels.layout import MAX_SCALE, base3_bytes, padded_k
from bitflux_kernels.ops import OPS

from .errors import ArtifactError
from .tensorfile import Spec, TensorFile, specs_of, tensor_sha256, write_tensorfile

FORMAT = "bitflux.ternary"
FORMAT_VERSION = 3  # the newest this bitflux reads and writes: 2 adds the residual, 3 the rotation; files without stay 1
RESIDUAL = ("residual_up", "residual_down")  # <m>.residual_up [N, r], <m>.residual_down [r, K], bf16
ROTATION = "rotation"  # <m>.rotation [K] int8 in {-1, +1}: the signs of the input rotation (rotation.py)
ROTATIONS = ("hadamard",)  # the rotation metadata values a version-3 file may hold
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


_CODES_DTYPE = {"int8": torch.int8, "2bit": torch.uint8, "base3": torch.uint8}
_JSON_FIELDS = {"quantized_modules": dict, "config": dict, "inputs": dict, "checksums": dict, "architecture": dict,
                "source": dict, "fidelity": dict}


def save_checkpoint(path: Path, ternary: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    dense: dict[str, torch.Tensor], codec: str, meta: dict) -> int:
    """Write a checkpoint whose tensors are in memory, atomically; returns its size in bytes.

    ternary: {module: (codes [N, K] int8, scale [N])}; dense: every other tensor by name (biases of
    quantized modules included); meta as for ``write_checkpoint``.
    """
    specs = specs_of(dense.items())
    for m, (codes, scale) in ternary.items():
        specs |= ternary_specs(m, codes.shape, codec, lambda c=codes: c, lambda s=scale: s)
    return write_checkpoint(path, {m: list(c.shape) for m, (c, _) in ternary.items()}, specs, codec, meta)


def ternary_specs(module: str, shape: tuple[int, int], codec: str, codes, scale) -> dict[str, Spec]:
    """Specs of one quantized module's ``codes`` (made from int8 codes [N, K] by ``codes()``, encoded
    with ``codec``) and ``scale`` [N] fp32 (``scale()``), for ``write_tensorfile``."""
    n, k = shape
    return {f"{module}.codes": (_CODES_DTYPE[codec], _expected_shape(codec, n, k), lambda: pack(codes().cpu(), codec)),
            f"{module}.scale": (torch.float32, (n,), lambda: scale().detach().float().cpu())}


def format_version(residual_rank: int, rotated: bool = False) -> int:
    """The format version of a file: 1 without a residual or a rotation (unchanged bytes), 2 with a residual,
    3 with a rotation (with or without a residual)."""
    return 3 if rotated else 2 if residual_rank else 1


def is_rotated(modules: dict, specs: dict[str, Spec]) -> bool:
    """Whether ``specs`` hold rotation signs, checked against ``modules`` {m: [N, K]}: every module has
    ``<m>.rotation`` int8 [K], or none has."""
    found = [m for m in modules if f"{m}.{ROTATION}" in specs]
    if not found:
        return False
    for m, (_, k) in modules.items():
        spec = specs.get(f"{m}.{ROTATION}")
        if spec is None or tuple(spec[1]) != (k,) or spec[0] != torch.int8:
            raise ValueError(f"{m}.{ROTATION}: every quantized module needs rotation signs int8 [K], or none")
    return True


def residual_rank(modules: dict, specs: dict[str, Spec]) -> int:
    """The rank r of the residual tensors among ``specs`` (0: none), checked against ``modules`` {m: [N, K]}:
    every module has both, up [N, r] and down [r, K] bf16, or none has any."""
    found = {name for name in specs if name.rpartition(".")[2] in RESIDUAL and name.rpartition(".")[0] in modules}
    if not found:
        return 0
    first = f"{next(iter(modules))}.residual_up"
    rank = specs[first][1][1] if first in specs else 0
    for m, (n, k) in modules.items():
        for leaf, shape in zip(RESIDUAL, ((n, rank), (rank, k))):
            spec = specs.get(f"{m}.{leaf}")
            if rank == 0 or spec is None or tuple(spec[1]) != shape or spec[0] != torch.bfloat16:
                raise ValueError(f"{m}.{leaf}: every quantized module needs residual_up [N, r] and residual_down "
                                 f"[r, K] bf16 of one rank r, or none")
    return rank


def write_checkpoint(path: Path, modules: dict[str, list[int]], specs: dict[str, Spec], codec: str, meta: dict) -> int:
    """Write a checkpoint from tensor specs made one at a time (``tensorfile``); returns its size.

    meta: base_model, revision, stage, activations, config, inputs, and ``architecture`` (the
    transformer's constructor arguments) and ``source`` (provenance of the base model), so the file
    loads without the base model at hand; optionally ``fidelity`` (quantize's report, JSON). The
    residual rank, the rotation and the format version follow from the tensors among ``specs``.
    """
    rank, rotated = residual_rank(modules, specs), is_rotated(modules, specs)
    header = {
        "format": FORMAT, "format_version": str(format_version(rank, rotated)), "codec": codec, "tool_version": TOOL_VERSION,
        "base_model": str(meta["base_model"]), "revision": str(meta.get("revision") or ""),
        "stage": meta["stage"], "activations": meta.get("activations", "none"),
        "quantized_modules": json.dumps(modules, sort_keys=True),
        **{k: json.dumps(meta.get(k, {}), sort_keys=True) for k in ("config", "inputs", "architecture", "source")},
        **({"fidelity": json.dumps(meta["fidelity"], sort_keys=True)} if meta.get("fidelity") else {}),
        **({"residual_rank": str(rank)} if rank else {}),
        **({"rotation": "hadamard"} if rotated else {}),
    }
    return write_tensorfile(path, specs, header)


def read_metadata(path: Path) -> dict:
    """The checkpoint's metadata, checked for format, version, codec and field types; JSON fields decoded."""
    return CheckpointFile(path).meta


def model_dtype(ckpt: "CheckpointFile") -> str:
    """The dtype the checkpoint stores its float tensors besides scales and residuals in (the model's), e.g. "bfloat16"."""
    stored = (".codes", ".scale", f".{ROTATION}", *(f".{r}" for r in RESIDUAL))
    dtypes = [e.dtype for n, e in ckpt.file.entries.items() if not n.endswith(stored)]
    return str(max(set(dtypes), key=dtypes.count)).removeprefix("torch.")


class CheckpointFile:
    """A checkpoint opened for reading one tensor at a time: header and metadata validated up front,
    each tensor checked against its sha256, dtype and shape (and codes and scales against the format)
    when it is read."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = TensorFile(self.path)
        raw = self.file.metadata
        if raw.get("format") != FORMAT:
            raise ArtifactError(f"{path}: not a bitflux checkpoint (format {raw.get('format')!r}, expected {FORMAT!r})")
        if raw.get("format_version") not in [str(v) for v in range(1, FORMAT_VERSION + 1)]:
            raise ArtifactError(f"{path}: format version {raw.get('format_version')!r} is not supported "
                                f"(this bitflux reads 1 to {FORMAT_VERSION})")
        if raw.get("codec") not in CODECS:
            raise ArtifactError(f"{path}: unknown codec {raw.get('codec')!r}")
        meta = dict(raw, activations=raw.get("activations", "none"))
        if meta["activations"] not in OPS:
            raise ArtifactError(f"{path}: unknown activation mode {meta['activations']!r} (expected one of {', '.join(OPS)})")
        for key, kind in _JSON_FIELDS.items():
            try:
                meta[key] = json.loads(raw.get(key, "{}"))
            except json.JSONDecodeError as exc:
                raise ArtifactError(f"{path}: damaged metadata field {key} ({exc})") from None
            if not isinstance(meta[key], kind):
                raise ArtifactError(f"{path}: metadata field {key} is a {type(meta[key]).__name__}, expected a JSON object")
        self.meta, self.codec = meta, meta["codec"]
        try:
            self.modules = {m: (int(n), int(k)) for m, (n, k) in meta["quantized_modules"].items()}
        except (TypeError, ValueError):
            raise ArtifactError(f"{path}: metadata field quantized_modules is not {{module: [N, K]}}") from None
        if not self.modules:
            raise ArtifactError(f"{path}: no quantized modules")
        rank, rotation = raw.get("residual_rank", "0"), raw.get("rotation")
        if rotation is not None and rotation not in ROTATIONS:
            raise ArtifactError(f"{path}: unknown rotation {rotation!r} (this bitflux knows {', '.join(ROTATIONS)})")
        if not (rank.isascii() and rank.isdigit() and str(int(rank)) == rank) \
                or raw["format_version"] != str(format_version(int(rank), rotation is not None)):
            raise ArtifactError(f"{path}: residual_rank {rank!r} with rotation {rotation or 'none'} does not fit format "
                                f"version {raw['format_version']} (version 1: neither; 2: a residual rank > 0; 3: a rotation)")
        self.residual_rank, self.rotated = int(rank), rotation is not None
        sums = meta["checksums"]
        if set(self.file.entries) != set(sums):
            diff = sorted(set(self.file.entries) ^ set(sums))
            raise ArtifactError(f"{path}: tensor list does not match its checksums ({len(diff)} differ, e.g. {diff[0]})")
        r = self.residual_rank
        for m, (n, k) in self.modules.items():
            expected = (("codes", _CODES_DTYPE[self.codec], _expected_shape(self.codec, n, k)),
                        ("scale", torch.float32, (n,)))
            expected += tuple(zip(RESIDUAL, (torch.bfloat16,) * 2, ((n, r), (r, k)))) if r else ()
            expected += ((ROTATION, torch.int8, (k,)),) if self.rotated else ()
            for suffix, dtype, shape in expected:
                e = self.file.entries.get(f"{m}.{suffix}")
                if e is None or e.shape != shape or e.dtype != dtype:
                    raise ArtifactError(f"{path}: {m}.{suffix} is missing or is not {str(dtype).removeprefix('torch.')} "
                                        f"{list(shape)}")

        owned = {f"{m}.{leaf}" for m in self.modules
                 for leaf in ("codes", "scale") + (RESIDUAL if r else ()) + ((ROTATION,) if self.rotated else ())}
        for name, e in self.file.entries.items():
            module, _, leaf = name.rpartition(".")
            if not r and leaf in RESIDUAL and module in self.modules:
                raise ArtifactError(f"{path}: tensor {name} is a residual, but the file records no residual_rank")
            if not self.rotated and leaf == ROTATION and module in self.modules:
                raise ArtifactError(f"{path}: tensor {name} is a rotation, but the file records none")
            if name not in owned and not e.dtype.is_floating_point:  # every other transformer tensor is a float
                raise ArtifactError(f"{path}: tensor {name} is {str(e.dtype).removeprefix('torch.')}, expected a float dtype")

    @property
    def names(self) -> list[str]:
        return sorted(self.file.entries)

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, verified (a scale must be finite and positive; codes must be ternary)."""
        t = self.file.read(name)
        if tensor_sha256(t) != self.meta["checksums"][name]:
            raise ArtifactError(f"{self.path}: checksum mismatch in tensor {name}: the file was edited or corrupted")
        module, _, leaf = name.rpartition(".")
        if module in self.modules and leaf == "scale" and not bool(((t > 0) & (t < MAX_SCALE)).all()):
            raise ArtifactError(f"{self.path}: {name} holds a NaN, infinite, non-positive or >= 2^64 scale")
        if module in self.modules and leaf == "codes" and not _valid_codes(t, self.codec):
            raise ArtifactError(f"{self.path}: {name} holds codes outside {{-1, 0, 1}}")
        if module in self.modules and leaf in RESIDUAL and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{self.path}: {name} holds a NaN or infinite value")
        if module in self.modules and leaf == ROTATION and not bool((t.abs() == 1).all()):
            raise ArtifactError(f"{self.path}: {name} holds a sign other than -1 or +1")
        return t

    def codes(self, module: str) -> torch.Tensor:
        """Ternary codes [N, K] int8 of one quantized module."""
        return unpack(self.read(f"{module}.codes"), self.modules[module], self.codec)


def _valid_codes(t: torch.Tensor, codec: str) -> bool:
    if codec == "int8":
        return bool(((t >= -1) & (t <= 1)).all())  # not abs(): abs(-128) is -128 in int8
    if codec == "2bit":  # four 2-bit fields a byte, each code + 1 in {0, 1, 2}: 3 is not a code
        return not any(bool((((t >> s) & 3) == 3).any()) for s in (0, 2, 4, 6))
    return True  # base3: every byte decodes to five trits in {0, 1, 2}


@dataclass
class Checkpoint:
    """A validated checkpoint read whole: its metadata (JSON fields decoded) and its tensors."""

    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def modules(self) -> dict[str, tuple[int, int]]:
        return {m: tuple(s) for m, s in self.meta["quantized_modules"].items()}

    def codes(self, module: str) -> torch.Tensor:
        """Ternary codes [N, K] int8 of one quantized module."""
        n, k = self.modules[module]
        return unpack(self.tensors[f"{module}.codes"], (n, k), self.meta["codec"])


def read_checkpoint(path: Path) -> Checkpoint:
    """Load and validate a whole checkpoint (small models and tests; stages read ``CheckpointFile``)."""
    f = CheckpointFile(path)
    return Checkpoint(f.meta, {name: f.read(name) for name in f.names})
