"""The kernel benchmark runs on CPU (torch and reference paths, scaled down) and returns JSON."""

import json

import torch

from bitflux_kernels.bench import CPU_SCALE, bench_kernels


def test_bench_kernels_on_cpu_is_labelled_and_serializable():
    report = bench_kernels(shapes=((3072, 3072), (3072, 12288)), ms=(1, 4608), device="cpu", iters=2)
    json.dumps(report)
    assert report["device"] == "cpu" and report["scaled_down"] and report["baseline"] == "torch_matmul"
    rows = report["results"]
    assert {(r["n"], r["k"]) for r in rows} == {(3072 // CPU_SCALE, 3072 // CPU_SCALE), (3072 // CPU_SCALE, 12288 // CPU_SCALE)}
    assert {r["backend"] for r in rows} == {"torch_matmul", "torch_w2a16", "torch_w2a8", "torch_w2fp8", "reference_w2a16"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    assert max(r["m"] for r in rows) <= 256 and torch.isfinite(torch.tensor([r["speedup_vs_baseline"] for r in rows])).all()
