"""The checkpoint container: validation on load, meta-device loading, corruption refused."""

import json
import shutil

import pytest
import torch
from torch import nn

from bitflux_cli import TernaryLinear, load_quantized_transformer
from bitflux_cli.checkpoint import read_checkpoint, read_metadata
from bitflux_cli.errors import ArtifactError


@pytest.fixture
def packed(tiny_chain, tmp_path):
    path = tmp_path / "transformer.safetensors"
    shutil.copy(tiny_chain["pack"]["path"], path)
    return path


def test_metadata_describes_the_artifact(packed):
    meta = read_metadata(packed)
    assert meta["format"] == "bitflux.ternary" and meta["format_version"] == "1" and meta["codec"] == "2bit"
    assert meta["stage"] == "pack" and meta["base_model"].startswith("embedded:")
    assert meta["config"]["model"]["source"] == "embedded" and len(meta["quantized_modules"]) == 52
    assert meta["inputs"]["ternary"]["sha256"]


def test_loader_builds_on_meta_and_assigns_packed_buffers(packed, monkeypatch):
    created = []
    monkeypatch.setattr(nn.Linear, "reset_parameters", lambda self: created.append(self.weight.device.type))
    t = load_quantized_transformer(packed)
    assert created and set(created) == {"meta"}  # no FP linear was ever materialised
    q = [m for m in t.modules() if isinstance(m, TernaryLinear)]
    assert len(q) == 52 and all(m.packed.dtype == torch.uint8 and m.packed.device.type == "cpu" for m in q)
    assert not any(p.is_meta for p in t.parameters()) and not any(b.is_meta for b in t.buffers())


def test_truncated_file_is_refused(packed):
    data = packed.read_bytes()
    packed.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated"):
        read_checkpoint(packed)


def test_edited_byte_is_refused_by_checksum(packed):
    data = bytearray(packed.read_bytes())
    data[-10] ^= 0xFF  # inside the last tensor's bytes
    packed.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        read_checkpoint(packed)


def _rewrite_metadata(path, **changes):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(changes)
    save_file(load_file(str(path)), str(path), metadata=meta)


def test_other_format_version_is_refused(packed):
    _rewrite_metadata(packed, format_version="99")
    with pytest.raises(ArtifactError, match="format version"):
        read_checkpoint(packed)


def test_mismatched_architecture_is_refused(packed):
    meta = read_metadata(packed)
    modules = meta["quantized_modules"]
    modules["transformer_blocks.0.attn.to_q"] = [999, 128]
    _rewrite_metadata(packed, quantized_modules=json.dumps(modules))
    with pytest.raises(ArtifactError):
        load_quantized_transformer(packed)
