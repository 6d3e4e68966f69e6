#!/usr/bin/env bash
# Variants of block-recon on the miniature world, each scored by `bitflux eval` (issue 16):
#   benchmarks/block_recon_variants.sh [WORKDIR_PREFIX] [OUT.json]
# One calibration (tiny.yaml's, and one with every denoising step recorded) is made first and copied
# into each variant's workdir; each variant quantizes, packs (2bit) and is scored (192 prompts x 4 images).
set -euo pipefail
cd "$(dirname "$0")/.."
BITFLUX=${BITFLUX:-.venv/bin/bitflux}
PREFIX=${1:-runs/variants}
OUT=${2:-benchmarks/results/block-recon-variants.json}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
R=quantization.block_recon
declare -A VARIANTS=(
  [default]=""
  [gptq-init]="$R.init=gptq"
  [cosine]="$R.schedule=cosine"
  [cosine-3000-steps]="$R.schedule=cosine $R.steps=3000"
  [weight-lr-3e-5]="$R.weight_lr=3e-5"
  [weight-lr-3e-4-cosine]="$R.weight_lr=3e-4 $R.schedule=cosine"
  [per-call-loss]="$R.loss_norm=per-call"
  [high-noise-sigma2]="$R.noise_power=2"
  [train-bias]="$R.train_bias=true"
  [calib-20-timesteps]="calibration.timesteps=20"
  [distill-scales-only]="quantization.method=distill quantization.distill.weight_lr=0 quantization.distill.scale_lr=1e-4 quantization.distill.steps=1000"
)
for timesteps in 4 20; do
  "$BITFLUX" calibrate --workdir "$PREFIX-calib$timesteps" --set calibration.timesteps=$timesteps --json > /dev/null
done
for name in "${!VARIANTS[@]}"; do
  sets=(); for s in ${VARIANTS[$name]}; do sets+=(--set "$s"); done
  wd="$PREFIX-$name"; rm -rf "$wd"; mkdir -p "$wd"
  cp -r "$PREFIX-calib$([[ $name == calib-20-timesteps ]] && echo 20 || echo 4)/calib" "$wd/"
  "$BITFLUX" quantize --workdir "$wd" --json "${sets[@]}" > "$TMP/$name.quantize.json"
  "$BITFLUX" pack --workdir "$wd" --json > /dev/null
  "$BITFLUX" eval --workdir "$wd" --json > "$TMP/$name.eval.json"
  echo "$name ${VARIANTS[$name]}" >> "$TMP/names"
done
"${PYTHON:-.venv/bin/python}" - "$TMP" "$OUT" "$(git rev-parse --short HEAD)" <<'PY'
import json, sys
from pathlib import Path
tmp, out, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
rows = {}
for line in (tmp / "names").read_text().splitlines():
    name, *sets = line.split()
    e, q = (json.loads((tmp / f"{name}.{k}.json").read_text()) for k in ("eval", "quantize"))
    rows[name] = {"set": sets, "overall": e["overall"], "overall_stderr": e["overall_stderr"], "categories": e["categories"],
                  "velocity_rel_error": q["fidelity"]["velocity_rel_error"], "image_psnr_db": q["fidelity"]["image_psnr_db"]}
out.write_text(json.dumps({"command": "benchmarks/block_recon_variants.sh", "commit": commit, "fp_overall": 0.874,
                           "variants": rows}, indent=1) + "\n")
PY
