#!/usr/bin/env bash
# A rotation per attention head folded exactly into the mini model's values and attention outputs
# (benchmarks/fold_head_rotation.py: no online Hadamard, format and kernels unchanged), then block-recon with
# learned rounding (block_recon.rounding=adaround) on it, against the same adaround on the unturned model, at
# training seeds $SEEDS. The folded model calibrates itself (its attention outputs differ, its block outputs
# do not); the unturned runs copy make demo's calibration. Runs: hr-s<seed> (folded), w2-s<seed> (unturned),
# as block_recon_adaround.sh names its adaround runs. About 4 min a run on 2 CPU cores, after make demo:
#   [SEEDS='0 1 2 3 4'] [ROT_SEED=1234] benchmarks/block_recon_head_rotation.sh RUNS OUT.json
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/variants.sh
export PATH=$PWD/.venv/bin:$PATH
R=${1:-runs}/head-rotation; OUT=${2:-benchmarks/results/block-recon-head-rotation.json}
SEEDS=${SEEDS:-0 1 2 3 4}; ROT_SEED=${ROT_SEED:-1234}
mkdir -p "$R"; rm -rf "$R/demo"; ln -s "$PWD/runs/demo" "$R/demo"
M="--set model.path=$(realpath -m "$R/model")"  # quantize reads it; pack and eval need only the bundled
# text encoders and VAE besides the packed transformer, and the copy holds those byte for byte
[[ -f $R/model/transformer.safetensors ]] || python benchmarks/fold_head_rotation.py "$R/model" --seed "$ROT_SEED"
[[ -d $R/cal/calib ]] || bitflux calibrate --workdir "$R/cal" $M > /dev/null
for s in $SEEDS; do
  [[ -f $R/hr-s$s.eval.json ]] || { fresh_from cal "hr-s$s"
    variant "hr-s$s" $M --set quantization.block_recon.rounding=adaround --set quantization.block_recon.seed=$s; }
  [[ -f $R/w2-s$s.eval.json ]] || { fresh_from demo "w2-s$s"
    variant "w2-s$s" --set quantization.block_recon.rounding=adaround --set quantization.block_recon.seed=$s; }
done
python benchmarks/paired_seeds.py "$R" "$OUT" --base adaround=w2-s{seed} --new head-rotation+adaround=hr-s{seed} \
  --seeds $SEEDS --command "SEEDS='$SEEDS' ROT_SEED=$ROT_SEED benchmarks/block_recon_head_rotation.sh ${1:-runs} $OUT"
