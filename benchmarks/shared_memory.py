"""Shared memory of every packed-kernel config, compiled offline (no GPU), against each GPU's limit.

Compiles ``packed_kernel`` for every autotune config of its space (packed.GEMV_CONFIGS at 16 and 32
tokens, GEMM_CONFIGS at 64 and 128), every x dtype (bf16, fp16, fp32) and both epilogues, for
sm80 (A100: 163 KB a block), sm86 (A10, and sm89's L4 / RTX 4090: 99 KB) and sm90 (H100/H200:
227 KB), specialized as kernel_instructions.py does, and reports ``metadata.shared``. A config
over the limit fails to compile on that GPU; the autotuner skips it when it has another candidate,
which is why the prune always keeps ``packed.SMALLEST``.

    TRITON_DEFAULT_FP_FUSION=1 python benchmarks/shared_memory.py [--json out.json]   # ~9 min on 2 cores
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_instructions import PACKED_DTYPES, packed_args, specialize  # noqa: E402  (turns the interpreter off first)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from bitflux_kernels.packed import GEMM_CONFIGS, GEMV_CONFIGS, SMALLEST, packed_kernel  # noqa: E402

LIMIT_KB = {80: 163, 86: 99, 90: 227}


def measure() -> list[dict]:
    rows = []
    ints = {"M": 3, "N": 3072, "KW": 192, "WPS": 96, "stride_wn": 192, "stride_ym": 3072}
    for arch, limit in LIMIT_KB.items():
        for xdt in PACKED_DTYPES:
            for family, tokens in ((GEMV_CONFIGS, 16), (GEMV_CONFIGS, 32), (GEMM_CONFIGS, 64), (GEMM_CONFIGS, 128)):
                for cfg in family:
                    shared = []
                    for one_split in (False, True):
                        signature, consts, options = packed_args(cfg, tokens, xdt, one_split)
                        sig, consts, attrs = specialize(packed_kernel, signature, consts, ints)
                        k = triton.compile(ASTSource(fn=packed_kernel, signature=sig, constexprs=consts, attrs=attrs),
                                           target=GPUTarget("cuda", arch, 32), options=options)
                        shared.append(k.metadata.shared)
                    rows.append({"arch": f"sm{arch}", "x": xdt, "tokens": tokens, "config": list(cfg),
                                 "smallest": cfg == SMALLEST[family], "shared_kb": round(max(shared) / 1024, 1),
                                 "limit_kb": limit, "fits": max(shared) <= limit * 1024})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    rows = measure()
    for r in rows:
        if not r["fits"] or r["smallest"]:
            print(f"{r['arch']} x={r['x']} tokens={r['tokens']:3d} config={r['config']} {r['shared_kb']:6.1f} KB "
                  f"(limit {r['limit_kb']}){'' if r['fits'] else '  OVER'}{'  [smallest]' if r['smallest'] else ''}")
    print(f"{sum(not r['fits'] for r in rows)} of {len(rows)} over the limit")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "triton": triton.__version__,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
