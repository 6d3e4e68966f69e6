"""Exact tier: the packed layouts' golden bytes and round trips (docs/FORMAT.md)."""

import hashlib
import itertools

import pytest
import torch

from bitflux_cli import pack, unpack
from bitflux_kernels.layout import base3_bytes, packed_2bit_bytes


def pattern(n, k):
    # deterministic codes with every value and no RNG: the golden hashes below depend on it
    return ((torch.arange(n * k) * 7) % 3 - 1).to(torch.int8).view(n, k)


def test_2bit_golden_bitplanes():
    codes = torch.zeros(1, 128, dtype=torch.int8)
    codes[0, 0], codes[0, 32], codes[0, 64], codes[0, 96] = 1, -1, 1, 0
    packed = pack(codes)
    # byte 0 holds weights 0, 32, 64, 96 as code+1 at shifts 0, 2, 4, 6: 2 | 0<<2 | 2<<4 | 1<<6
    assert packed.shape == (1, 32) and packed.dtype == torch.uint8
    assert packed[0, 0].item() == 0b01_10_00_10
    assert packed[0, 1:].tolist() == [0x55] * 31  # all zeros: code+1 = 1 in every field


def test_2bit_pads_k_with_zero_weights():
    packed = pack(torch.ones(2, 5, dtype=torch.int8))
    assert packed.shape == (2, 32)
    assert packed[0, :5].tolist() == [0b01_01_01_10] * 5 and packed[0, 5:].tolist() == [0x55] * 27


def test_golden_hashes():
    codes = pattern(7, 300)
    assert hashlib.sha256(pack(codes).numpy().tobytes()).hexdigest() == \
        "25e1bd37776a8f7a2213d373e8386046c4e260b2b8e8a6e4d02c0b180b6163a2"
    assert hashlib.sha256(pack(codes, "base3").numpy().tobytes()).hexdigest() == \
        "1cc0c88a2c6e6d7845a9ee84deac33c4f9c3f0ddecc9f130c9ca24d3cab310e4"


def test_base3_golden_byte():
    # trits 2,1,0,1,2 -> q = 2*81 + 27 + 3 + 2 = 194 -> ceil(194 * 256 / 243) = 205
    assert pack(torch.tensor([[1, 0, -1, 0, 1]], dtype=torch.int8), "base3").tolist() == [205]


def test_base3_every_trit_group_round_trips():
    allc = torch.tensor(list(itertools.product([-1, 0, 1], repeat=5)), dtype=torch.int8)  # [243, 5]
    assert torch.equal(unpack(pack(allc, "base3"), allc.shape, "base3"), allc)


@pytest.mark.parametrize("codec", ["2bit", "base3", "int8"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (7, 127), (16, 128), (5, 300), (64, 3072)])
def test_round_trip_is_exact(codec, shape):
    codes = torch.randint(-1, 2, shape, dtype=torch.int8)
    assert torch.equal(unpack(pack(codes, codec), shape, codec), codes)


def test_sizes_match_formulas():
    codes = pattern(9, 200)
    assert pack(codes).numel() == packed_2bit_bytes(9, 200) == 9 * 256 // 4
    assert pack(codes, "base3").numel() == base3_bytes(9, 200) == 360


def test_bad_codes_are_refused():
    with pytest.raises(ValueError, match="-1, 0, \\+1"):
        pack(torch.tensor([[2]], dtype=torch.int8))
    with pytest.raises(ValueError, match="int8"):
        pack(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="does not match K"):
        unpack(pack(pattern(2, 130)), (2, 300))


def _golden_checkpoint(path, codec, rank=0, rotated=False):
    """A small checkpoint of fixed tensors and metadata (two modules, one with K padded), rank-``rank`` residual,
    rotation signs when ``rotated``."""
    from bitflux_cli.checkpoint import save_checkpoint

    codes = {"blocks.0.a": pattern(5, 130), "blocks.0.b": pattern(3, 7)}
    ternary = {m: (c, torch.arange(1, c.shape[0] + 1, dtype=torch.float32) / 8) for m, c in codes.items()}
    dense = {"blocks.0.a.bias": torch.arange(5, dtype=torch.bfloat16), "norm.weight": torch.ones(4, dtype=torch.bfloat16)}
    for m, c in codes.items() if rank else ():
        n, k = c.shape
        dense[f"{m}.residual_up"] = (torch.arange(n * rank) % 7 - 3).to(torch.bfloat16).view(n, rank) / 16
        dense[f"{m}.residual_down"] = (torch.arange(rank * k) % 5 - 2).to(torch.bfloat16).view(rank, k) / 32
    for m, c in codes.items() if rotated else ():
        dense[f"{m}.rotation"] = (1 - 2 * (torch.arange(c.shape[1]) % 3 == 1)).to(torch.int8)  # [K]: +1 -1 +1 +1 -1 ...
    save_checkpoint(path, ternary, dense, codec, {"base_model": "golden", "revision": "r", "stage": "pack",
                                                  "config": {"k": 1}, "inputs": {}, "architecture": {}, "source": {}})
    return hashlib.sha256(path.read_bytes()).hexdigest()


# r = 0: the bytes bitflux wrote before the residual existed (computed at 6af8dbe), format version 1;
# r = 2: format version 2 with residual_up/residual_down (docs/FORMAT.md)
GOLDEN_FILES = {
    ("int8", 0): "34c6e92f49aaf1a0612748efe12603e5d55ae43612909bdca41f5242671a079b",
    ("2bit", 0): "3e22c50e73747c3a293ed2b7030052ee2ab9e86d5a99d906dc687dc4f60aa465",
    ("base3", 0): "4cd382e3faa52313ab4da5ff78e0b7c6906f8ba465afd94f248039e025527b86",
    ("2bit", 2): "26b9472495c278e3b03265634b3e84bc60ec010fddc7e2e00224f763230e6247",
    ("base3", 2): "efd342098d6fcb573a68fe2891dc7b2d07a1782ac27906ce92d04543c81bc9e3",
}


@pytest.mark.parametrize("codec, rank", list(GOLDEN_FILES))
def test_golden_checkpoint_files(tmp_path, codec, rank):
    from bitflux_cli.checkpoint import read_metadata

    assert _golden_checkpoint(tmp_path / "g.safetensors", codec, rank) == GOLDEN_FILES[codec, rank]
    meta = read_metadata(tmp_path / "g.safetensors")
    assert meta["format_version"] == ("2" if rank else "1") and meta.get("residual_rank") == (str(rank) if rank else None)


# format version 3: <m>.rotation int8 [K] beside the codes, "rotation": "hadamard" in the header (docs/FORMAT.md)
GOLDEN_ROTATED = {
    ("2bit", 0): "a4541a6bf8ce9ca8be89bf6d84c4be9a6b0aa9a2bea7e94c28efc35aa6e5a508",
    ("2bit", 2): "df083bc2b3af5af8eb38a88a8fe8d276cd8c1836283d93c5e08b940c9418f13b",
}


@pytest.mark.parametrize("codec, rank", list(GOLDEN_ROTATED))
def test_golden_rotated_checkpoint_files(tmp_path, codec, rank):
    from bitflux_cli.checkpoint import CheckpointFile

    assert _golden_checkpoint(tmp_path / "g.safetensors", codec, rank, rotated=True) == GOLDEN_ROTATED[codec, rank]
    ckpt = CheckpointFile(tmp_path / "g.safetensors")
    assert ckpt.meta["format_version"] == "3" and ckpt.meta["rotation"] == "hadamard" and ckpt.rotated
    assert ckpt.residual_rank == rank
    assert ckpt.read("blocks.0.b.rotation").tolist() == [1, -1, 1, 1, -1, 1, 1]
