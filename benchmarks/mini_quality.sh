#!/usr/bin/env bash
# Quality of every quantization method on the miniature world, FP first:
#   benchmarks/mini_quality.sh [WORKDIR] [OUT.json] [EXTRA bitflux FLAGS...]
# Each method quantizes the embedded model (calibrating once, in WORKDIR), packs it (2bit) and is
# scored by `bitflux eval --suite mini`; the eval and quantize JSONs go to OUT as one object.
set -euo pipefail
cd "$(dirname "$0")/.."
BITFLUX=${BITFLUX:-.venv/bin/bitflux}
WORKDIR=${1:-runs/mini-quality}
OUT=${2:-benchmarks/results/mini-quality.json}
shift $(( $# > 2 ? 2 : $# ))
METHODS=${METHODS:-absmean act-aware block-recon distill}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$BITFLUX" eval --full-precision --workdir "$WORKDIR" --json "$@" > "$TMP/fp.eval.json"
for method in $METHODS; do
    "$BITFLUX" quantize --method "$method" --workdir "$WORKDIR" --json "$@" > "$TMP/$method.quantize.json"
    "$BITFLUX" pack --workdir "$WORKDIR" --json "$@" > /dev/null
    "$BITFLUX" eval --workdir "$WORKDIR" --json "$@" > "$TMP/$method.eval.json"
done
"${PYTHON:-.venv/bin/python}" - "$TMP" "$OUT" "$WORKDIR $OUT $*" $METHODS <<'EOF'
import json, sys
from pathlib import Path
tmp, out, flags, methods = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
load = lambda name: json.loads((tmp / name).read_text())
report = {"command": f"benchmarks/mini_quality.sh {flags}".strip(), "fp": load("fp.eval.json"),
          "methods": {m: {"eval": load(f"{m}.eval.json"), "quantize": load(f"{m}.quantize.json")} for m in methods}}
fp = report["fp"]["overall"]
for m, r in report["methods"].items():
    r["ratio_to_fp"] = r["eval"]["overall"] / fp
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"{'method':<14}{'overall':>9}{'x FP':>7}{'velocity err':>14}{'PSNR dB':>9}")
print(f"{'full precision':<14}{fp:>9.3f}{1:>7.2f}")
for m, r in report["methods"].items():
    f = r["quantize"]["fidelity"]
    print(f"{m:<14}{r['eval']['overall']:>9.3f}{r['ratio_to_fp']:>7.2f}{f['velocity_rel_error']:>14.4f}{f['image_psnr_db']:>9.2f}")
EOF
