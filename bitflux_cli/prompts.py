"""Calibration prompt sets: PartiPrompts, T2I-CompBench, GenEval, and user files.

Known sets (``SETS``):

- ``parti``: the 1,632 PartiPrompts (column 0 of ``parti/PartiPrompts.tsv``, header skipped);
- ``t2i_compbench_train`` / ``t2i_compbench_val``: the 8 ``t2i_compbench/<category>_<split>.txt``;
- ``geneval``: ``geneval/generation_prompts.txt`` (553 prompts);
- ``paper``: ``parti`` + ``t2i_compbench_train``, the 7,232 calibration prompts of "1.58-bit FLUX"
  (7,190 distinct);
- ``mini``: the miniature world's training captions (the embedded model's language), 64 per
  GenEval category, each category's distinct captions cycled: 384 prompts, 91 distinct. Generated
  in code; never a held-out (evaluation) caption.

Any other name that is the path of an existing text file is read as one prompt per line (UTF-8, a
BOM allowed, any line ending). A name that is neither, a directory, a file that is not UTF-8 text or
holds a NUL byte, and a selection with no prompt at all are refused with one line
(``PromptSetError``, a usage error: exit 2).

Files come from ``data_dir`` (laid out like ``shared/data``) when given; otherwise from the cache
(``$BITFLUX_CACHE``, default ``~/.cache/bitflux/prompts``), downloaded once from the raw GitHub URL
at the pinned commit. Every pinned file is checked against its sha256 in ``FILES`` before use;
``FILES`` also pins ``geneval/evaluation_metadata.jsonl``, which ``eval_suites`` reads with ``read_pinned``.

Registering a set: ``SETS[name] = loader``, where ``loader(data_dir)`` returns
``{file label: [raw prompt, ...]}``, in order. ``load_prompts`` strips each prompt, skips and counts
the empty ones, counts duplicates, and takes care of ``dedupe`` and ``limit``.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import BitfluxError, UsageError
from .miniworld.world import balanced_prompts

_PARTI = "https://raw.githubusercontent.com/google-research/parti/5a657978134374ce28973948331b319adef164bd/"
_T2I = "https://raw.githubusercontent.com/Karine-Huang/T2I-CompBench/1b7094991a57f3c22abdd4f6e8ba6c1a15517073/examples/dataset/"
_GENEVAL = "https://raw.githubusercontent.com/djghosh13/geneval/af4902f24d3ca90ebbb446dd9891a59e0f82725f/prompts/"

T2I_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex", "3d_spatial", "numeracy")

_T2I_SHA256 = {
    "color_train": "db5d3287027d453f8c977f0c7315f8a01a770f02f61fa54ae19406762982393f",
    "color_val": "1634259756dbc77d13093d907d414480080ec9790a8c97ad09efaea7b2534f2d",
    "shape_train": "451bdfccd330d4cf979d45664817be7959e89250b93d5c591cc562b858175a87",
    "shape_val": "37e1a276906c7ea9516cbd7ac8501be896006c0c17ca7344f260562834455bae",
    "texture_train": "4846315c5972f9e9cc82e4833099e8ec2c28b999ca77269512715f3f56bde54f",
    "texture_val": "fbb5363515b4a28009e360afaaaf389d2dd2289e50dbb0c6ef4ea0c7fe4f3d4f",
    "spatial_train": "af14cdf2320057d98f94077e6211c2ddfaabfbb9e3842873657baabb17e00de6",
    "spatial_val": "8707a1d7e42ce3002d95363cf55f74bd043c843ae27108f5125aaaa7840ca988",
    "non_spatial_train": "dbac5a9ec83204dcd0c3538a12d3212e2ce66db6f7ba45b49a1d869b2d3f2430",
    "non_spatial_val": "04c56cc9ac441dc9ea6c5157652058bd1635b5308526dd31bb29a1caab9a758d",
    "complex_train": "d214ac45cb3c5307dd14a144c8c69aa5ffdcc7be74ff71b5dac989f8ca9f924b",
    "complex_val": "1b808018b8d9916db3d47d5aa2ef18377a3549a56901a474156f799824cdf3b4",
    "3d_spatial_train": "0bba7e9ad31b0ce7908f6cbf2426a4b7ef6e8b841c1b737d0ad2d5b8e688dd93",
    "3d_spatial_val": "c9953597315f36a5fcb41291bb19bdc6ab5f64a0fa760d691b4854a73f5d1fe9",
    "numeracy_train": "f66bb8708cb0be23c0406e14d892b25661b2b71e3e72abddc79c38466ab629c6",
    "numeracy_val": "dad8df141604b70ba7554bec724e3db0a80023680769b5c514854ea2d2527bbe",
}

# Path relative to the data dir -> (source URL at the pinned commit, sha256), from shared/data/README.md.
FILES: dict[str, tuple[str, str]] = {
    "parti/PartiPrompts.tsv": (_PARTI + "PartiPrompts.tsv", "fab29e41bb512a169b56acab4cf2a41dcb675e285df2efcde6640c7dd3c440eb"),
    "geneval/generation_prompts.txt": (_GENEVAL + "generation_prompts.txt", "55b6e3650e980c13daf30569eb666e000faf19bfc2b7b4cbe999fcdb7aa9d680"),
    "geneval/evaluation_metadata.jsonl": (_GENEVAL + "evaluation_metadata.jsonl", "5c48e0813e812e3c373fa5c8ed07a8f0a483be30272b4427b0559c8048e67c13"),
    **{f"t2i_compbench/{stem}.txt": (_T2I + f"{stem}.txt", sha) for stem, sha in _T2I_SHA256.items()},
}


Loader = Callable[[Path | None], dict[str, list[str]]]


class PromptDataError(BitfluxError):
    """A prompt file is missing, cannot be fetched, or does not match its pinned sha256."""


class PromptSetError(UsageError, ValueError):
    """A prompt set named wrongly: unknown, a directory, not UTF-8 text, or holding no prompts (exit 2)."""


@dataclass
class PromptSet:
    """Prompts in load order, their counts, and the sha256 of the list (for artifact manifests).

    ``counts``: ``sets`` and ``files`` (non-empty prompts read per set / per file), ``total`` (all
    of them), ``distinct``, ``duplicates`` (``total - distinct``), ``empty_lines`` (skipped) and
    ``selected`` (``len(prompts)``, after ``dedupe`` and ``limit``). ``sha256`` is that of the
    UTF-8 text with one prompt a line, each ending in ``\\n``.
    """

    prompts: list[str]
    counts: dict
    sha256: str


def cache_dir() -> Path:
    """Where downloaded prompt files live: ``$BITFLUX_CACHE`` or ``~/.cache/bitflux/prompts``."""
    return Path(os.environ.get("BITFLUX_CACHE") or Path.home() / ".cache" / "bitflux" / "prompts")


def _fetch(url: str) -> bytes:
    """The bytes at ``url`` (https, or file:// in tests)."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def _check(data: bytes, expected: str, name: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise PromptDataError(f"sha256 mismatch for {name}: expected {expected}, got {actual}")


def _download(rel: str, dest: Path) -> None:
    """Fetch a pinned file, check its sha256, and write it to ``dest`` atomically."""
    url, sha = FILES[rel]
    try:
        data = _fetch(url)
    except OSError as exc:  # URLError included
        raise PromptDataError(
            f"no local copy of {rel} and download of {url} failed ({exc}); put the file at {dest} "
            f"or set calibration.prompts.data_dir to a directory laid out like shared/data"
        ) from None
    _check(data, sha, f"{rel} downloaded from {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_pinned(rel: str, data_dir: Path | None) -> list[str]:
    """Lines of the pinned file ``rel`` (a key of ``FILES``) from ``data_dir``, or from the cache (downloading
    it once), checked against its sha256; any line ending, a missing final newline allowed."""
    if data_dir is not None:
        path = Path(data_dir) / rel
        if not path.is_file():
            raise PromptDataError(f"{rel} not found in data_dir {data_dir} (expected at {path})")
    else:
        path = cache_dir() / rel
        if not path.is_file():
            _download(rel, path)
    data = path.read_bytes()
    _check(data, FILES[rel][1], str(path))
    return data.decode("utf-8").splitlines()


def _parti(data_dir: Path | None) -> dict[str, list[str]]:
    # Split on tabs by hand: csv would eat the quotes of the prompt that starts with '"'.
    lines = read_pinned("parti/PartiPrompts.tsv", data_dir)
    return {"parti/PartiPrompts.tsv": [line.split("\t")[0] for line in lines[1:]]}


def _t2i(split: str) -> Loader:
    def load(data_dir: Path | None) -> dict[str, list[str]]:
        rels = [f"t2i_compbench/{cat}_{split}.txt" for cat in T2I_CATEGORIES]
        return {rel: read_pinned(rel, data_dir) for rel in rels}

    return load


def _geneval(data_dir: Path | None) -> dict[str, list[str]]:
    rel = "geneval/generation_prompts.txt"
    return {rel: read_pinned(rel, data_dir)}


def _paper(data_dir: Path | None) -> dict[str, list[str]]:
    return {**_parti(data_dir), **_t2i("train")(data_dir)}


def _mini(_data_dir: Path | None) -> dict[str, list[str]]:
    return {"miniworld:train": [s.caption for s in balanced_prompts("train", seed=0, per_category=64)]}


# Set name -> loader(data_dir) returning {file label: raw prompts}. Register new sets here (see the
# module docstring).
SETS: dict[str, Loader] = {
    "parti": _parti,
    "t2i_compbench_train": _t2i("train"),
    "t2i_compbench_val": _t2i("val"),
    "geneval": _geneval,
    "paper": _paper,
    "mini": _mini,
}


def _user_file(name: str) -> dict[str, list[str]]:
    """The lines of the user's prompt file ``name``; anything but a readable UTF-8 text file is refused."""
    path = Path(name).expanduser()
    if path.is_dir():
        raise PromptSetError(f"prompt set {name!r} is a directory: give a text file with one prompt a line, or a known set ({', '.join(sorted(SETS))})")
    if path.exists() and not path.is_file():  # a FIFO or a device (/dev/zero) would block or never end
        raise PromptSetError(f"prompt set {name!r} is not a regular file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PromptSetError(f"prompt file {name!r} cannot be read ({exc.strerror or type(exc).__name__})") from None
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0  # users' own files may start with a BOM
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        at = bom + exc.start
        raise PromptSetError(f"prompt file {name!r} is not UTF-8 text (byte 0x{data[at]:02x} at offset {at}): "
                             f"save it as UTF-8, one prompt a line") from None
    if "\0" in text:
        raise PromptSetError(f"prompt file {name!r} holds a NUL byte (offset {data.index(0)}): a binary file, not prompts")
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise PromptSetError(f"prompt file {name!r} holds no prompts ({len(lines)} empty lines)")
    return {str(path): lines}


def load_prompts(
    sets: list[str],
    data_dir: Path | None = None,
    limit: int | None = None,
    seed: int = 0,
    dedupe: bool = False,
) -> PromptSet:
    """Load and concatenate the prompt ``sets``, in order.

    Each name is a key of ``SETS`` or the path of a text file with one prompt a line. Prompts are
    stripped; empty lines are skipped and counted. ``dedupe`` keeps the first occurrence of each
    prompt (off by default: the paper calibrates on all 7,232). ``limit`` keeps a random subset of
    that size drawn with ``seed``, in the original order. Raises ``PromptSetError`` (a ``UsageError``
    and a ``ValueError``) for an unknown set name, a user file that is not UTF-8 text with prompts,
    a bad ``limit`` or no prompts at all; ``PromptDataError`` for a missing, unfetchable or altered
    pinned file.
    """
    if limit is not None and limit < 1:
        raise PromptSetError(f"limit must be a positive number of prompts, got {limit}")
    if not sets:
        raise PromptSetError(f"no prompt sets given: name one of {sorted(SETS)}, or the path of a text file")
    per_set: dict[str, int] = {}
    per_file: dict[str, int] = {}
    prompts: list[str] = []
    empty = 0
    for name in sets:
        if name in SETS:
            files = SETS[name](data_dir)
        elif Path(name).expanduser().exists():
            files = _user_file(name)
        else:
            raise PromptSetError(f"unknown prompt set {name!r}, and no such file: known sets are {sorted(SETS)}, "
                                 f"or give the path of a text file")
        for label, raw in files.items():
            kept = [p.strip() for p in raw if p.strip()]
            empty += len(raw) - len(kept)
            per_file[label] = per_file.get(label, 0) + len(kept)
            per_set[name] = per_set.get(name, 0) + len(kept)
            prompts.extend(kept)
    total, distinct = len(prompts), len(set(prompts))
    if not total:
        raise PromptSetError(f"prompt sets {sets} hold no prompts")
    if dedupe:
        prompts = list(dict.fromkeys(prompts))
    if limit is not None and limit < len(prompts):
        keep = sorted(random.Random(seed).sample(range(len(prompts)), limit))
        prompts = [prompts[i] for i in keep]
    counts = {
        "sets": per_set,
        "files": per_file,
        "total": total,
        "distinct": distinct,
        "duplicates": total - distinct,
        "empty_lines": empty,
        "selected": len(prompts),
    }
    digest = hashlib.sha256("".join(p + "\n" for p in prompts).encode("utf-8")).hexdigest()
    return PromptSet(prompts=prompts, counts=counts, sha256=digest)
