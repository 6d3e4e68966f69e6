"""W2A16 Triton kernels (GEMM and small-M GEMV) against the float64 reference, in the interpreter."""

import pytest
import torch
from test_kernels_common import SHAPES, TOL, case, rel_err

from bitflux_kernels.reference import ternary_linear_reference


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w2a16_matches_reference(m, n, k, dtype):
    from bitflux_kernels.gemv import GEMV_MAX_M, gemv
    from bitflux_kernels.w2a16 import w2a16

    x, packed, scale, bias, out = case(m, n, k, dtype)
    launcher = gemv if m <= GEMV_MAX_M else w2a16
    y = launcher(x, packed, scale, bias, k, out=out)
    assert y is out and y.dtype == dtype
    assert rel_err(y, ternary_linear_reference(x, packed, scale, bias, k)) < TOL[dtype]


@pytest.mark.parametrize("m", [1, 17])
def test_both_paths_fp16_no_bias_strided_x(m):
    from bitflux_kernels.gemv import gemv
    from bitflux_kernels.w2a16 import w2a16

    x, packed, scale, _, out = case(m, 37, 97, torch.float16, bias=False)
    xs = torch.stack([x, x], dim=2).reshape(m, 2 * 97)[:, ::2]  # x again, with K stride 2
    ref = ternary_linear_reference(x, packed, scale, None, 97)
    for launcher in (gemv, w2a16):
        out.fill_(float("nan"))
        assert rel_err(launcher(xs, packed, scale, None, 97, out=out), ref) < TOL[torch.float16]


def test_gemm_covers_large_m_and_many_tiles():
    from bitflux_kernels.w2a16 import w2a16

    x, packed, scale, bias, out = case(100, 96, 384, torch.bfloat16)  # 7 x 3 tiles, ragged M
    y = w2a16(x, packed, scale, bias, 384, out=out)
    assert rel_err(y, ternary_linear_reference(x, packed, scale, bias, 384)) < TOL[torch.bfloat16]


def test_launcher_rejects_mismatched_operands():
    from bitflux_kernels.w2a16 import w2a16

    x, packed, scale, bias, _ = case(4, 32, 64, torch.float32)
    with pytest.raises(ValueError, match="in_features"):
        w2a16(x, packed, scale, bias, 65)
    with pytest.raises(ValueError, match="scale"):
        w2a16(x, packed, scale.double(), bias, 64)
