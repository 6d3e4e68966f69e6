#!/bin/bash
# block-recon with each row's ternary threshold trained jointly with the latent weights and scales
# (quantization.block_recon.threshold_lr, a sigmoid surrogate gradient; methods/ste.py) against the
# default, at two training seeds, on the mini world: the default run makes the calibration, each other
# run copies it, then quantize, pack, eval (tiny.yaml, 192 prompts x 4 images). Writes $1/<name>.{quantize,eval}.json.
# Usage: bash benchmarks/block_recon_thresholds.sh RUNS_DIR   (about 2.5 min a run on 2 CPU cores)
set -euo pipefail
R=$1
run() {  # name --set ...
  local name=$1; shift
  if [ "$name" != default ]; then rm -rf "${R:?}/$name"; mkdir -p "$R/$name"; cp -r "$R/default/calib" "$R/$name/"; fi
  bitflux quantize --workdir "$R/$name" --json "$@" > "$R/$name.quantize.json"
  bitflux pack --workdir "$R/$name" --json > /dev/null
  bitflux eval --workdir "$R/$name" --json > "$R/$name.eval.json"
}
[ -n "${SKIP_DEFAULTS:-}" ] || run default
[ -n "${SKIP_DEFAULTS:-}" ] || run default-seed1 --set quantization.block_recon.seed=1
run thresholds-1e-3 --set quantization.block_recon.threshold_lr=1e-3
run thresholds-1e-2 --set quantization.block_recon.threshold_lr=1e-2
run thresholds-1e-3-seed1 --set quantization.block_recon.threshold_lr=1e-3 --set quantization.block_recon.seed=1
