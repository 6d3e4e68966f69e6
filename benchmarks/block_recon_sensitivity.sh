#!/bin/bash
# block-recon with a second loss: the change of the student block's outputs when each call's text stream
# moves sensitivity_eps of the way towards another call's must match the FP block's change (a finite-
# difference Jacobian match, quantization.block_recon.sensitivity_weight), against the default, on
# the mini world: after `make demo`, runs/demo is the default; each run copies its calibration, then
# quantize, pack, eval (tiny.yaml, 192 prompts x 4 images). Writes $1/<name>.{quantize,eval}.json.
# Usage: bash benchmarks/block_recon_sensitivity.sh RUNS_DIR   (about 5 min a run on 2 CPU cores)
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
run sens-1-0.1 --set quantization.block_recon.sensitivity_weight=1
run sens-1-0.3 --set quantization.block_recon.sensitivity_weight=1 --set quantization.block_recon.sensitivity_eps=0.3
