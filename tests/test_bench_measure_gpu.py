"""Measured mode on CUDA (random weights, the mini model); skipped without a GPU."""

import pytest
import torch

from bitflux_cli.bench import run_bench
from bitflux_cli.bench.measure import measure
from bitflux_cli.config import Config

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def tiny_cfg() -> Config:
    cfg = Config()
    cfg.bench.resolutions, cfg.bench.warmup, cfg.bench.iters = [64], 1, 3
    cfg.generate.max_sequence_length = 24
    return cfg


@pytest.mark.parametrize("compile_mode", ["none", "reduce-overhead"])
def test_measure_random_weights(compile_mode):
    cfg = tiny_cfg()
    cfg.bench.compile = compile_mode
    out = measure(cfg, random_weights=True)
    assert out["compile"] == compile_mode
    for mode, r in out["per_resolution"]["64"].items():
        assert r["step"]["median_ms"] > 0 and r["step"]["p90_ms"] >= r["step"]["median_ms"], mode
        assert r["step_peak_bytes"] > 0 and r["image_s"] > 0 and r["source"] == "measured"


def test_run_bench_measures_on_cuda(tmp_path):
    report = run_bench(tiny_cfg(), None, random_weights=True, plot=tmp_path / "b.png")
    assert report["measured"] is True and report["latency"]["measured"] is not None
    assert report["device"] == torch.cuda.get_device_name()
