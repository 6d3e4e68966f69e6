#!/bin/bash
# Three more block-recon variants against the default, on the mini world: a calibration made once
# (`bitflux quantize --workdir $1/base`), copied into each run, then quantize, pack, eval (tiny.yaml,
# 192 prompts x 4 images). HEADFIT=S refits norm_out and proj_out (full precision, outside the blocks)
# for S Adam steps so that the student's last-block outputs give the teacher's recorded velocities.
# Usage: bash benchmarks/block_recon_variants2.sh RUNS_DIR
set -euo pipefail
R=$1
bitflux quantize --workdir "$R/base" --json > /dev/null
run() {  # name headfit seed [--set ...]
  local name=$1 headfit=$2 seed=$3; shift 3
  rm -rf "$R/$name"; mkdir -p "$R/$name"; cp -r "$R/base/calib" "$R/$name/"
  HEADFIT=$headfit HEADFIT_LR=1e-4 bitflux quantize --workdir "$R/$name" --json --set quantization.block_recon.seed=$seed "$@" > "$R/$name.quantize.json"
  bitflux pack --workdir "$R/$name" --json > /dev/null
  bitflux eval --workdir "$R/$name" --json > "$R/$name.eval.json"
}
run default 0 0
run default-seed1 0 1
run head-refit 2000 0
run head-refit-seed1 2000 1
run context-weight-3 0 0 --set quantization.block_recon.context_weight=3
run context-weight-0.3 0 0 --set quantization.block_recon.context_weight=0.3
