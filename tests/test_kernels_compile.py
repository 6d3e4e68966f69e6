"""Every Triton kernel compiles to a cubin for sm80 and sm90 (Triton's own ptxas; no GPU needed).

The interpreter tests check the numerics; this catches what only the real compiler rejects
(dtype rules of ``tl.dot``, layouts, shared memory). Run in a subprocess with the interpreter off.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

I32, C = "i32", "constexpr"


def _packed_spec(xdt, pattern, dot, prec, has_sx, one, cfg, tokens):
    """(kernel, signature, constexprs, options) of packed_kernel in autotune config ``cfg`` at ``tokens``."""
    from bitflux_kernels.packed import packed_kernel

    bn, bw, warps, stages = cfg
    consts = {"ONE_SPLIT": one, "HAS_XSCALE": has_sx, "HAS_BIAS": True, "PATTERN": pattern, "DOT": dot,
              "PRECISION": prec, "BLOCK_N": bn, "BLOCK_W": bw, "TOKENS": tokens}
    ptrs = {"w_ptr": "*u8", "part_ptr": "*fp32", "sx_ptr": "*fp32", "scale_ptr": "*fp32", "xp_ptr": f"*{xdt}",
            "bias_ptr": f"*{xdt}", "y_ptr": f"*{xdt}"}
    signature = {a: ptrs.get(a, C if a in consts else I32) for a in packed_kernel.arg_names}
    return packed_kernel, signature, consts, {"num_warps": warps, "num_stages": stages}


def _specs():
    """(kernel, signature, constexprs, options) for representative autotune configs."""
    import triton.language as tl

    from bitflux_kernels.act_quant import act_quant_kernel
    from bitflux_kernels.decode import FIELDS_META, FLOAT_META, HALF_META, decode_fields_kernel, decode_float_kernel, decode_half_kernel
    from bitflux_kernels.hadamard_triton import hadamard_kernel
    from bitflux_kernels.large_m import EPILOGUE_META, int_epilogue_kernel
    from bitflux_kernels.packed import GEMM_CONFIGS, GEMV_CONFIGS, PERMUTE_META, REDUCE_META, permute_x_kernel, reduce_kernel

    def sig(fn, ptrs, consts):
        return {a: ptrs.get(a, C if a in consts else I32) for a in fn.arg_names}

    for spec in (("bf16", tl.bfloat16, tl.bfloat16, "tf32", True, False, GEMV_CONFIGS[0], 16),
                 ("fp16", tl.float16, tl.float16, "tf32", False, True, GEMV_CONFIGS[1], 32),
                 ("fp32", tl.bfloat16, tl.float32, "ieee", False, False, GEMM_CONFIGS[0], 64),
                 ("bf16", tl.bfloat16, tl.bfloat16, "tf32", True, True, GEMM_CONFIGS[2], 128)):
        yield _packed_spec(*spec)
    consts = {"HAS_XSCALE": True, "HAS_BIAS": True, "BLOCK_N": REDUCE_META["BLOCK_N"]}
    ptrs = {"part_ptr": "*fp32", "sx_ptr": "*fp32", "scale_ptr": "*fp32", "bias_ptr": "*bf16", "y_ptr": "*bf16"}
    yield reduce_kernel, sig(reduce_kernel, ptrs, consts), consts, {"num_warps": REDUCE_META["num_warps"]}
    consts = {"BLOCK": PERMUTE_META["BLOCK"]}
    yield permute_x_kernel, sig(permute_x_kernel, {"x_ptr": "*bf16", "xp_ptr": "*bf16"}, consts), consts, {"num_warps": 4}
    for q, fp8, as_bytes, permuted in (("*i8", False, False, False), ("*u8", True, True, False),  # int8, e4m3 bytes
                                       ("*bf16", True, False, True), ("*bf16", False, False, True)):  # bf16 permuted
        consts = {"ROWS": 4, "BLOCK_K": 1024, "HAS_SUM": not fp8, "FP8": fp8, "BYTES": as_bytes, "PERMUTED": permuted}
        ptrs = {"x_ptr": "*bf16", "q_ptr": q, "s_ptr": "*fp32", "sum_ptr": "*i32"}
        yield act_quant_kernel, sig(act_quant_kernel, ptrs, consts), consts, {"num_warps": 4}
    fixed = lambda meta: ({k: v for k, v in meta.items() if k != "num_warps"}, {"num_warps": meta["num_warps"]})  # noqa: E731
    for even, fp8 in ((True, False), (False, True)):
        consts, options = fixed(FIELDS_META)
        consts.update(EVEN=even, FP8=fp8)
        yield decode_fields_kernel, sig(decode_fields_kernel, {"w_ptr": "*u8", "out_ptr": "*u8"}, consts), consts, options
    for dt in ("bf16", "fp16"):
        consts, options = fixed(HALF_META)
        consts.update(HAS_SCALE=True, INTERPRET=False, EVEN=dt == "bf16")  # both store paths
        ptrs = {"w_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": f"*{dt}"}
        yield decode_half_kernel, sig(decode_half_kernel, ptrs, consts), consts, options
    consts, options = fixed(FLOAT_META)
    consts["HAS_SCALE"] = True
    ptrs = {"w_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": "*fp32"}
    yield decode_float_kernel, sig(decode_float_kernel, ptrs, consts), consts, options
    consts, options = fixed(EPILOGUE_META)
    consts["HAS_BIAS"] = True
    ptrs = {"acc_ptr": "*i32", "qsum_ptr": "*i32", "sx_ptr": "*fp32", "scale_ptr": "*fp32", "bias_ptr": "*bf16",
            "y_ptr": "*bf16"}
    yield int_epilogue_kernel, sig(int_epilogue_kernel, ptrs, consts), consts, options
    for dt, dot, prec, a, rows in (("bf16", tl.bfloat16, "tf32", 32, 4), ("fp16", tl.float16, "tf32", 64, 1),
                                   ("fp32", tl.float32, "ieee", 64, 1)):  # the launcher's block 1024 and 4096 configs
        consts = {"A": a, "C": a, "ROWS": rows, "DOT": dot, "PRECISION": prec}
        ptrs = {"x_ptr": f"*{dt}", "s_ptr": "*i8", "ha_ptr": f"*{dt}", "hc_ptr": f"*{dt}", "y_ptr": f"*{dt}", "norm": "fp32"}
        yield hadamard_kernel, sig(hadamard_kernel, ptrs, consts), consts, {"num_warps": 4}


def _compile_all(arch: int) -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for fn, signature, constexprs, options in _specs():
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", arch, 32), options=options)


def _smallest_fit_99_kb() -> None:
    """The prune's last-resort configs (packed.SMALLEST) with fp32 x, the largest shared-memory
    footprint, at the most tokens of their family, fit the 99 KB an sm86/sm89 block may use."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from bitflux_kernels.packed import GEMM_CONFIGS, GEMV_CONFIGS, SMALLEST

    for family, tokens in ((GEMV_CONFIGS, 32), (GEMM_CONFIGS, 128)):
        fn, signature, consts, options = _packed_spec("fp32", tl.bfloat16, tl.float32, "ieee", False, False,
                                                      SMALLEST[family], tokens)
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                           target=GPUTarget("cuda", 86, 32), options=options)
        assert k.metadata.shared <= 99 * 1024, (SMALLEST[family], tokens, k.metadata.shared)


def test_kernels_compile_for_sm80_and_sm90():
    # one process an architecture, side by side: compiling is single-threaded and this process only waits
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    runs = [subprocess.Popen([sys.executable, __file__, arch], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for arch in ("80", "90")]
    for run in runs:
        _, stderr = run.communicate(timeout=300)
        assert run.returncode == 0, stderr[-4000:]


if __name__ == "__main__":
    _compile_all(int(sys.argv[1]))
    if sys.argv[1] == "80":
        _smallest_fit_99_kb()
