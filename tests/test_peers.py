"""benchmarks/peers.py without the peer libraries: its bits-per-weight accounting and its quantization scope."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bitflux_cli.config import load_config
from bitflux_cli.models import build_meta_transformer
from bitflux_cli.ternary import scoped_linears

_spec = importlib.util.spec_from_file_location("peers", Path(__file__).parent.parent / "benchmarks" / "peers.py")
peers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(peers)


@pytest.fixture
def transformer():
    return build_meta_transformer(load_config("tiny").model)


def test_bits_per_weight_counts_codes_scales_and_zeros_at_16_bits():
    n, k = 128, 128
    groups = torch.ones(n, k // 64)
    assert peers.bits_per_weight([peers.storage(n * k, 2, groups, groups)]) == 2.5  # affine, group 64
    assert peers.bits_per_weight([peers.storage(n * k, 2, groups, torch.zeros_like(groups))]) == 2.25  # symmetric
    assert peers.bits_per_weight([peers.storage(n * k, 4, groups, groups)]) == 4.5
    row = [peers.Storage(n * k, 2, n, 0)]  # bitflux: one scale a row
    assert peers.bits_per_weight(row) == 2.125 and peers.bits_per_weight(row, 32) == 2.25
    # weighted by weights, not averaged over layers
    mixed = [peers.Storage(100, 2, 0, 0), peers.Storage(300, 4, 0, 0)]
    assert peers.bits_per_weight(mixed) == 3.5


def test_bitflux_format_on_the_embedded_model(transformer):
    layers = peers.bitflux_storage(transformer)
    assert len(layers) == 52
    assert 2 < peers.bits_per_weight(layers) <= 2.125  # K >= 128 everywhere: at most 16/128 for the scales


def test_scope_is_bitflux_52_linears(transformer):
    names = [n for n, _ in scoped_linears(transformer)]
    assert len(names) == 52 and "single_transformer_blocks.0.proj_out" in names and "proj_out" not in names

    def fake(extra: list[str], skip: int = 0):
        def apply(t, targets):
            for name in targets[skip:] + extra:
                t.set_submodule(name, nn.Identity())
            return {name: peers.Storage(1, 2, 0, 0) for name in targets}
        return apply

    assert len(peers.quantize_scope(SimpleNamespace(transformer=transformer), fake([]))) == 52
    for extra, skip in ((["proj_out"], 0), (["context_embedder"], 0), ([], 1)):
        with pytest.raises(RuntimeError, match="outside bitflux's scope"):
            peers.quantize_scope(SimpleNamespace(transformer=build_meta_transformer(load_config("tiny").model)), fake(extra, skip))


def test_peers_named_and_settings_recorded():
    assert {"hqq-2-g64", "hqq-1.58-g64", "quanto-qint2-hqq", "sdnq-uint2-g64", "torchao-int2-g32"} <= set(peers.PEERS)
    assert all(lib in peers.LIBRARIES for lib, _, _ in peers.PEERS.values())
