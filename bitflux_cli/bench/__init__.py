"""The bench stage: storage accounting, memory and latency projection, measured mode on CUDA.

Entry point: ``run_bench(cfg, gpu, random_weights, plot) -> dict``; ``render_table(report)`` gives
the terminal table.
"""

from .report import render_table, run_bench

__all__ = ["render_table", "run_bench"]
