#!/bin/bash
# block-recon calibrated on a prompt mix weighted to counting, the category the 1.58-bit model loses
# (0.65 against FP's 0.88), against the default mix (`mini`: the world's training captions, 64 a
# category): the same 384 prompts, with 128 counting captions, 32 single-object and 32 colour ones
# (all from the training split). Each run calibrates, quantizes, packs and scores (tiny.yaml, 192
# held-out prompts x 4 images); writes $1/<name>.eval.json.
# Usage: bash benchmarks/calibration_mix.sh RUNS_DIR   (about 2-4 min a run on 2 CPU cores)
set -euo pipefail
R=$1
mkdir -p "$R"
python - "$R/prompts-counting.txt" <<'PY'
import sys
from bitflux_cli.miniworld.world import CATEGORIES, balanced_prompts
per = {"single_object": 32, "two_object": 64, "counting": 128, "colors": 32, "position": 64, "color_attr": 64}
captions = [s.caption for c in CATEGORIES for s in balanced_prompts("train", seed=0, per_category=per[c]) if s.category == c]
open(sys.argv[1], "w").write("\n".join(captions) + "\n")
PY
source "$(dirname "$0")/variants.sh"
rm -rf "$R/default" "$R/counting-weighted"
variant default
variant counting-weighted --set "calibration.prompts.sets=[$R/prompts-counting.txt]"
