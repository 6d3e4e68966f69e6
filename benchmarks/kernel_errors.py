"""Largest relative error ||y - ref|| / ||ref|| of the packed kernel over the kernel tests' shapes.

M in {1, 3, 33} x ``tests/test_kernels_common.SHAPES`` (scaled FLUX and odd N/K), against the
float64 reference, in Triton's interpreter on CPU (the table in docs/KERNELS.md):

    python benchmarks/kernel_errors.py
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton defines the kernels
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
from test_kernels_common import SHAPES, case, rel_err  # noqa: E402

from bitflux_kernels.packed import packed_gemm  # noqa: E402
from bitflux_kernels.reference import ternary_linear_reference  # noqa: E402

ROWS = {"W2A16 vs float64 reference": ("none", "none"),
        "W2A8 vs reference with int8 activations": ("int8", "int8"),
        "W2A8 vs W2A16 reference (int8 rounding)": ("int8", "none"),
        "W2A8 fp8 vs reference with fp8 activations": ("fp8", "fp8"),
        "W2A8 fp8 vs W2A16 reference (e4m3 rounding)": ("fp8", "none")}


def main() -> None:
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    print("| | fp32 x | fp16 x | bf16 x |\n|---|---|---|---|")
    for name, (mode, ref_mode) in ROWS.items():
        worst = []
        for dtype in dtypes:
            errs = []
            for m in (1, 3, 33):
                for n, k in SHAPES:
                    x, packed, scale, bias, _ = case(m, n, k, dtype)
                    y = packed_gemm(x, packed, scale, bias, k, activations=mode)
                    errs.append(rel_err(y, ternary_linear_reference(x, packed, scale, bias, k, ref_mode)))
            worst.append(max(errs))
        print(f"| {name} | " + " | ".join(f"{e:.1e}" if e else "0" for e in worst) + " |")


if __name__ == "__main__":
    main()
