#!/bin/bash
# block-recon with a text-token swap augmentation (quantization.block_recon.text_swap): each step also
# matches the FP block on the batch's inputs with a share of the text tokens replaced by another
# call's at the same positions (word combinations the calibration captions do not have, drawn at
# random, no held-out caption looked at), against the default at two seeds. The calibration is made
# once and copied into each run; then quantize, pack, eval (tiny.yaml, 192 prompts x 4 images).
# Usage: bash benchmarks/block_recon_text_swap.sh RUNS_DIR   (about 5 min a run on 2 CPU cores)
set -euo pipefail
R=$1; mkdir -p "$R"
bitflux quantize --workdir "$R/base" --json > "$R/base.quantize.json"
bitflux pack --workdir "$R/base" --json > /dev/null
bitflux eval --workdir "$R/base" --json > "$R/default.eval.json"
source "$(dirname "$0")/variants.sh"
run() { fresh_from base "$1"; variant "$@"; }  # name --set ...
run default-seed1 --set quantization.block_recon.seed=1
run text-swap --set quantization.block_recon.text_swap=1
run text-swap-seed1 --set quantization.block_recon.text_swap=1 --set quantization.block_recon.seed=1
