"""Kernel benchmark: dense torch matmul vs the ternary linears on FLUX shapes, each result checked.

On CUDA: torch bf16 ``x @ W^T`` (cuBLAS) against the W2A16 and W2A8 (int8; and fp8 e4m3 on sm89+)
custom ops with the Triton backend, and the 8-bit cuBLAS ceilings the W2A8 paths cannot beat
(``torch._int_mm`` on int8 operands, ``torch._scaled_mm`` on fp8 ones, quantized beforehand), timed
with CUDA events, eagerly and replayed from CUDA graphs (no Python or launch overhead: what a
compiled model with CUDA graphs pays). Every ternary path is first checked against the float64
reference: the launcher the op would use writes into a NaN-filled output. On CPU (no kernels to
time): the torch and float64 reference paths at shapes divided by ``CPU_SCALE`` with M capped at
``CPU_MAX_M``, timed with ``time.perf_counter``, the torch paths checked the same way. Warm-up (and
autotuning) is excluded; each figure is the median of ``iters`` runs, with inputs rotated among
enough buffer sets that the L2 cache cannot hold them.
"""

import contextlib
import functools
import math
import statistics
import time

import torch

from .layout import pack_2bit
from .reference import QUANTIZERS, ternary_linear_reference, ternary_linear_torch

# (N, K) of every FLUX.1-dev block linear, fused or not: attention / out projections, fused QKV and a single
# block's norm, FF up and proj_mlp, a double block's norm, FF down, a single block's proj_out, a fused linear1
FLUX_SHAPES = ((3072, 3072), (9216, 3072), (12288, 3072), (18432, 3072), (3072, 12288), (3072, 15360), (21504, 3072))
# tokens: a modulation linear at batch 1 / 16, small-batch serving, the text stream (512, where the
# cuBLAS route starts), the image stream at 1024² (4096) and a single block's text + image (4608)
FLUX_MS = (1, 16, 256, 512, 1024, 4096, 4608)
CPU_SCALE = 16
CPU_MAX_M = 256
ROTATE_BYTES = 256 << 20  # bytes one pass over the rotated buffer sets touches (> 5x the H100's 50 MB L2)
MAX_SETS = 16
CHECK_TOL = 1e-2  # relative error against the float64 reference with the same activation quantization (bf16 out)
MODES = {"w2a16": "none", "w2a8": "int8", "w2fp8": "fp8"}
ROUTE_MS = (256, 512, 1024)  # around DECODE_MIN_M: both routes timed, to set the threshold from data


def _sets(m, n, k, dtype, device, gen):
    """Buffer sets {x [m, k], w [n, k], packed [n, Kp/4], scale [n], bias [n]}, enough to defeat L2."""
    one = m * k * dtype.itemsize + n * k * dtype.itemsize + n * k // 4
    sets = []
    for _ in range(max(2, min(MAX_SETS, math.ceil(ROTATE_BYTES / one)))):
        codes = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8, device=device)
        sets.append({
            "x": torch.randn(m, k, generator=gen, device=device).to(dtype),
            "w": torch.randn(n, k, generator=gen, device=device).to(dtype),
            "codes": codes,
            "packed": pack_2bit(codes),
            "scale": torch.rand(n, generator=gen, device=device) + 0.5,
            "bias": torch.randn(n, generator=gen, device=device).to(dtype),
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
    return _events_ms(lambda i: fn(sets[i % len(sets)]), iters)


def _events_ms(call, iters):
    """Median CUDA-event time of ``call(i)`` over ``iters`` calls."""
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for i, (start, end) in enumerate(events):
        start.record()
        call(i)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _graph_ms(fn, sets, iters):
    """Median time of ``fn`` replayed from CUDA graphs, one captured per buffer set (sharing one memory
    pool: they replay in capture order, never concurrently), so the rotation past L2 stays."""
    pool, graphs = torch.cuda.graph_pool_handle(), []
    for s in sets:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn(s)
        graphs.append(graph)
    return _events_ms(lambda i: graphs[i % len(graphs)].replay(), iters)


def _backends(cuda, k, m):
    """(name, fn(set), activation mode or None, launcher(x) or None) of the rows of one (shape, M); the
    first is the dense baseline. The launcher is what ``check`` writes with on CUDA: the op's own
    route, or at M in ``ROUTE_MS`` also each route forced (rows ``..._route_packed`` / ``_cublas``)."""
    dense = ("torch_bf16_matmul" if cuda else "torch_matmul", lambda s: torch.nn.functional.linear(s["x"], s["w"], s["bias"]), None, None)
    if not cuda:
        return [dense] + [(f"torch_{name}", lambda s, a=a: ternary_linear_torch(s["x"], s["packed"], s["scale"], s["bias"], k, a),
                           a, None) for name, a in MODES.items()] + \
            [("reference_w2a16", lambda s: ternary_linear_reference(s["x"], s["packed"], s["scale"], s["bias"], k), None, None)]
    from . import ops
    from .large_m import w2a8_cublas, w2a16_cublas, w2fp8_cublas
    from .packed import packed_gemm

    modes = {name: a for name, a in MODES.items() if a != "fp8" or torch.cuda.get_device_capability() >= (8, 9)}
    rows = [dense] + [(f"triton_{name}", lambda s, op=ops.OPS[a]: op(s["x"], s["packed"], s["scale"], s["bias"], k, "triton"),
                       a, lambda x, a=a: ops.launcher(x, a)) for name, a in modes.items()]
    if m in ROUTE_MS:
        cublas = {"none": w2a16_cublas, "int8": w2a8_cublas, "fp8": w2fp8_cublas}
        for name, a in modes.items():
            for route, launch in (("packed", functools.partial(packed_gemm, activations=a)), ("cublas", cublas[a])):
                rows.append((f"triton_{name}_route_{route}",
                             lambda s, f=launch: f(s["x"], s["packed"], s["scale"], s["bias"], k), a, lambda x, f=launch: f))
    return rows


def _ceilings(s):
    """(name, fn(set)) of the 8-bit cuBLAS GEMMs on operands quantized beforehand (CUDA): what the
    W2A8 paths would cost with free decode and activation quantization."""
    q8, w8 = QUANTIZERS["int8"](s["x"])[0], s["codes"]
    out = [("cublas_int8_mm", lambda s: torch._int_mm(q8, w8.t()))]
    if torch.cuda.get_device_capability() >= (8, 9):
        qf, sx = QUANTIZERS["fp8"](s["x"])
        wf, col = w8.to(torch.float8_e4m3fn), s["scale"][None, :]
        out.append(("cublas_fp8_scaled_mm", lambda s: torch._scaled_mm(qf, wf.t(), scale_a=sx[:, None], scale_b=col,
                                                                       bias=s["bias"], out_dtype=s["x"].dtype)))
    return out


def check(s, k, mode, launcher=None) -> float:
    """Relative error of the path that serves ``mode`` against the float64 reference with the same
    activation quantization; on CUDA ``launcher(x)`` (the Triton launcher a row times) writes into a
    NaN-filled output."""
    ref = ternary_linear_reference(s["x"], s["packed"], s["scale"], s["bias"], k, mode)
    if launcher is not None:
        y = torch.full_like(ref, float("nan"))
        launcher(s["x"])(s["x"], s["packed"], s["scale"], s["bias"], k, out=y)
    else:
        y = ternary_linear_torch(s["x"], s["packed"], s["scale"], s["bias"], k, mode)
    if torch.isnan(y).any():
        return float("inf")
    return ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def bench_kernels(shapes=FLUX_SHAPES, ms=FLUX_MS, device=None, iters=None) -> dict:
    """Check, then time the dense baseline and the ternary linears per (N, K) in ``shapes`` and M in ``ms``.

    ``device`` defaults to CUDA when available. Returns a JSON-serializable dict: ``device``
    ("cuda" or "cpu"), ``device_name``, ``dtype``, ``scaled_down`` (CPU: shapes / CPU_SCALE,
    M <= CPU_MAX_M), ``baseline``, ``checks_passed`` and ``results``: one row per (n, k, m, backend)
    with ``ms`` (median), ``tflops`` (2 M N K / time) and ``speedup_vs_baseline`` (baseline time /
    time); ternary rows also ``rel_err`` and ``check`` ("pass" below ``CHECK_TOL``); on CUDA
    ``graph_ms`` and ``graph_speedup_vs_baseline`` (both sides replayed from CUDA graphs) and
    ``peak_extra_allocated_mb``, the peak memory a call allocates beyond its inputs, plus the rows
    of the 8-bit cuBLAS ceilings (``ceiling: true``; ``error`` where cuBLAS refuses the shape).
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    iters = iters or (50 if cuda else 5)
    if not cuda:
        shapes = list(dict.fromkeys((max(1, n // CPU_SCALE), max(1, k // CPU_SCALE)) for n, k in shapes))
        ms = list(dict.fromkeys(min(m, CPU_MAX_M) for m in ms))
    gen = torch.Generator(device).manual_seed(0)  # drawn where they are used: 4.4 G weights take ~70 s on a CPU
    rows = []
    with torch.cuda.device(device) if cuda else contextlib.nullcontext():  # events, graphs, capability: this device
        for n, k in shapes:
            for m in ms:
                sets = _sets(m, n, k, dtype, device, gen)
                base = {}
                runs = [(name, fn, mode, launcher, False) for name, fn, mode, launcher in _backends(cuda, k, m)]
                runs += [(name, fn, None, None, True) for name, fn in (_ceilings(sets[0]) if cuda else [])]
                for name, fn, mode, launcher, ceiling in runs:
                    row = {"n": n, "k": k, "m": m, "backend": name}
                    if mode is not None:
                        err = check(sets[0], k, mode, launcher)
                        row.update(rel_err=err, check="pass" if err < CHECK_TOL else "FAIL")
                    if ceiling:
                        row["ceiling"] = True
                    try:
                        rows.append(row | _time(fn, sets if not ceiling else sets[:1], iters, cuda, device, m * n * k, base))
                    except RuntimeError as exc:  # cuBLAS refusing a ceiling's shape (e.g. torch._int_mm at M <= 16)
                        if not ceiling:
                            raise
                        rows.append(row | {"error": str(exc).splitlines()[0]})
                del sets
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "scaled_down": not cuda,
        "iters": iters,
        "baseline": rows[0]["backend"] if rows else None,
        "checks_passed": all(r.get("check", "pass") == "pass" for r in rows),
        "results": rows,
    }


def _time(fn, sets, iters, cuda, device, mnk, base) -> dict:
    """Timing fields of one row; ``base`` keeps the dense baseline's times (the first row of a shape)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
    t = _median_ms(fn, sets, iters, warmup=5 if cuda else 1, cuda=cuda)
    base.setdefault("ms", t)
    out = {"ms": t, "tflops": 2 * mnk / (t * 1e-3) / 1e12, "speedup_vs_baseline": base["ms"] / t}
    if cuda:
        out["peak_extra_allocated_mb"] = (torch.cuda.max_memory_allocated(device) - held) / 2**20
        g = _graph_ms(fn, sets, iters)
        base.setdefault("graph_ms", g)
        out.update(graph_ms=g, graph_speedup_vs_baseline=base["graph_ms"] / g)
    return out
