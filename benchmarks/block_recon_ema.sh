#!/bin/bash
# block-recon with the latent weights and scales replaced at the end of each block by their Polyak
# average over its steps (quantization.block_recon.ema, the decay; 0 is off), against the default, on
# the mini world: after `make demo`, runs/demo is the default; each run copies its calibration, then
# quantize, pack, eval (tiny.yaml, 192 prompts x 4 images). Writes $1/<name>.{quantize,eval}.json.
# Usage: bash benchmarks/block_recon_ema.sh RUNS_DIR   (about 3 min a run on 2 CPU cores)
set -euo pipefail
R=$1
mkdir -p "$R"
bitflux eval --workdir runs/demo --json > "$R/default.eval.json"
run() {  # name --set ...
  local name=$1; shift
  rm -rf "${R:?}/$name"; mkdir -p "$R/$name"; cp -r runs/demo/calib "$R/$name/"
  bitflux quantize --workdir "$R/$name" --json "$@" > "$R/$name.quantize.json"
  bitflux pack --workdir "$R/$name" --json > /dev/null
  bitflux eval --workdir "$R/$name" --json > "$R/$name.eval.json"
}
run ema-0.99 --set quantization.block_recon.ema=0.99
run ema-0.995 --set quantization.block_recon.ema=0.995
