"""Backend selection, the torch.library custom ops and their M routes, and agreement of all backends on a TernaryLinear."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_kernels_common import DEVICE, TOL, case, gpu, rel_err

from bitflux_kernels.dispatch import select_backend
from bitflux_kernels.reference import ternary_linear_reference
from bitflux_cli.ternary import TernaryLinear


def test_default_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("BITFLUX_BACKEND", raising=False)
    assert select_backend(torch.device("cpu")) == "torch"


def test_forced_triton_without_cuda_or_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("BITFLUX_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend(torch.device("cpu"))
    monkeypatch.setenv("BITFLUX_BACKEND", "cublas")
    with pytest.raises(ValueError, match="not one of"):
        select_backend(torch.device("cpu"))


@pytest.mark.parametrize("hugging_face_kernels", [False, True])
def test_the_repo_root_on_sys_path_hands_kernels_over_and_does_not_register_the_ops_twice(tmp_path, hugging_face_kernels):
    """transformers and diffusers import a top-level ``kernels`` to probe for Hugging Face's package; from
    the repository root that finds this folder. It must not run its modules: loading ops.py again
    re-registered torch.ops.bitflux.*, and calls through the first handles then died with ``vector::reserve``.
    Where Hugging Face's package is on the path (a stand-in here, behind the root), it takes the name, as
    transformers >= 5.25 expects (``from kernels import CUDAProperties`` failed on this folder); else the name
    stays empty."""
    root = Path(__file__).resolve().parents[1]
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("CUDAProperties = 'hugging face'\n")
    code = ("import importlib, sys; from torch._library.custom_ops import OPDEFS; import bitflux_kernels.ops as o; "
            "sys.path[:] = [sys.argv[1]] + [p for p in sys.path if 'site-packages' not in p] + sys.argv[2:]; "
            "import kernels; "
            "assert all(OPDEFS['bitflux::' + n] is getattr(o, n) for n in ('w2a16', 'w2a8', 'w2fp8')); "
            "print(getattr(kernels, 'CUDAProperties', None), kernels.__file__.startswith(sys.argv[1] + '/kernels/'), "
            "hasattr(kernels, 'ops')); importlib.import_module('kernels.ops')")
    argv = [sys.executable, "-c", code, str(root), *([str(tmp_path)] if hugging_face_kernels else [])]
    res = subprocess.run(argv, cwd=root, capture_output=True, text=True)
    if hugging_face_kernels:
        assert res.stdout.split() == ["hugging", "face", "False", "False"], res.stderr[-2000:]
        assert "No module named 'kernels.ops'" in res.stderr.splitlines()[-1], res.stderr[-2000:]
    else:
        assert res.stdout.split() == ["None", "True", "False"], res.stderr[-2000:]
        assert "import them as bitflux_kernels.ops" in res.stderr.splitlines()[-1], res.stderr[-2000:]


@pytest.mark.parametrize("activations", ["none", "int8", "fp8"])
@pytest.mark.parametrize("m", [1, 40])
def test_all_backends_agree_on_ternary_linear(monkeypatch, activations, m):
    g = torch.Generator().manual_seed(m)
    codes = torch.randint(-1, 2, (48, 200), generator=g, dtype=torch.int8)
    layer = TernaryLinear.from_codes(codes, torch.rand(48, generator=g) + 0.5, torch.randn(48, generator=g).bfloat16(),
                                     activations).to(DEVICE)
    x = torch.randn(2, m, 200, generator=g).bfloat16().to(DEVICE)  # [batch, tokens, K]
    ys = {}
    for backend in ("reference", "torch", "triton"):
        monkeypatch.setenv("BITFLUX_BACKEND", backend)
        layer.to(DEVICE)  # the backend is resolved when the layer moves, not per call
        assert layer.backend == backend
        ys[backend] = layer(x)
        assert ys[backend].shape == (2, m, 48) and ys[backend].dtype == torch.bfloat16
    assert rel_err(ys["triton"], ys["reference"]) < TOL[torch.bfloat16]
    assert rel_err(ys["torch"], ys["reference"]) < TOL[torch.bfloat16]


def test_backend_is_resolved_on_build_move_and_load(monkeypatch):
    monkeypatch.delenv("BITFLUX_BACKEND", raising=False)
    shell = TernaryLinear(200, 48, device="meta")
    assert shell.backend is None
    with pytest.raises(RuntimeError, match="meta"):
        shell(torch.empty(1, 200, device="meta"))
    layer = TernaryLinear.from_codes(torch.zeros(48, 200, dtype=torch.int8), torch.ones(48), torch.zeros(48))
    assert layer.backend == "torch"  # built on the CPU with BITFLUX_BACKEND unset
    monkeypatch.setenv("BITFLUX_BACKEND", "reference")
    assert layer.backend == "torch"  # not re-read per call
    shell.load_state_dict(layer.state_dict(), assign=True)  # assign swaps buffers without _apply
    assert shell.backend == "reference" and shell.packed.device.type == "cpu"
    assert layer.to("cpu").backend == "reference" and "backend=reference" in repr(layer)


def test_backend_follows_tensors_an_offload_hook_moves_without_apply(monkeypatch):
    """accelerate's set_module_tensor_to_device (what its cpu_offload and diffusers' group offloading
    do: ``param.data = ...``) never calls ``_apply``; forward resolves the backend for the new device."""
    from accelerate.utils import set_module_tensor_to_device

    monkeypatch.delenv("BITFLUX_BACKEND", raising=False)
    layer = TernaryLinear.from_codes(torch.ones(48, 200, dtype=torch.int8), torch.full((48,), 0.5), torch.zeros(48))
    shell = TernaryLinear(200, 48, device="meta")
    for name, t in layer.state_dict().items():
        set_module_tensor_to_device(shell, name, "cpu", value=t)
    assert shell.backend is None and shell.packed.device.type == "cpu"  # still resolved for meta
    y = shell(torch.ones(3, 200))
    assert shell.backend == "torch" and torch.equal(y, torch.full((3, 48), 100.0))


@pytest.mark.parametrize("op", ["w2a16", "w2a8", "w2fp8"])
@pytest.mark.parametrize("backend", ["triton", "torch", "reference"])
def test_custom_op_opcheck_and_fullgraph_compile(op, backend):
    from bitflux_kernels import ops  # noqa: F401  registers torch.ops.bitflux.*

    fn = getattr(torch.ops.bitflux, op)
    torch._dynamo.reset()  # one lambda, 9 closures: past Dynamo's recompile limit of 8 without a reset
    x, packed, scale, bias, _ = case(6, 40, 130, torch.float32)
    torch.library.opcheck(fn, (x, packed, scale, bias, 130, backend))
    compiled = torch.compile(lambda x: fn(x, packed, scale, bias, 130, backend) * 2, fullgraph=True, backend="aot_eager")
    ref = ternary_linear_reference(x, packed, scale, bias, 130, {"w2a16": "none", "w2a8": "int8", "w2fp8": "fp8"}[op]) * 2
    assert rel_err(compiled(x), ref) < TOL[torch.float32]


def test_triton_op_routes_by_m():
    """M < DECODE_MIN_M: the packed kernel (GEMV / skinny GEMM); M >= DECODE_MIN_M: decode + cuBLAS. All
    match, in every activation mode."""
    from bitflux_kernels import large_m, ops

    for activations, op in ops.OPS.items():
        for m, route in ((4, "packed"), (large_m.DECODE_MIN_M - 1, "packed"), (large_m.DECODE_MIN_M, "cublas")):
            assert ops.route(m) == route
            x, packed, scale, bias, _ = case(m, 37, 97, torch.bfloat16)
            y = op(x.view(1, m, 97), packed, scale, bias, 97, "triton")  # [batch, tokens, K]
            assert y.shape == (1, m, 37)
            ref = ternary_linear_reference(x, packed, scale, bias, 97, activations)
            assert rel_err(y[0], ref) < TOL[torch.bfloat16], (activations, m)


@gpu
@pytest.mark.parametrize("m", [2, 64, 1024])  # GEMV, GEMM, decode + cuBLAS
def test_inductor_fullgraph_and_cuda_graph_capture(m):
    from bitflux_kernels import ops

    x, packed, scale, bias, _ = case(m, 256, 512, torch.bfloat16)
    ref = ternary_linear_reference(x, packed, scale, bias, 512)
    compiled = torch.compile(lambda x: ops.w2a16(x, packed, scale, bias, 512), fullgraph=True)
    assert rel_err(compiled(x), ref) < TOL[torch.bfloat16]
    for op in (ops.w2a16, ops.w2a8):
        op(x, packed, scale, bias, 512)  # autotune before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = op(x, packed, scale, bias, 512)
        x.mul_(-1)  # the replay must read the new x: the graph holds no stale scratch result
        graph.replay()
        torch.cuda.synchronize()
        mode = "int8" if op is ops.w2a8 else "none"
        assert rel_err(y, ternary_linear_reference(x, packed, scale, bias, 512, mode)) < TOL[torch.bfloat16]
        x.mul_(-1)
