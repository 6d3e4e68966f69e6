#!/bin/bash
# block-recon with a look-ahead target (the next FP block's image-stream output on the student block's
# output, weight LOOKAHEAD) against the default, on the mini world: a calibration made once
# (`bitflux quantize --workdir $1/base`), copied into each run, then quantize, pack, eval
# (tiny.yaml, 192 prompts x 4 images). Usage: bash benchmarks/block_recon_lookahead.sh RUNS_DIR
set -euo pipefail
R=$1
bitflux quantize --workdir "$R/base" --json > /dev/null
run() {  # name lookahead seed
  rm -rf "$R/$1"; mkdir -p "$R/$1"; cp -r "$R/base/calib" "$R/$1/"
  LOOKAHEAD=$2 bitflux quantize --workdir "$R/$1" --json --set quantization.block_recon.seed=$3 > "$R/$1.quantize.json"
  bitflux pack --workdir "$R/$1" --json > /dev/null
  bitflux eval --workdir "$R/$1" --json > "$R/$1.eval.json"
}
run default 0 0
run lookahead1 1 0
run lookahead3 3 0
run default-seed1 0 1
run lookahead1-seed1 1 1
