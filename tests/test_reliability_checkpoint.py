"""Edited checkpoints, as a hostile or unlucky user makes them: refused in one line naming the file,
even when the per-tensor checksums were recomputed to match the edit.

The ternary (int8) and packed (2-bit) files of the shared tiny chain are edited at the byte level
(header JSON or tensor data); the reader (``CheckpointFile``, what pack, generate and eval use), the
loader (``load_quantized_transformer``, generate and eval) and ``pack`` must refuse. Property-based:
random edits of header values end in a refusal or in the very same tensors, never another exception.
"""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitflux_cli.checkpoint import read_checkpoint
from bitflux_cli.config import load_config
from bitflux_cli.errors import ArtifactError
from bitflux_cli.loader import load_quantized_transformer
from bitflux_cli.packing import pack

M = "transformer_blocks.0.attn.to_q"  # a quantized module of the tiny model
PROFILE_EXAMPLES = 1600 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 60


def parse(path: Path) -> tuple[dict, bytearray]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), bytearray(raw[8 + n:])


def write(path: Path, header: dict, data: bytes, fix_checksums: bool = False) -> None:
    """A safetensors file from ``header`` and ``data``; ``fix_checksums``: the metadata's per-tensor
    sha256 recomputed from the (edited) data, as an attacker who read the format would."""
    if fix_checksums:
        sums = {}
        for name, e in header.items():
            try:
                lo, hi = e["data_offsets"]
                sums[name] = hashlib.sha256(bytes(data[int(lo):int(hi)])).hexdigest()
            except (KeyError, TypeError, ValueError):  # metadata, or offsets the edit made meaningless: left as recorded
                pass
        recorded = json.loads(header["__metadata__"].get("checksums", "{}"))
        header["__metadata__"]["checksums"] = json.dumps(recorded | sums, sort_keys=True)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(data))


def set_scale(header, data, value):
    lo, _ = header[f"{M}.scale"]["data_offsets"]
    data[lo:lo + 4] = torch.tensor([value], dtype=torch.float32).view(torch.uint8).numpy().tobytes()


def set_first_code_byte(header, data, value):
    lo, _ = header[f"{M}.codes"]["data_offsets"]
    data[lo] = value


def relabel(name, dtype, shape=None):
    def edit(header, _data):
        header[name]["dtype"] = dtype
        if shape is not None:
            header[name]["shape"] = shape
    return edit


def meta(key, value):
    def edit(header, _data):
        header["__metadata__"][key] = value
    return edit


def drop(name):
    def edit(header, _data):
        del header[name]  # its bytes stay: the data no longer match the header's offsets
    return edit


# (name, file, edit(header, data), recompute checksums, what the refusal says)
CASES = [
    ("scale F32 relabelled I32", "packed", relabel(f"{M}.scale", "I32"), False, "is missing or is not float32"),
    ("scale F32 relabelled BF16 x2", "packed", lambda h, d: relabel(f"{M}.scale", "BF16", [h[f"{M}.scale"]["shape"][0] * 2])(h, d),
     False, "is missing or is not float32"),
    ("codes U8 relabelled I8", "packed", relabel(f"{M}.codes", "I8"), False, "is missing or is not uint8"),
    ("codes I8 relabelled U8", "ternary", relabel(f"{M}.codes", "U8"), False, "is missing or is not int8"),
    ("NaN scale", "packed", lambda h, d: set_scale(h, d, float("nan")), True, "NaN, infinite, non-positive or >= 2^64 scale"),
    ("inf scale", "packed", lambda h, d: set_scale(h, d, float("inf")), True, "NaN, infinite, non-positive or >= 2^64 scale"),
    ("zero scale", "ternary", lambda h, d: set_scale(h, d, 0.0), True, "NaN, infinite, non-positive or >= 2^64 scale"),
    ("negative scale", "ternary", lambda h, d: set_scale(h, d, -1.0), True, "NaN, infinite, non-positive or >= 2^64 scale"),
    ("huge scale", "packed", lambda h, d: set_scale(h, d, 2.0 ** 64), True, "NaN, infinite, non-positive or >= 2^64 scale"),
    ("2-bit code 3", "packed", lambda h, d: set_first_code_byte(h, d, 0xFF), True, "codes outside {-1, 0, 1}"),
    ("int8 code 2", "ternary", lambda h, d: set_first_code_byte(h, d, 2), True, "codes outside {-1, 0, 1}"),
    pytest.param("int8 code -128", "ternary", lambda h, d: set_first_code_byte(h, d, 0x80), True, "codes outside {-1, 0, 1}",
                 id="int8 code -128"),
    ("data byte flipped", "packed", lambda h, d: d.__setitem__(-10, d[-10] ^ 0xFF), False, "checksum mismatch"),
    ("quantized_modules a list", "packed", meta("quantized_modules", "[]"), False, "quantized_modules is a list"),
    ("quantized_modules empty", "ternary", meta("quantized_modules", "{}"), False, "no quantized modules"),
    ("quantized_modules bad shape", "ternary", meta("quantized_modules", json.dumps({M: "x"})), False, "quantized_modules is not"),
    ("checksums not JSON", "packed", meta("checksums", "{"), False, "damaged metadata field checksums"),
    ("inputs a string", "packed", meta("inputs", '"x"'), False, "inputs is a str"),
    ("metadata value not a string", "packed", meta("codec", 2), False, "damaged safetensors metadata"),
    ("format version 4", "packed", meta("format_version", "4"), False, "format version '4' is not supported"),
    ("format version 3 without a rotation", "packed", meta("format_version", "3"), False, "does not fit format version 3"),
    ("rotation unknown", "packed", meta("rotation", "haar"), False, "unknown rotation 'haar'"),
    ("rotation in a version-1 file", "packed", meta("rotation", "hadamard"), False, "does not fit format version 1"),
    ("format version 2 without a residual", "packed", meta("format_version", "2"), False, "does not fit format version 2"),
    ("codec unknown", "packed", meta("codec", "4bit"), False, "unknown codec"),
    ("activation mode unknown", "packed", meta("activations", "int4"), False, "unknown activation mode 'int4'"),
    ("dense tensor removed", "ternary", drop("x_embedder.weight"), False, "x_embedder.weight"),
    ("codes tensor removed", "ternary", drop(f"{M}.codes"), False, ""),
    ("header length past the end", "packed", None, False, "header length"),
]


@pytest.fixture(scope="module")
def files(tiny_chain):
    return {"packed": Path(tiny_chain["pack"]["path"]), "ternary": Path(tiny_chain["quantize"]["path"])}


def edited(files, tmp_path, name, kind, edit, fix) -> Path:
    path = tmp_path / f"{kind}.safetensors"
    header, data = parse(files[kind])
    if edit is None:  # the 8-byte header length made larger than the file
        raw = files[kind].read_bytes()
        path.write_bytes((len(raw) * 2).to_bytes(8, "little") + raw[8:])
        return path
    edit(header, data)
    write(path, header, data, fix)
    return path


def one_line(exc: BaseException, path: Path) -> str:
    msg = str(exc)
    assert str(path) in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("name, kind, edit, fix, expected",
                         [c if hasattr(c, "marks") else pytest.param(*c, id=c[0]) for c in CASES])
def test_edited_checkpoint_is_refused(files, tmp_path, name, kind, edit, fix, expected):
    path = edited(files, tmp_path, name, kind, edit, fix)
    # the reader (every stage's) and the loader (generate, eval): refused naming the file
    for read in (read_checkpoint, load_quantized_transformer):
        with pytest.raises(ArtifactError) as info:
            read(path)
        assert expected in one_line(info.value, path), (read.__name__, info.value)
    if kind == "ternary":  # pack must not turn it into a packed file
        workdir = tmp_path / "wd"
        (workdir / "ternary").mkdir(parents=True)
        shutil.copy(path, workdir / "ternary/transformer.safetensors")
        with pytest.raises(ArtifactError) as info:
            pack(load_config("tiny", {"workdir": str(workdir)}))
        one_line(info.value, workdir / "ternary/transformer.safetensors")
        assert not (workdir / "packed/transformer.safetensors").exists()


def rewritten(files, tmp_path, change: str) -> Path:
    """The ternary file written again by bitflux's own writer (checksums valid) with one dense tensor
    reshaped, removed, or one tensor added."""
    from bitflux_cli.tensorfile import TensorFile, specs_of, write_tensorfile
    f = TensorFile(files["ternary"])
    tensors = {n: f.read(n) for n in f.entries}
    w = tensors["x_embedder.weight"]  # [128, 64]
    if change == "reshaped":
        tensors["x_embedder.weight"] = w.t().contiguous()
    elif change == "removed":
        del tensors["x_embedder.weight"]
    else:
        tensors["extra.weight"] = torch.ones(4)
    path = tmp_path / "wd/ternary/transformer.safetensors"
    write_tensorfile(path, specs_of(tensors.items()), {k: v for k, v in f.metadata.items() if k != "checksums"})
    return path


@pytest.mark.parametrize("change", ["reshaped", "removed", "added"])
def test_loader_refuses_dense_tensors_that_do_not_fit(files, tmp_path, change):
    path = rewritten(files, tmp_path, change)
    with pytest.raises(ArtifactError) as info:
        load_quantized_transformer(path)
    one_line(info.value, path)


@pytest.mark.parametrize("change", ["reshaped", "removed", "added"])
def test_pack_refuses_dense_tensors_that_do_not_fit(files, tmp_path, change):
    path = rewritten(files, tmp_path, change)
    with pytest.raises(ArtifactError):
        pack(load_config("tiny", {"workdir": str(tmp_path / "wd")}))
    assert not (tmp_path / "wd/packed/transformer.safetensors").exists()


def architecture(**changes):
    def edit(header, _data):
        arch = json.loads(header["__metadata__"]["architecture"])
        header["__metadata__"]["architecture"] = json.dumps(arch | changes)
    return edit


def packed_reshaped(header, data):  # x_embedder.weight [128, 64] relabelled [64, 128]: same bytes, checksum still true
    header["x_embedder.weight"]["shape"] = header["x_embedder.weight"]["shape"][::-1]


@pytest.mark.parametrize("fmt", ["bfl", "diffusers"])
@pytest.mark.parametrize("edit, expected", [
    (architecture(num_attention_heads=-1), "does not build a FLUX transformer"),
    (architecture(num_layers=100), "do not match the recorded architecture"),
    (packed_reshaped, "x_embedder.weight does not fit the recorded architecture"),
], ids=["negative heads", "100 layers", "dense tensor reshaped"])
def test_export_refuses_a_packed_file_its_architecture_does_not_describe(files, tmp_path, fmt, edit, expected):
    from bitflux_cli.export import export

    workdir = tmp_path / "wd"
    (workdir / "packed").mkdir(parents=True)
    path = edited(files, tmp_path, "", "packed", edit, False).rename(workdir / "packed/transformer.safetensors")
    with pytest.raises(ArtifactError) as info:
        export(load_config("tiny", {"workdir": str(workdir)}), fmt, tmp_path / "out")
    assert expected in one_line(info.value, path)
    assert not (tmp_path / "out").exists()


SCRATCH = Path(tempfile.mkdtemp(prefix="bitflux-ckpt-fuzz-"))
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=5)


@settings(max_examples=PROFILE_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_header_edits_end_in_the_same_tensors_or_a_refusal(files, data):
    """Any header value (a tensor's dtype, shape or offsets; a metadata field) replaced by random JSON,
    with or without the checksums recomputed: the reader refuses in one line, or reads tensors
    identical to the original file's (the edit touched nothing read), never another exception."""
    kind = data.draw(st.sampled_from(["packed", "ternary"]))
    header, raw = parse(files[kind])
    original = read_checkpoint(files[kind]).tensors
    key = data.draw(st.sampled_from(sorted(header)))
    if key == "__metadata__":
        field = data.draw(st.sampled_from(sorted(header[key])))
        header[key][field] = data.draw(st.one_of(json_values.map(json.dumps), st.text(max_size=20), json_values))
    else:
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[key][field] = data.draw(st.one_of(json_values, st.sampled_from(["F32", "BF16", "I8", "U8", "I32", "F64"]),
                                                 st.lists(st.integers(-1, 300_000), max_size=3)))
    path = SCRATCH / f"{kind}.safetensors"
    write(path, header, raw, data.draw(st.booleans()))
    try:
        ckpt = read_checkpoint(path)
    except ArtifactError as exc:
        one_line(exc, path)
        return
    assert ckpt.tensors.keys() == original.keys()
    for name, t in ckpt.tensors.items():
        assert t.dtype == original[name].dtype and torch.equal(t, original[name]), name
