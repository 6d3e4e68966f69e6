#!/usr/bin/env bash
# Block-recon with AdaRound's learned rounding on the ternary grid (quantization.block_recon.rounding=adaround: each
# weight's code is floor(w / s) or the grid point above it, a soft choice annealed to a hard one, as BRECQ does)
# against the default (STE latent weights), at training seeds $SEEDS on make demo's calibration; FLAGS are added to the
# adaround runs only (e.g. FLAGS='--set quantization.rotation=hadamard', named by TAG: runs w2<TAG>-s<seed>):
#   [SEEDS='0 1'] [LR=1e-1] [LAMBDA=1] [FLAGS=... TAG=...] benchmarks/block_recon_adaround.sh RUNS OUT.json
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/variants.sh
export PATH=$PWD/.venv/bin:$PATH
R=${1:-runs}/adaround; OUT=${2:-benchmarks/results/block-recon-adaround.json}
LR=${LR:-1e-1}; LAMBDA=${LAMBDA:-1}; FLAGS=${FLAGS:-}; TAG=${TAG:-}
SEEDS=${SEEDS:-0 1}
mkdir -p "$R"; rm -rf "$R/demo"; ln -s "$PWD/runs/demo" "$R/demo"
for s in $SEEDS; do
  for w in 2 1; do  # 2: adaround, 1: the default
    name=w$w$([[ $w == 2 ]] && echo "$TAG" || true)-s$s
    [[ -f "$R/$name.eval.json" ]] && continue
    fresh_from demo "$name"
    if [[ $w == 2 ]]; then
      variant "$name" --set quantization.block_recon.rounding=adaround --set quantization.block_recon.rounding_lr=$LR \
        --set quantization.block_recon.rounding_weight=$LAMBDA --set quantization.block_recon.seed=$s $FLAGS
    else
      variant "$name" --set quantization.block_recon.seed=$s
    fi
  done
done
flags=$([[ -n $FLAGS ]] && echo "FLAGS='$FLAGS' TAG=$TAG " || true)
python benchmarks/paired_seeds.py "$R" "$OUT" --base default=w1-s{seed} --new adaround="w2$TAG-s{seed}" --seeds $SEEDS \
  --command "SEEDS='$SEEDS' LR=$LR LAMBDA=$LAMBDA ${flags}benchmarks/block_recon_adaround.sh ${1:-runs} $OUT"
