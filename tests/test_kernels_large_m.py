"""Large-M path: the decode kernel (exact against unpack_2bit) and decode + cuBLAS against the float64 reference."""

import pytest
import torch
from test_kernels_common import DEVICE, SHAPES, TOL, case, rel_err

from bitflux_kernels.layout import pack_2bit, padded_k, unpack_2bit
from bitflux_kernels.reference import ternary_linear_reference


def _codes(n, k, seed=0):
    g = torch.Generator().manual_seed(seed * 1000 + n * 7 + k)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    return codes, pack_2bit(codes).to(DEVICE), g


@pytest.mark.parametrize("n,k", [(37, 97), (64, 200), (8, 128), (96, 480), (5, 1)])
@pytest.mark.parametrize("extra_rows", [0, 3])
def test_decode_fields_is_unpack_2bit_plus_one_exactly(n, k, extra_rows):
    from bitflux_kernels.decode import decode

    codes, packed, _ = _codes(n, k)
    out = decode(packed, torch.uint8, rows=n + extra_rows).cpu()  # [rows, Kp]
    assert out.shape == (n + extra_rows, padded_k(k)) and out.dtype == torch.uint8
    assert torch.equal(out[:n, :k].to(torch.int8) - 1, unpack_2bit(packed.cpu(), k))
    assert torch.equal(out[:n, :k].to(torch.int8) - 1, codes)
    assert (out[:n, k:] == 1).all()  # K padding: the field of a zero code
    assert torch.equal(out[n:], out[torch.arange(n, n + extra_rows) % n])  # rows past N repeat rows n % N


@pytest.mark.parametrize("n,k", [(37, 97), (96, 480)])
@pytest.mark.parametrize("extra_rows", [0, 11])
def test_decode_fp8_is_twice_the_codes_exactly(n, k, extra_rows):
    from bitflux_kernels.decode import decode

    codes, packed, _ = _codes(n, k, seed=2)
    out = decode(packed, torch.float8_e4m3fn, rows=n + extra_rows).cpu()  # [rows, Kp]
    assert out.dtype == torch.float8_e4m3fn and out.shape == (n + extra_rows, padded_k(k))
    assert torch.equal(out[:n, :k].float(), 2 * codes.float())
    assert not out[:, k:].float().any()  # K padding: -0
    assert torch.equal(out[n:].view(torch.uint8), out[torch.arange(n, n + extra_rows) % n].view(torch.uint8))


@pytest.mark.parametrize("n,k", [(37, 97), (64, 200), (96, 480)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_float_with_and_without_scale_is_exact(n, k, dtype):
    from bitflux_kernels.decode import decode, lift

    codes, packed, g = _codes(n, k, seed=1)
    # scales representable in dtype: code * scale is then exact, whatever rounding mode the cast uses
    # (Triton's interpreter truncates fp32 -> bf16, compiled kernels round to nearest even)
    scale = (torch.rand(n, generator=g) + 0.5).to(dtype).float()
    scale[::5] *= -1  # the kernels take any sign (checkpoints hold positive scales)
    for s in (None, scale):
        out = decode(packed, dtype, scale=None if s is None else s.to(DEVICE)).cpu().float()  # [N, Kp]
        lifted = (torch.ones(n) if s is None else s)[:, None] * lift(dtype)  # [N, 1]
        assert torch.equal(out[:, :k][codes != 0], (codes.float() * lifted)[codes != 0])
        zero = torch.cat([out[:, :k][codes == 0], out[:, k:].flatten()])  # zero codes and the K padding
        assert (zero.abs() <= lifted.abs().max() * 2.0 ** -127).all()
        if dtype != torch.bfloat16:
            assert not zero.any()


def test_decode_bf16_lift_covers_every_scale_from_2_to_the_minus_63_to_2_to_the_64():
    from bitflux_kernels.decode import decode, lift

    codes, packed, _ = _codes(8, 128, seed=3)
    scale = torch.tensor([2.0 ** -63, -(2.0 ** -63), 2.0 ** 63 * 1.5, 1e-3, 2.0 ** -64, -1e-30, 0.0, 7.0])
    out = decode(packed, torch.bfloat16, scale=scale.to(DEVICE)).cpu().double() / lift(torch.bfloat16)  # [8, 128]
    exact = codes.double() * scale.to(torch.bfloat16).double()[:, None]
    lifted, c = [0, 1, 2, 3, 7], codes[[0, 1, 2, 3, 7]]  # rows whose scale the lift covers
    assert torch.equal(out[lifted][c != 0], exact[lifted][c != 0])
    assert (out[lifted][c == 0].abs() <= scale[lifted, None].abs().expand_as(c)[c == 0] * 2.0 ** -127).all()
    assert torch.equal(out[4:7], torch.zeros(3, 128, dtype=torch.double))  # below 2^-63: zero rows


def test_decode_rejects_what_it_cannot_read():
    from bitflux_kernels.decode import decode

    _, packed, _ = _codes(8, 200)
    with pytest.raises(ValueError, match="rows >= N"):
        decode(packed, torch.uint8, rows=4)
    with pytest.raises(ValueError, match="epilogue"):
        decode(packed, torch.uint8, scale=torch.ones(8, device=DEVICE))
    with pytest.raises(ValueError, match="Kp/4"):
        decode(packed[:, :40], torch.uint8)
    with pytest.raises(ValueError, match="unsupported dtype"):
        decode(packed, torch.int8)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activations", ["none", "int8", "fp8"])
def test_decode_then_cublas_matches_reference(n, k, dtype, activations):
    from bitflux_kernels.large_m import fp8_gemm_ok, w2a8_cublas, w2a16_cublas, w2fp8_cublas

    x, packed, scale, bias, out = case(24, n, k, dtype)  # launchers take any M; the op sends M >= DECODE_MIN_M here
    launcher = {"none": w2a16_cublas, "int8": w2a8_cublas, "fp8": w2fp8_cublas}[activations]
    if activations == "fp8" and not fp8_gemm_ok(x):
        pytest.skip("torch._scaled_mm's row-wise fp8 GEMM needs bf16 x on sm89+ (ops.launcher sends the rest to the packed kernel)")
    y = launcher(x, packed, scale, bias, k, out=out)
    assert y is out and y.dtype == dtype
    # W2A16 folds the scale into the decoded weight (one rounding of code * scale to x's dtype): within TOL
    assert rel_err(y, ternary_linear_reference(x, packed, scale, bias, k, activations)) < TOL[dtype]


def test_decode_then_cublas_no_bias_strided_x():
    from bitflux_kernels.large_m import fp8_gemm_ok, w2a8_cublas, w2a16_cublas, w2fp8_cublas

    x, packed, scale, _, out = case(20, 37, 97, torch.float32, bias=False)
    xs = torch.stack([x, x], dim=2).reshape(20, 2 * 97)[:, ::2]  # x again, with K stride 2
    fp8 = ((w2fp8_cublas, "fp8"),) if fp8_gemm_ok(xs) else ()  # fp32 x: the packed kernel's on a GPU
    for launcher, mode in ((w2a16_cublas, "none"), (w2a8_cublas, "int8"), *fp8):
        out.fill_(float("nan"))
        assert rel_err(launcher(xs, packed, scale, None, 97, out=out), ternary_linear_reference(x, packed, scale, None, 97, mode)) < 1e-6
