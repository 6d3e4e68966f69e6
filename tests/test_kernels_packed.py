"""The packed split-K kernel (GEMV at a few tokens, skinny GEMM up to DECODE_MIN_M) against the
float64 reference, in the interpreter: W2A16 and W2A8, split-K partials, ragged K tails, odd shapes.

W2A8 against ``activations="int8"`` (or "fp8"): the only error is the fp32 epilogue and the output
rounding. Against the W2A16 reference the int8 quantization adds about 1/127 relative error per
token (uniform rounding of |x| <= absmax gives about absmax / (127 sqrt(12)) per element), the fp8
one about 2.8%; the tests state those extra errors as bounds of 2e-2 and 5e-2.
"""

import pytest
import torch
from test_kernels_common import SHAPES, TOL, case, rel_err

from bitflux_kernels.reference import ternary_linear_reference

INT8_EXTRA = 2e-2
FP8_EXTRA = 5e-2  # e4m3 keeps 3 mantissa bits: up to 2^-4 relative per element, about 2.8% over a dot


@pytest.mark.parametrize("m,n,k,split", [(1, 96, 480, 3), (4, 37, 97, 1), (3, 64, 1000, 5), (2, 17, 300, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activations", ["none", "int8"])
def test_gemv_split_k_matches_reference(m, n, k, split, dtype, activations):
    from bitflux_kernels.packed import packed_gemm

    # K = 1000: 8 groups -> 64 words, split 5 -> runs of 16 words, the last split ragged; K = 300: 3 groups
    x, packed, scale, bias, out = case(m, n, k, dtype, seed=3)
    y = packed_gemm(x, packed, scale, bias, k, out=out, activations=activations, split=split)
    assert y is out
    assert rel_err(y, ternary_linear_reference(x, packed, scale, bias, k, activations)) < TOL[dtype]


@pytest.mark.parametrize("m,n,k", [(m, n, k) for m in (1, 33) for n, k in SHAPES] + [(130, 37, 97), (130, 96, 384)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activations", ["none", "int8", "fp8"])
def test_every_token_tile_matches_reference(m, n, k, dtype, activations):
    """16, 64 and 128 tokens a program (130: two M tiles, the second ragged)."""
    from bitflux_kernels.packed import packed_gemm, tokens_per_program

    assert tokens_per_program(m) == {1: 16, 33: 64, 130: 128}[m]
    x, packed, scale, bias, out = case(m, n, k, dtype)
    y = packed_gemm(x, packed, scale, bias, k, out=out, activations=activations, split=2)
    assert y is out and y.dtype == dtype
    assert rel_err(y, ternary_linear_reference(x, packed, scale, bias, k, activations)) < TOL[dtype]
    if activations != "none":
        extra = {"int8": INT8_EXTRA, "fp8": FP8_EXTRA}[activations]
        assert rel_err(y, ternary_linear_reference(x, packed, scale, bias, k)) < TOL[dtype] + extra


@pytest.mark.parametrize("m", [1, 17])
def test_fp16_no_bias_strided_x(m):
    from bitflux_kernels.packed import packed_gemm

    x, packed, scale, _, out = case(m, 37, 97, torch.float16, bias=False)
    xs = torch.stack([x, x], dim=2).reshape(m, 2 * 97)[:, ::2]  # x again, with K stride 2
    for mode in ("none", "int8"):
        out.fill_(float("nan"))
        y = packed_gemm(xs, packed, scale, None, 97, out=out, activations=mode)
        assert rel_err(y, ternary_linear_reference(x, packed, scale, None, 97, mode)) < TOL[torch.float16]


def test_splits_are_deterministic_and_agree():
    from bitflux_kernels.packed import packed_gemm

    x, packed, scale, bias, _ = case(2, 40, 1000, torch.float32, seed=4)
    ys = [packed_gemm(x, packed, scale, bias, 1000, split=s) for s in (1, 2, 4, 4)]
    assert torch.equal(ys[2], ys[3])  # same split: bit for bit
    for y in ys[1:]:
        assert rel_err(y, ys[0]) < 1e-6


def test_launcher_rejects_mismatched_operands():
    from bitflux_kernels.packed import packed_gemm

    x, packed, scale, bias, _ = case(4, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="in_features"):
        packed_gemm(x, packed, scale, bias, 65)
    with pytest.raises(ValueError, match="scale"):
        packed_gemm(x, packed, scale.double(), bias, 64)


def test_split_count_fills_the_gpu_only_where_the_tiles_do_not():
    from bitflux_kernels.packed import SPLIT_GRAIN, split_count

    cpu = torch.device("cpu")  # counts 132 SMs off CUDA
    assert split_count(3072, 15360 // 16, cpu) > 4  # MLP-out: 24 row tiles of 128
    assert split_count(18432, 3072 // 16, cpu) <= 2  # modulation: 144 row tiles already
    assert split_count(3072, SPLIT_GRAIN, cpu) == 1
    assert split_count(3072, 15360 // 16, cpu, m=384) < split_count(3072, 15360 // 16, cpu)  # 3 M tiles share the SMs


def test_permute_x_is_the_decode_order():
    from bitflux_kernels.packed import permute_x

    k = 200
    x = torch.arange(k, dtype=torch.float32)[None, :] + 1  # x[k] = k + 1, 0 marks padding
    xp = permute_x(x.to(case(1, 1, 1, torch.float32)[0].device), 256, torch.float32).cpu()[0]
    t = torch.arange(256)
    wc, s, h = t // 16, t % 16 // 2, t % 2
    i = 7 - s + 8 * h  # field i of word wc: byte i // 4, plane i % 4
    kk = wc // 8 * 128 + i % 4 * 32 + wc % 8 * 4 + i // 4
    assert torch.equal(xp, torch.where(kk < k, kk + 1, 0).float())
    assert sorted(xp[xp > 0].long().tolist()) == list(range(1, k + 1))  # a permutation of x, zeros past K


@pytest.mark.parametrize("activations", ["int8", "fp8"])
def test_act_quant_writes_the_packed_kernels_order_in_one_pass(activations):
    """W2A8's packed path: act_quant's permuted bf16 q is permute_x of its plain q, bit for bit, zeros past K."""
    from bitflux_kernels.act_quant import act_quant
    from bitflux_kernels.packed import permute_x

    x = case(7, 8, 200, torch.bfloat16)[0]  # [7, 200]
    q, s = act_quant(x, 256, activations=activations)
    qp, sp = act_quant(x, 256, activations=activations, dtype=torch.bfloat16, permuted=True)
    assert qp.dtype == torch.bfloat16 and torch.equal(sp, s)
    expected = permute_x(q.float(), 256, torch.bfloat16)  # q's values are exact in fp32 and bf16
    assert torch.equal(qp.view(torch.int16), expected.view(torch.int16))
    with pytest.raises(ValueError, match="permuted: bf16 only"):
        act_quant(x, 256, activations=activations, permuted=True)
