"""Kernel benchmark: dense torch matmul vs the ternary linears on FLUX shapes.

On CUDA: torch bf16 ``x @ W^T`` (cuBLAS) against the W2A16 and W2A8 (int8; and fp8 e4m3 on sm89+)
custom ops with the Triton backend, timed with CUDA events. On CPU (no kernels to time): the torch and float64 reference paths at shapes
divided by ``CPU_SCALE`` with M capped at ``CPU_MAX_M``, timed with ``time.perf_counter``.
Warm-up (and autotuning) is excluded; each figure is the median of ``iters`` runs, with inputs
rotated among enough buffer sets that the L2 cache cannot hold them.
"""

import math
import statistics
import time

import torch

from .layout import pack_2bit
from .reference import ternary_linear_reference, ternary_linear_torch

FLUX_SHAPES = ((3072, 3072), (9216, 3072), (12288, 3072), (18432, 3072), (3072, 12288), (3072, 15360))  # (N, K)
FLUX_MS = (1, 16, 256, 1024, 4096, 4608)
CPU_SCALE = 16
CPU_MAX_M = 256
ROTATE_BYTES = 256 << 20  # bytes one pass over the rotated buffer sets touches (> 5x the H100's 50 MB L2)
MAX_SETS = 16


def _sets(m, n, k, dtype, device, gen):
    """Buffer sets {x [m, k], w [n, k], packed [n, Kp/4], scale [n], bias [n]}, enough to defeat L2."""
    one = m * k * dtype.itemsize + n * k * dtype.itemsize + n * k // 4
    sets = []
    for _ in range(max(2, min(MAX_SETS, math.ceil(ROTATE_BYTES / one)))):
        codes = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        sets.append({
            "x": torch.randn(m, k, generator=gen).to(device, dtype),
            "w": torch.randn(n, k, generator=gen).to(device, dtype),
            "packed": pack_2bit(codes).to(device),
            "scale": (torch.rand(n, generator=gen) + 0.5).to(device),
            "bias": torch.randn(n, generator=gen).to(device, dtype),
        })
    return sets


def _median_ms(fn, sets, iters, warmup, cuda):
    for i in range(warmup):
        fn(sets[i % len(sets)])
    if not cuda:
        times = []
        for i in range(iters):
            t0 = time.perf_counter()
            fn(sets[i % len(sets)])
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(sets[i % len(sets)])
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _backends(cuda, k):
    """(name, fn(set)) pairs; the first is the dense baseline."""
    dense = ("torch_bf16_matmul" if cuda else "torch_matmul", lambda s: torch.nn.functional.linear(s["x"], s["w"], s["bias"]))
    if cuda:
        from . import ops

        names = {"none": "triton_w2a16", "int8": "triton_w2a8", "fp8": "triton_w2fp8"}
        if torch.cuda.get_device_capability() < (8, 9):  # no fp8 GEMM before Ada
            names.pop("fp8")
        return [dense] + [(name, lambda s, op=ops.OPS[a]: op(s["x"], s["packed"], s["scale"], s["bias"], k, "triton"))
                          for a, name in names.items()]
    return [dense,
            ("torch_w2a16", lambda s: ternary_linear_torch(s["x"], s["packed"], s["scale"], s["bias"], k)),
            ("torch_w2a8", lambda s: ternary_linear_torch(s["x"], s["packed"], s["scale"], s["bias"], k, "int8")),
            ("torch_w2fp8", lambda s: ternary_linear_torch(s["x"], s["packed"], s["scale"], s["bias"], k, "fp8")),
            ("reference_w2a16", lambda s: ternary_linear_reference(s["x"], s["packed"], s["scale"], s["bias"], k))]


def bench_kernels(shapes=FLUX_SHAPES, ms=FLUX_MS, device=None, iters=None) -> dict:
    """Time the dense baseline and the ternary linears per (N, K) in ``shapes`` and M in ``ms``.

    ``device`` defaults to CUDA when available. Returns a JSON-serializable dict: ``device``
    ("cuda" or "cpu"), ``device_name``, ``dtype``, ``scaled_down`` (CPU: shapes / CPU_SCALE,
    M <= CPU_MAX_M), ``baseline`` and ``results``: one row per (n, k, m, backend) with ``ms``
    (median), ``tflops`` (2 M N K / time) and ``speedup_vs_baseline`` (baseline time / time), plus
    on CUDA ``peak_extra_allocated_mb``: the peak memory a call allocates beyond its inputs.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    iters = iters or (50 if cuda else 5)
    if not cuda:
        shapes = list(dict.fromkeys((max(1, n // CPU_SCALE), max(1, k // CPU_SCALE)) for n, k in shapes))
        ms = list(dict.fromkeys(min(m, CPU_MAX_M) for m in ms))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in shapes:
        for m in ms:
            sets = _sets(m, n, k, dtype, device, gen)
            base_ms = None
            for name, fn in _backends(cuda, k):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats(device)
                    held = torch.cuda.memory_allocated(device)
                t = _median_ms(fn, sets, iters, warmup=5 if cuda else 1, cuda=cuda)
                base_ms = base_ms or t
                row = {"n": n, "k": k, "m": m, "backend": name, "ms": t,
                       "tflops": 2 * m * n * k / (t * 1e-3) / 1e12, "speedup_vs_baseline": base_ms / t}
                if cuda:
                    row["peak_extra_allocated_mb"] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
                rows.append(row)
            del sets
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "scaled_down": not cuda,
        "iters": iters,
        "baseline": rows[0]["backend"] if rows else None,
        "results": rows,
    }
