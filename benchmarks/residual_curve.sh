#!/usr/bin/env bash
# Score against size of the optional low-rank residual (quantization.residual_rank) on the miniature world:
#   benchmarks/residual_curve.sh [RUNS] [OUT.json] [EXTRA bitflux FLAGS...]
# For each rank r in $RANKS the default method (block-recon, configs/tiny.yaml) quantizes the embedded
# model in RUNS/resid-r<r> (calibrated once, in the first workdir; the others get a copy of its calib/),
# packs it (2bit) and is scored by `bitflux eval --suite mini`. OUT gets, per rank, the score, its
# standard error, its difference from the first rank's with the paired standard error (same prompts
# and seeds) and the storage: residual bytes and bits per ternary weight with the residual; and the
# commit it ran at ("+changes" when the tracked files differed from it).
set -euo pipefail
cd "$(dirname "$0")/.."
BITFLUX=${BITFLUX:-.venv/bin/bitflux}
RUNS=${1:-runs}
OUT=${2:-benchmarks/results/residual-curve.json}
shift $(( $# > 2 ? 2 : $# ))
RANKS=${RANKS:-0 4 8 16}
TMP=$(mktemp -d)
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo "+changes")
trap 'rm -rf "$TMP"' EXIT

first=""
for r in $RANKS; do
    workdir="$RUNS/resid-r$r"
    if [[ -n "$first" && -d "$first/calib" && ! -d "$workdir/calib" ]]; then
        mkdir -p "$workdir" && cp -r "$first/calib" "$workdir/"
    fi
    "$BITFLUX" quantize --workdir "$workdir" --set "quantization.residual_rank=$r" --json "$@" > "$TMP/$r.quantize.json"
    "$BITFLUX" pack --workdir "$workdir" --json "$@" > "$TMP/$r.pack.json"
    "$BITFLUX" eval --workdir "$workdir" --json "$@" > "$TMP/$r.eval.json"
    first=${first:-$workdir}
done
"${PYTHON:-.venv/bin/python}" - "$TMP" "$OUT" "$RUNS $OUT $*" "$COMMIT" $RANKS <<'EOF'
import json, os, sys
from pathlib import Path
from bitflux_cli.miniworld.scorer import overall_stderr
from bitflux_cli.miniworld.world import balanced_prompts
tmp, out, flags, commit, ranks = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:]
load = lambda name: json.loads((tmp / name).read_text())
base = load(f"{ranks[0]}.eval.json")
specs = balanced_prompts(base["split"], base["seeds"][0], base["prompts"] // len(base["categories"]))
assert len(specs) == len(base["per_prompt"])
points = {}
for r in ranks:
    q, p, e = load(f"{r}.quantize.json"), load(f"{r}.pack.json"), load(f"{r}.eval.json")
    diffs = {}
    for spec, a, b in zip(specs, e["per_prompt"], base["per_prompt"]):
        diffs.setdefault(spec.category, []).append(a - b)
    points[r] = {"overall": e["overall"], "overall_stderr": e["overall_stderr"], "categories": e["categories"],
                 "delta_vs_first": e["overall"] - base["overall"], "delta_stderr": overall_stderr(diffs),
                 "bits_per_weight": p["bits_per_weight"], "residual_bytes": p["residual_bytes"],
                 "packed_bytes": p["packed_bytes"], "storage_ratio": p["storage_ratio"],
                 "velocity_rel_error": q["fidelity"]["velocity_rel_error"], "image_psnr_db": q["fidelity"]["image_psnr_db"],
                 "method": e["method"], "codec": e["codec"], "prompts": e["prompts"], "images_per_prompt": e["images_per_prompt"]}
threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""  # scores move with it
report = {"command": f"{threads}RANKS='{' '.join(ranks)}' benchmarks/residual_curve.sh {flags}".strip(), "commit": commit,
          "ranks": points}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"{'rank':>4}{'overall':>9}{'stderr':>8}{'delta':>8}{'paired':>8}{'bits/w':>8}{'residual KB':>13}"
      f"{'velocity err':>14}{'PSNR dB':>9}")
for r, v in points.items():
    print(f"{r:>4}{v['overall']:>9.3f}{v['overall_stderr']:>8.3f}{v['delta_vs_first']:>+8.3f}{v['delta_stderr']:>8.3f}"
          f"{v['bits_per_weight']:>8.3f}{v['residual_bytes'] / 1e3:>13.1f}{v['velocity_rel_error']:>14.4f}{v['image_psnr_db']:>9.2f}")
EOF
