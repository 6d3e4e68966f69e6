"""Helpers shared by the kernel tests (Triton interpreter on CPU), and tests of the shared pieces."""

import os
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere; never by default on a GPU

pytest.importorskip("triton")

from bitflux_kernels.common import interpreting
from bitflux_kernels.layout import pack_2bit, padded_k
from bitflux_kernels.reference import quantize_activations_int8, ternary_linear_reference

# interpreter on CPU by default; with TRITON_INTERPRET=0 on a GPU machine the same tests run compiled
if not interpreting() and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 and no CUDA: nothing can run the kernels", allow_module_level=True)
DEVICE = "cpu" if interpreting() else "cuda"
gpu = pytest.mark.gpu  # conftest skips it without CUDA or under the interpreter; `pytest -m gpu` selects it

# scaled-down FLUX (N, K) (/32: 3072 -> 96, 9216 -> 288, 12288 -> 384, 15360 -> 480), plus odd ones
SHAPES = [(96, 96), (288, 96), (96, 384), (96, 480), (37, 97), (64, 200)]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def case(m, n, k, dtype, bias=True, seed=0):
    """Fresh random (x [m, k], packed [n, Kp/4], scale [n], bias [n] or None, poisoned out [m, n])."""
    g = torch.Generator().manual_seed(seed * 7919 + m * 131 + n * 17 + k)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    x = (torch.randn(m, k, generator=g) * 2 + 0.1).to(dtype)
    scale = torch.rand(n, generator=g) + 0.5
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype)
    return tuple(t if t is None else t.to(DEVICE) for t in (x, pack_2bit(codes), scale, b, out))


def rel_err(y, ref):
    """||y - ref|| / ||ref|| in float64; NaN anywhere in y fails loudly."""
    assert not torch.isnan(y).any(), "output still holds NaN poison"
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("m,k", [(1, 97), (5, 128), (37, 200), (20, 480)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_matches_reference_bit_exactly(m, k, dtype):
    from bitflux_kernels.act_quant import act_quant

    x, *_ = case(m, 8, k, dtype)
    x[0, :4] = torch.tensor([127.0, 63.5, -2.5, 0.5])  # scale 1: exact ties, which round half to even
    x[-1] = 0.0  # an all-zero token takes the 1e-12 floor
    sums = torch.full((m,), -7, dtype=torch.int32, device=x.device)
    q, s = act_quant(x, padded_k(k), sums=sums)
    q_ref, s_ref = quantize_activations_int8(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q[:, :k], q_ref)
    assert not q[:, k:].any()  # K padding is zeros
    assert torch.equal(sums, q_ref.sum(1, dtype=torch.int32))
    assert torch.equal(act_quant(x, padded_k(k))[0], q)  # without sums: the same q


def test_fp8_quantizer_scales_each_token_to_448_and_pads_k():
    from bitflux_kernels.reference import FP8_MAX, quantize_activations_fp8

    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [3e4, 1e-3, -7.0]])
    q, s = quantize_activations_fp8(x, 16)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (3, 16) and not q[:, 3:].float().any()
    assert torch.equal(s, x.abs().amax(1).clamp_min(1e-12) / FP8_MAX)
    assert q.float().abs().amax(1).tolist() == [FP8_MAX, 0.0, FP8_MAX]  # each token's largest |x| lands on 448
    assert torch.equal(q[:, :3], (x / s[:, None]).to(torch.float8_e4m3fn))  # round to nearest even, torch's cast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fp8_quantizer_rounds_every_e4m3_tie_as_torch_does(dtype):
    """Each row's largest |x| is 448, so its scale is 1 and x / scale is x: every e4m3 value, the
    midpoints between neighbours (ties to even, in normals and subnormals) and one fp32 ulp either
    side of each midpoint, both signs, then random rows; bytes and bf16 values both equal torch's cast."""
    from bitflux_kernels.act_quant import act_quant
    from bitflux_kernels.reference import quantize_activations_fp8

    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[grid.isfinite() & (grid >= 0)].unique()  # [127] every non-negative e4m3 value
    mid = (grid[1:] + grid[:-1]) / 2  # exact in fp32
    vals = torch.cat([grid, mid, mid.nextafter(torch.tensor(0.0)), mid.nextafter(torch.tensor(448.0))])
    vals = torch.cat([vals, -vals, torch.tensor([-0.0])])
    rows = torch.nn.functional.pad(vals, (0, 64 - vals.numel() % 64)).view(-1, 64)  # [R, 64]
    rows = torch.cat([torch.full((rows.shape[0], 1), 448.0), rows], 1).to(dtype)  # [R, 65]: scale 1 (bf16: rounded ties)
    x = torch.cat([rows.to(DEVICE), case(5, 8, 65, dtype)[0] * torch.tensor([[1e-3], [1.0], [30.0], [1e3], [0.0]], device=DEVICE)])  # [R + 5, 65]
    q, s = act_quant(x, 96, activations="fp8")
    q_ref, s_ref = quantize_activations_fp8(x, 96)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))  # the same bytes, -0 and K padding included
    qb, _ = act_quant(x, 96, activations="fp8", dtype=torch.bfloat16)
    assert torch.equal(qb.view(torch.int16), q_ref.to(torch.bfloat16).view(torch.int16))
    with pytest.raises(ValueError, match="sums: int8 only"):
        act_quant(x, 96, torch.empty(x.shape[0], dtype=torch.int32), activations="fp8")


def test_m_bucket_and_pruner_keep_a_config_for_every_flux_shape():
    from bitflux_kernels import packed
    from bitflux_kernels.common import m_bucket

    assert [m_bucket(m) for m in (1, 3, 16, 17, 4608, 10**6)] == [1, 4, 16, 32, 8192, 16384]
    flux_n = (3072, 9216, 12288, 18432)
    for n in flux_n:  # the packed kernel tiles N and tokens (K is split by the launcher)
        for tokens, own in ((16, packed.GEMV_CONFIGS), (32, packed.GEMV_CONFIGS), (128, packed.GEMM_CONFIGS)):
            kept = packed._prune(packed.SPACE.configs(), {"N": n}, TOKENS=tokens)
            assert kept and all(n % c.kwargs["BLOCK_N"] == 0 for c in kept)
            assert {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"], c.num_warps, c.num_stages) for c in kept} <= set(own)
    for n in (8, 48, 100, 3072):  # every prune keeps the config that fits 99 KB of shared memory, or is it
        for tokens, own in ((16, packed.GEMV_CONFIGS), (128, packed.GEMM_CONFIGS)):
            kept = [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"], c.num_warps, c.num_stages)
                    for c in packed._prune(packed.SPACE.configs(), {"N": n}, TOKENS=tokens)]
            assert packed.SMALLEST[own] in kept and len(set(kept)) == len(kept)


def test_autotune_off_keeps_one_config_that_launches(monkeypatch):
    """``BITFLUX_AUTOTUNE=0``: one config per prune, which Triton's autotuner runs without benchmarking."""
    from bitflux_kernels import act_quant, packed

    names = lambda configs: [(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_W"], c.num_warps, c.num_stages) for c in configs]  # noqa: E731
    x = {dtype: torch.empty(0, dtype=dtype) for dtype in (torch.bfloat16, torch.float32)}
    tuned = {(n, t): names(packed._prune(packed.SPACE.configs(), {"N": n, "xp_ptr": x[torch.bfloat16]}, TOKENS=t))
             for n in (48, 3072) for t in (16, 128)}
    monkeypatch.setenv("BITFLUX_AUTOTUNE", "0")
    for (n, tokens), kept in tuned.items():
        family = packed.GEMV_CONFIGS if tokens <= 32 else packed.GEMM_CONFIGS
        for dtype, expected in ((torch.bfloat16, kept[:1]), (torch.float32, [packed.SMALLEST[family]])):
            assert names(packed.SPACE.kept(packed.SPACE.configs(), {"N": n, "xp_ptr": x[dtype]}, TOKENS=tokens)) == expected
    assert len(act_quant.SPACE.kept(act_quant.SPACE.configs(), {"KP": 3072, "M_BUCKET": 8192})) == 1
    monkeypatch.setenv("BITFLUX_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="BITFLUX_AUTOTUNE='yes' is not 0 or 1"):
        packed.SPACE.kept(packed.SPACE.configs(), {"N": 3072, "xp_ptr": x[torch.float32]}, TOKENS=16)


@pytest.mark.parametrize("launcher", ["packed", "packed_int8", "packed_fp8", "w2a16_cublas", "w2a8_cublas", "w2fp8_cublas"])
def test_every_launcher_writes_a_row_strided_out_and_refuses_a_strided_n(launcher):
    """The GEMV and int32 epilogues write ``out + m * stride_m + n``: a transposed ``out`` kept NaNs, an
    expanded one (stride 0 along N) was written past its storage. A padded row stride is fine."""
    from bitflux_kernels import large_m
    from bitflux_kernels.packed import packed_gemm

    fn = {"packed": packed_gemm, "packed_int8": partial(packed_gemm, activations="int8"),
          "packed_fp8": partial(packed_gemm, activations="fp8"), "w2a16_cublas": large_m.w2a16_cublas,
          "w2a8_cublas": large_m.w2a8_cublas, "w2fp8_cublas": large_m.w2fp8_cublas}[launcher]
    mode = "int8" if launcher in ("packed_int8", "w2a8_cublas") else "fp8" if "fp8" in launcher else "none"
    x, packed, scale, bias, _ = case(3, 37, 97, torch.float32)
    if launcher == "w2fp8_cublas" and not large_m.fp8_gemm_ok(x):  # fp32 x on a GPU: refused, not crashed
        with pytest.raises(ValueError, match="bf16 x on an sm89"):
            fn(x, packed, scale, bias, 97)
        return
    wide = torch.full((3, 40), float("nan"), device=DEVICE)  # rows of 40, out is their first 37 columns
    y = fn(x, packed, scale, bias, 97, out=wide[:, :37])
    assert rel_err(y, ternary_linear_reference(x, packed, scale, bias, 97, mode)) < TOL[torch.float32]
    assert wide[:, 37:].isnan().all()  # nothing written past N
    for bad in (torch.empty(37, 3, device=DEVICE).t(), torch.empty(3, 1, device=DEVICE).expand(3, 37)):
        with pytest.raises(ValueError, match="unit stride along N"):
            fn(x, packed, scale, bias, 97, out=bad)


def test_autotuner_keeps_its_winners_on_disk():
    """Triton's autotuner with ``cache_results``: a shape is tuned once per machine, not once per
    process (Triton turns the cache off under the interpreter, so the knob is lifted in a scope that
    restores it and the environment: a monkeypatched knob stays overridden for every later test)."""
    from triton import knobs

    from bitflux_kernels import packed
    from bitflux_kernels.common import autotuner

    with knobs.runtime.scope():
        knobs.runtime.interpret = False
        tuned = autotuner(packed.packed_kernel, packed.SPACE)
    assert tuned.cache_results and tuned.keys == list(packed.SPACE.key)
    assert knobs.runtime.interpret == (os.environ.get("TRITON_INTERPRET") == "1")  # the environment's again
