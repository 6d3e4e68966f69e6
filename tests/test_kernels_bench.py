"""The kernel benchmark runs on CPU (torch and reference paths, scaled down, checked against the
float64 reference) and returns JSON; its check catches a wrong path."""

import json

import pytest
import torch

import bitflux_kernels.bench as bench
from bitflux_kernels.bench import CPU_SCALE, bench_kernels


def test_bench_kernels_on_cpu_is_labelled_and_serializable():
    report = bench_kernels(shapes=((3072, 3072), (3072, 12288)), ms=(1, 4608), device="cpu", iters=2)
    json.dumps(report)
    assert report["device"] == "cpu" and report["scaled_down"] and report["baseline"] == "torch_matmul"
    rows = report["results"]
    assert {(r["n"], r["k"]) for r in rows} == {(3072 // CPU_SCALE, 3072 // CPU_SCALE), (3072 // CPU_SCALE, 12288 // CPU_SCALE)}
    assert {r["backend"] for r in rows} == {"torch_matmul", "torch_w2a16", "torch_w2a8", "torch_w2fp8", "reference_w2a16"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in rows)
    checked = [r for r in rows if r["backend"].startswith("torch_w2")]
    assert report["checks_passed"] and checked and all(r["check"] == "pass" and r["rel_err"] < 1e-5 for r in checked)
    assert max(r["m"] for r in rows) <= 256 and torch.isfinite(torch.tensor([r["speedup_vs_baseline"] for r in rows])).all()


def test_check_fails_a_path_that_computes_the_wrong_thing(monkeypatch):
    sets = bench._sets(3, 32, 64, torch.float32, "cpu", torch.Generator().manual_seed(0))
    assert bench.check(sets[0], 64, "fp8") < 1e-5
    monkeypatch.setattr(bench, "ternary_linear_torch", lambda x, packed, scale, bias, k, mode: x @ torch.ones(k, 32))
    assert bench.check(sets[0], 64, "fp8") > bench.CHECK_TOL


def test_check_writes_with_the_launcher_a_row_times_into_a_nan_filled_output():
    """The CUDA rows check the launcher they time (the op's route, or a forced one near DECODE_MIN_M);
    here the same launchers run under the interpreter."""
    from functools import partial

    from bitflux_kernels.large_m import w2a8_cublas, w2a16_cublas
    from bitflux_kernels.packed import packed_gemm

    sets = bench._sets(24, 32, 200, torch.float32, "cpu", torch.Generator().manual_seed(1))
    for mode, launch in (("none", partial(packed_gemm, activations="none")), ("none", w2a16_cublas),
                         ("int8", partial(packed_gemm, activations="int8")), ("int8", w2a8_cublas)):
        assert bench.check(sets[0], 200, mode, lambda x, f=launch: f) < bench.CHECK_TOL
    assert bench.check(sets[0], 200, "none", lambda x: lambda *a, out: out) == float("inf")  # wrote nothing: NaN


@pytest.mark.gpu
def test_bench_kernels_on_cuda_checks_times_graphs_and_ceilings():
    report = bench_kernels(shapes=((256, 512),), ms=(1, 64, 1024), iters=3)
    assert report["device"] == "cuda" and report["checks_passed"]
    rows = report["results"]
    assert {"torch_bf16_matmul", "triton_w2a16", "triton_w2a8", "cublas_int8_mm"} <= {r["backend"] for r in rows}
    assert all(r["graph_ms"] > 0 for r in rows if "error" not in r)
    assert any(r["backend"] == "cublas_int8_mm" and "error" not in r for r in rows)  # _int_mm takes M = 64, 1024
    routes = {r["backend"] for r in rows if r["m"] == 1024 and "_route_" in r["backend"]}  # both routes near the threshold
    assert {"triton_w2a16_route_packed", "triton_w2a16_route_cublas", "triton_w2a8_route_cublas"} <= routes
    assert not any("_route_" in r["backend"] for r in rows if r["m"] not in bench.ROUTE_MS)
