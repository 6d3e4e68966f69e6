"""Instructions per weight of the ternary kernels, from SASS compiled offline (no GPU needed).

Each kernel is compiled with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` (the third
argument is the warp size), Triton's bundled ptxas builds the cubin and its bundled ``cuobjdump``
lists the SASS. A kernel with a K loop is judged by its hottest loop (the backward branch whose
body holds the most instructions, i.e. the K loop after unrolling, or the decode's word loop); a
loop-free kernel (the int32 epilogue) by its whole body. Each kernel is compiled as Triton's JIT
compiles it for one FLUX-shaped launch (``specialize``: the row's runtime integers, tensors 16-byte
aligned): every pointer and every integer divisible by 16 gets ``tt.divisibility = 16`` and an
integer equal to 1 (a unit stride) becomes a constant. Without that no load or store vectorizes;
with only part of it (pointers and row strides, as this script did before) the compiler picks
16-byte layouts it then cannot load as vectors, and the count describes a kernel no launch runs.
Thread-instructions per weight = SASS instructions x 32 x num_warps / weights one program handles
per loop trip (or in total). For the decodes the weights of a trip are counted from the loop's own
global loads (4 weights a byte, every thread): LLVM may unroll the word loop further than its
``loop_unroll_factor`` (the raw-fields decode's body holds four chunks, not two), and a count from
the tile sizes would then charge one trip's instructions to half its weights. An H100 issues about 31e12 thread-instructions/s
(132 SMs x 4 schedulers x 32 lanes x 1.83 GHz); at 3.35 TB/s that allows about 2.3 per weight for
a kernel that reads only the 2-bit weights, and about 20 (bf16 out) / 11 (int8 out) for a decode
that writes 2 / 1 bytes a weight.

    TRITON_DEFAULT_FP_FUSION=1 python benchmarks/kernel_instructions.py [--arch 80 90] [--json out.json] [--only decode GEMV]

Prints a table and writes JSON (stdout with ``--json -``).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"  # before triton defines the kernels

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402  the JIT's own argument specialization
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bitflux_kernels.act_quant import SPACE as ACT_QUANT_SPACE, act_quant_kernel  # noqa: E402
from bitflux_kernels.decode import FIELDS_META, HALF_META, decode_fields_kernel, decode_half_kernel  # noqa: E402
from bitflux_kernels.packed import GEMM_CONFIGS, GEMV_CONFIGS, packed_kernel  # noqa: E402
from bitflux_kernels.hadamard_triton import hadamard_kernel  # noqa: E402
from bitflux_kernels.large_m import EPILOGUE_META, int_epilogue_kernel  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
# a SASS line: "        /*0130*/                   LDG.E.U8 R2, desc[UR4][R2.64] ;"
SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?);")


def _sig(fn, ptrs, consts):
    return {a: ptrs.get(a, "constexpr" if a in consts else "i32") for a in fn.arg_names}


PACKED_DTYPES = {"bf16": (tl.bfloat16, tl.bfloat16, "tf32"), "fp16": (tl.float16, tl.float16, "tf32"),
                 "fp32": (tl.bfloat16, tl.float32, "ieee")}  # x dtype -> (pattern, dot operand, dot precision)


def packed_args(cfg: tuple, tokens: int, x: str = "bf16", one_split: bool = False, has_xscale: bool = False):
    """(signature, constexprs, options) of ``packed_kernel`` for autotune config ``cfg`` = (BLOCK_N,
    BLOCK_W, num_warps, num_stages) at ``tokens`` a program, activations of dtype ``x``."""
    bn, bw, warps, stages = cfg
    pattern, dot, precision = PACKED_DTYPES[x]
    c = {"ONE_SPLIT": one_split, "HAS_XSCALE": has_xscale, "HAS_BIAS": True, "PATTERN": pattern, "DOT": dot,
         "PRECISION": precision, "BLOCK_N": bn, "BLOCK_W": bw, "TOKENS": tokens}
    p = {"xp_ptr": f"*{x}", "w_ptr": "*u8", "part_ptr": "*fp32", "sx_ptr": "*fp32", "scale_ptr": "*fp32",
         "bias_ptr": f"*{x}", "y_ptr": f"*{x}"}
    return _sig(packed_kernel, p, c), c, {"num_warps": warps, "num_stages": stages}


def specs():
    """(name, kernel, signature, constexprs, options, weights per loop trip or per program (None: counted
    from the loop's global loads), looped, runtime ints).

    The runtime integers are one FLUX.1-dev launch of the path the kernel serves: the packed kernel
    as a GEMM at M = 256 (128 tokens a program, N = K = 3072, 6 splits of 32 words), as a GEMV at
    M = 1 on ``norm1.linear`` (N = 18432,
    K = 3072: 192 words a row, 2 splits of 96), the decodes and the int32 epilogue on a
    3072 x 3072 weight at M = 4608, act_quant on 4608 tokens of K = 3072 (its quantize loop; "weights"
    are activations there). All row-major and contiguous.
    """
    rows = []
    gemm = {"M": 256, "N": 3072, "KW": 192, "WPS": 32, "stride_wn": 192, "stride_ym": 3072}  # split_count: 6 splits
    for has_sx, name, cfg in ((False, "W2A16", GEMM_CONFIGS[2]), (False, "W2A16", GEMM_CONFIGS[1]),
                              (True, "W2A8", GEMM_CONFIGS[2])):
        bn, bw, warps, _ = cfg
        rows.append((f"GEMM {name} M=256, {bn}x({bw}x16) x 128 tokens, {warps} warps, split-K", packed_kernel,
                     *packed_args(cfg, 128, has_xscale=has_sx), bn * bw * 16, True, gemm))
    gemv = {"M": 1, "N": 18432, "KW": 192, "WPS": 96, "stride_wn": 192, "stride_ym": 18432}
    for has_sx, name in ((False, "W2A16"), (True, "W2A8")):
        for cfg in (GEMV_CONFIGS[0], GEMV_CONFIGS[3]):
            bn, bw, warps, _ = cfg
            rows.append((f"GEMV {name} M=1, {bn}x({bw}x16), {warps} warps, split-K", packed_kernel,
                         *packed_args(cfg, 16, has_xscale=has_sx), bn * bw * 16, True, gemv))
    dec = {"N": 3072, "ROWS": 3072, "KW": 192, "stride_wn": 192}  # strides in 32-bit words
    for fp8, name in ((False, "decode -> raw fields u (W2A8 int8)"), (True, "decode -> e4m3 2 x codes (W2A8 fp8)")):
        c = {**{k: v for k, v in FIELDS_META.items() if k != "num_warps"}, "FP8": fp8, "EVEN": True}
        p = {"w_ptr": "*u8", "out_ptr": "*u8"}
        rows.append((name, decode_fields_kernel, _sig(decode_fields_kernel, p, c), c,
                     {"num_warps": FIELDS_META["num_warps"]}, None, True, {**dec, "stride_on": 768}))
    c = {**{k: v for k, v in HALF_META.items() if k != "num_warps"}, "HAS_SCALE": True, "INTERPRET": False, "EVEN": True}
    p = {"w_ptr": "*u8", "scale_ptr": "*fp32", "out_ptr": "*bf16"}
    rows.append(("decode -> bf16 codes x scale", decode_half_kernel, _sig(decode_half_kernel, p, c), c,
                 {"num_warps": HALF_META["num_warps"]}, None, True,
                 {**dec, "stride_on": 1536}))
    c = {**{k: v for k, v in EPILOGUE_META.items() if k != "num_warps"}, "HAS_BIAS": True}
    p = {"acc_ptr": "*i32", "qsum_ptr": "*i32", "sx_ptr": "*fp32", "scale_ptr": "*fp32", "bias_ptr": "*bf16",
         "y_ptr": "*bf16"}
    rows.append(("int32 epilogue (per output, not weight)", int_epilogue_kernel, _sig(int_epilogue_kernel, p, c), c,
                 {"num_warps": EPILOGUE_META["num_warps"]}, c["BLOCK_M"] * c["BLOCK_N"], False,
                 {"M": 4608, "N": 3072, "stride_am": 3072, "stride_ym": 3072}))
    aq = {"M": 4608, "K": 3072, "KP": 3072, "stride_xm": 3072, "stride_xk": 1, "stride_qm": 3072, "M_BUCKET": 4096}
    for cfg in ACT_QUANT_SPACE.prune(ACT_QUANT_SPACE.configs(), aq):  # every config the autotuner may pick there
        rows_k, warps = (cfg.kwargs["ROWS"], cfg.kwargs["BLOCK_K"]), cfg.num_warps
        for fp8, name, q in ((False, "int8", "*i8"), (True, "fp8 e4m3 bytes", "*u8")):
            c = {**cfg.kwargs, "FP8": fp8, "BYTES": fp8, "HAS_SUM": not fp8, "PERMUTED": False}
            p = {"x_ptr": "*bf16", "q_ptr": q, "s_ptr": "*fp32", "sum_ptr": "*i32"}
            rows.append((f"act_quant -> {name}, {rows_k[0]}x{rows_k[1]}, {warps} warps (per activation)", act_quant_kernel,
                         _sig(act_quant_kernel, p, c), c, {"num_warps": warps}, rows_k[0] * rows_k[1], True, aq))
    for k, (a, rows_m) in ((15360, (32, 4)), (12288, (64, 1))):  # single blocks' proj_out (b = 1024); ff.net.2 (b = 4096)
        c = {"A": a, "C": a, "ROWS": rows_m, "DOT": tl.bfloat16, "PRECISION": "tf32"}
        p = {"x_ptr": "*bf16", "s_ptr": "*i8", "ha_ptr": "*bf16", "hc_ptr": "*bf16", "y_ptr": "*bf16", "norm": "fp32"}
        rows.append((f"hadamard x R, block {a * a}, {rows_m} rows (per activation)", hadamard_kernel,
                     _sig(hadamard_kernel, p, c), c, {"num_warps": 4}, rows_m * a * a, False,
                     {"M": 4608, "stride_xm": k, "stride_ym": k}))
    return rows


def specialize(fn, signature: dict, consts: dict, ints: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's JIT builds them for a launch with the runtime
    integers ``ints`` (every integer argument must be given) and 16-byte-aligned tensors (torch's
    allocations): integers go through the JIT's own ``native_specialize_impl`` (1 -> constexpr,
    a multiple of 16 -> ``tt.divisibility``), pointers get ``tt.divisibility`` 16."""
    signature, consts, attrs = dict(signature), dict(consts), {}
    for i, a in enumerate(fn.arg_names):
        if signature[a] in ("constexpr", "fp32"):  # a float argument is not specialized
            continue
        if signature[a].startswith("*"):
            attrs[(i,)] = CUDABackend.parse_attr("D")
            continue
        kind, spec = native_specialize_impl(CUDABackend, ints[a], False, True, True)
        if kind == "constexpr":
            signature[a], consts[a] = "constexpr", ints[a]
        else:
            signature[a], attrs[(i,)] = kind, CUDABackend.parse_attr(spec)
    return signature, consts, attrs


def sass(cubin: bytes) -> list[str]:
    """SASS instructions (opcode and operands, in order) of a cubin, via Triton's bundled cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for line in text.splitlines() if (m := SASS_LINE.match(line))]


def hottest_loop(code: list) -> list[str]:
    """Instructions of the largest [target, branch] region closed by a backward BRA."""
    best = []
    for i, (addr, ins) in enumerate(code):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", ins)  # cuobjdump prints branch targets as `(0x...)
        if target and int(target.group(1), 16) <= addr:
            start = int(target.group(1), 16)
            body = [x for a, x in code if start <= a <= addr]
            best = max(best, body, key=len)
    return best


LOAD_BYTES = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def opcode(ins: str) -> list[str]:
    """"@P0 STG.E.128 [R2], R4" -> ["STG", "E", "128"]."""
    return ins.split()[1 if ins.startswith("@") else 0].split(".")


def loaded_weights(body: list[str], threads: int) -> int:
    """Packed weights the global loads of ``body`` bring in: 4 a byte, for every thread."""
    loads = [op for op in map(opcode, body) if op[0] == "LDG"]
    return 4 * threads * sum(next((LOAD_BYTES[m] for m in op if m in LOAD_BYTES), 4) for op in loads)


def measure(arch: int, only: tuple[str, ...] = ("",)) -> list[dict]:
    out = []
    for name, fn, signature, consts, options, weights, looped, ints in specs():
        if not any(o in name for o in only):
            continue
        signature, consts, attrs = specialize(fn, signature, consts, ints)
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", arch, 32), options=options)
        code = [(a, ins) for a, ins in sass(k.asm["cubin"]) if not ins.startswith("NOP")]
        body = hottest_loop(code) if looped else [ins for _, ins in code]
        ops = Counter(opcode(ins)[0] for ins in body)
        threads = 32 * options["num_warps"]
        weights = weights or loaded_weights(body, threads)
        out.append({"kernel": name, "arch": f"sm{arch}", "num_warps": options["num_warps"], "region": "K loop" if looped else "whole kernel",
                    "launch": ints, "sass_instructions": len(body), "weights": weights,
                    "thread_instructions_per_weight": round(len(body) * threads / weights, 3),
                    "top_opcodes": dict(ops.most_common(8)),
                    "opcodes": dict(Counter(".".join(opcode(ins)) for ins in body).most_common())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--json", help="write the rows here ('-' for stdout)")
    ap.add_argument("--only", nargs="+", default=[""], help="only the kernels whose name contains one of these")
    args = ap.parse_args()
    rows = [r for arch in args.arch for r in measure(arch, tuple(args.only))]
    if args.json == "-":
        json.dump(rows, sys.stdout, indent=1)
        return
    print(f"{'kernel':44} {'arch':5} {'region':12} {'SASS':>6} {'weights':>8} {'instr/weight':>12}  top opcodes")
    for r in rows:
        top = " ".join(f"{op}:{n}" for op, n in list(r["top_opcodes"].items())[:5])
        print(f"{r['kernel']:44} {r['arch']:5} {r['region']:12} {r['sass_instructions']:6d} {r['weights']:8d} "
              f"{r['thread_instructions_per_weight']:12.3f}  {top}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
