#!/bin/bash
# block-recon with per-input-channel scales folded into the modulation and V projections
# (quantization.block_recon.input_scales, methods/input_scales.py) against the default, at two training
# seeds, on the mini world: the default run makes the calibration, each other run copies it, then
# quantize, pack, eval (tiny.yaml, 192 prompts x 4 images). Writes $1/<name>.{quantize,eval}.json.
# Usage: bash benchmarks/block_recon_input_scales.sh RUNS_DIR   (about 2 min a run on 2 CPU cores)
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
run input-scales-lr1e-3 --set quantization.block_recon.input_scales=true
run input-scales --set quantization.block_recon.input_scales=true --set quantization.block_recon.input_scale_lr=1e-2
run default-seed1 --set quantization.block_recon.seed=1
run input-scales-seed1 --set quantization.block_recon.input_scales=true --set quantization.block_recon.input_scale_lr=1e-2 \
  --set quantization.block_recon.seed=1
