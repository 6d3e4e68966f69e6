"""How fast does block-recon train? Steps per second of each block of the embedded model, for each
``block_recon.rounding``, on a workdir's calibration (make demo's), in this process's threads.

It times ``BlockRecon`` block by block in execution order, as ``bitflux quantize`` runs it: a block's
time includes its act-aware start and the push of the student's activations through it, beside its
steps. Usage (about 2 min on 2 CPU cores, after ``make demo``; run it alone, and compare only runs
alternated with each other: this machine's speed moves by the hour):
    python benchmarks/block_recon_rate.py runs/demo benchmarks/results/block-recon-rate.json
"""

import argparse
import json
import os
import sys
import time

import torch
from paired_seeds import commit  # benchmarks/, the script's own folder

from bitflux_cli.calibrate import load_calibration
from bitflux_cli.config import load_config
from bitflux_cli.methods.block_recon import BlockRecon
from bitflux_cli.streaming import block_names, load_block
from bitflux_cli.teacher import fp_pipeline


def rates(workdir: str, rounding: str, steps: int) -> dict[str, float]:
    """{block: steps per second} of block-recon with ``rounding`` at ``steps`` steps a block."""
    cfg = load_config(None, {"workdir": workdir, "quantization.block_recon.steps": steps,
                             "quantization.block_recon.rounding": rounding})
    calib = load_calibration(cfg)
    with fp_pipeline(cfg, stream=True) as (pipe, weights):
        pass
    run = BlockRecon(cfg, pipe.transformer, calib)
    out = {}
    for name in block_names(pipe.transformer):
        block = load_block(pipe.transformer, weights, name, run.device)
        start = time.perf_counter()
        run(name, block)
        out[name] = round(steps / (time.perf_counter() - start), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="a workdir with the embedded model's calibration (make demo's: runs/demo)")
    parser.add_argument("out", help="results JSON")
    parser.add_argument("--steps", type=int, default=300, help="steps a block (default 300)")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "OMP_NUM_THREADS"}
    result = {"command": " ".join(["python", *sys.argv]), "commit": commit(), "environment": env,
              "threads": torch.get_num_threads(), "steps": args.steps, "steps_per_second": {}}
    for rounding in ("ste", "adaround"):
        result["steps_per_second"][rounding] = rates(args.workdir, rounding, args.steps)
        print(rounding, result["steps_per_second"][rounding], flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
