"""Small-M GEMV: split-K partials, ragged K tails and odd shapes against the float64 reference (interpreter)."""

import pytest
import torch
from test_kernels_common import TOL, case, rel_err

from bitflux_kernels.reference import ternary_linear_reference


@pytest.mark.parametrize("m,n,k,split", [(1, 96, 480, 3), (4, 37, 97, 1), (3, 64, 1000, 5), (2, 17, 300, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activations", ["none", "int8"])
def test_gemv_split_k_matches_reference(m, n, k, split, dtype, activations):
    from bitflux_kernels.gemv import gemv

    # K = 1000: 8 groups -> 64 words, split 5 -> runs of 16 words, the last split ragged; K = 300: 3 groups
    x, packed, scale, bias, out = case(m, n, k, dtype, seed=3)
    y = gemv(x, packed, scale, bias, k, out=out, activations=activations, split=split)
    assert y is out
    assert rel_err(y, ternary_linear_reference(x, packed, scale, bias, k, activations)) < TOL[dtype]


def test_gemv_splits_are_deterministic_and_agree():
    from bitflux_kernels.gemv import gemv

    x, packed, scale, bias, _ = case(2, 40, 1000, torch.float32, seed=4)
    ys = [gemv(x, packed, scale, bias, 1000, split=s) for s in (1, 2, 4, 4)]
    assert torch.equal(ys[2], ys[3])  # same split: bit for bit
    for y in ys[1:]:
        assert rel_err(y, ys[0]) < 1e-6


def test_split_count_fills_the_gpu_only_where_n_does_not():
    from bitflux_kernels.gemv import SPLIT_GRAIN, split_count

    cpu = torch.device("cpu")  # counts 132 SMs off CUDA
    assert split_count(3072, 15360 // 16, cpu) > 4  # MLP-out: 24 row tiles of 128
    assert split_count(18432, 3072 // 16, cpu) <= 2  # modulation: 144 row tiles already
    assert split_count(3072, SPLIT_GRAIN, cpu) == 1


def test_permute_x_is_the_decode_order():
    from bitflux_kernels.gemv import permute_x

    k = 200
    x = torch.arange(k, dtype=torch.float32)[None, :] + 1  # x[k] = k + 1, 0 marks padding
    xp = permute_x(x.to(case(1, 1, 1, torch.float32)[0].device), 256, torch.float32).cpu()[0]
    t = torch.arange(256)
    wc, s, h = t // 16, t % 16 // 2, t % 2
    i = 7 - s + 8 * h  # field i of word wc: byte i // 4, plane i % 4
    kk = wc // 8 * 128 + i % 4 * 32 + wc % 8 * 4 + i // 4
    assert torch.equal(xp, torch.where(kk < k, kk + 1, 0).float())
    assert sorted(xp[xp > 0].long().tolist()) == list(range(1, k + 1))  # a permutation of x, zeros past K
