#!/bin/bash
# Two block-recon variants aimed at the held-out gap (benchmarks/results/split-gap.json: 0.986x FP on the
# training captions, 0.945x held out): a prior towards the act-aware weight error
# (quantization.block_recon.weight_prior) and a loss on convex mixes of two calls' block inputs with the
# FP block's outputs on them as target (quantization.block_recon.mixup). The default run makes the
# calibration, each other run copies it; quantize, pack, eval (tiny.yaml, 192 prompts x 4 images).
# Usage: bash benchmarks/block_recon_generalisation.sh RUNS_DIR   (2-4 min a run on 2 CPU cores)
set -euo pipefail
R=$1
run() {  # name --set ...
  local name=$1; shift
  if [ "$name" != default ]; then rm -rf "${R:?}/$name"; mkdir -p "$R/$name"; cp -r "$R/default/calib" "$R/$name/"; fi
  bitflux quantize --workdir "$R/$name" --json "$@" > "$R/$name.quantize.json"
  bitflux pack --workdir "$R/$name" --json > /dev/null
  bitflux eval --workdir "$R/$name" --json > "$R/$name.eval.json"
}
run default
run weight-prior-0.01 --set quantization.block_recon.weight_prior=0.01
run weight-prior-0.003 --set quantization.block_recon.weight_prior=0.003
run mixup-1 --set quantization.block_recon.mixup=1
