#!/usr/bin/env bash
# The optional rotation (quantization.rotation=hadamard) against the default, both block-recon, at several
# training seeds on one calibration:
#   [SEEDS='0 1'] [RESIDUAL_RANK=r] benchmarks/rotation_seeds.sh [RUNS] [OUT.json]   (after make demo: its calibration is copied)
# For each seed s in $SEEDS, RUNS/rot-seeds/{plain,hadamard}-s<s> quantize (block_recon.seed=s), pack 2bit and
# are scored by `bitflux eval --suite mini` (192 prompts x 4 images). OUT gets per seed both scores and their
# paired difference (same prompts and image seeds), then the mean difference over seeds with its standard
# error across seeds, the storage each costs and the commit ("+changes" when tracked files differed).
# RESIDUAL_RANK > 0 runs both sides with a low-rank residual of that rank (quantization.residual_rank), in
# RUNS/rot-seeds/{plain,hadamard}-r<r>-s<s>: does the rotation add to the residual?
# About 3.5 min a run on 2 CPU cores: 35 min for the default five seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
BITFLUX=${BITFLUX:-.venv/bin/bitflux}
RUNS=${1:-runs}/rot-seeds
OUT=${2:-benchmarks/results/rotation-seeds.json}
SEEDS=${SEEDS:-0 1 2 3 4}
RESIDUAL=${RESIDUAL_RANK:-0}  # not RANK: torchrun's variable
TAG=$([[ $RESIDUAL == 0 ]] || echo "-r$RESIDUAL")
test -d runs/demo/calib || { echo "rotation_seeds.sh: run make demo first (its calibration is reused)" >&2; exit 2; }
mkdir -p "$RUNS"
for s in $SEEDS; do
    for kind in plain hadamard; do
        w="$RUNS/$kind$TAG-s$s"
        [[ -f "$w.eval.json" ]] && continue  # resumable: a finished run is kept
        rm -rf "$w"; mkdir -p "$w"; cp -r runs/demo/calib "$w/"
        rot=$([[ $kind == plain ]] && echo none || echo hadamard)
        "$BITFLUX" quantize --workdir "$w" --set "quantization.rotation=$rot" --set "quantization.block_recon.seed=$s" \
            --set "quantization.residual_rank=$RESIDUAL" --json > "$w.quantize.json"
        "$BITFLUX" pack --workdir "$w" --json > "$w.pack.json"
        "$BITFLUX" eval --workdir "$w" --json > "$w.eval.json.tmp" && mv "$w.eval.json.tmp" "$w.eval.json"
    done
done
rank=$([[ $RESIDUAL == 0 ]] || echo "RESIDUAL_RANK=$RESIDUAL ")
"${PYTHON:-.venv/bin/python}" benchmarks/paired_seeds.py "$RUNS" "$OUT" --base "plain=plain$TAG-s{seed}" \
    --new "hadamard=hadamard$TAG-s{seed}" --seeds $SEEDS --command "SEEDS='$SEEDS' ${rank}benchmarks/rotation_seeds.sh ${1:-runs} $OUT"
