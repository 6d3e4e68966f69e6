#!/bin/bash
# block-recon's own options away from their defaults, against the default, on the mini world: a
# calibration made once (`bitflux quantize --workdir $1/base`, the default run), copied into each
# run, then quantize, pack, eval (tiny.yaml, 192 prompts x 4 images). Writes $1/<name>.eval.json.
# Usage: bash benchmarks/block_recon_knobs.sh RUNS_DIR   (about 3 min a run on 2 CPU cores)
set -euo pipefail
R=$1; mkdir -p "$R"
bitflux quantize --workdir "$R/base" --json > "$R/base.quantize.json"
bitflux pack --workdir "$R/base" --json > /dev/null
bitflux eval --workdir "$R/base" --json > "$R/default.eval.json"
source "$(dirname "$0")/variants.sh"
run() { fresh_from base "$1"; variant "$@"; }  # name --set ...
run inputs-fp --set quantization.block_recon.inputs=fp
run batch-32 --set quantization.block_recon.batch=32
run weight-lr-2e-4 --set quantization.block_recon.weight_lr=2e-4
run context-weight-3 --set quantization.block_recon.context_weight=3
run context-weight-0.3 --set quantization.block_recon.context_weight=0.3
run steps-500 --set quantization.block_recon.steps=500
run steps-250 --set quantization.block_recon.steps=250
