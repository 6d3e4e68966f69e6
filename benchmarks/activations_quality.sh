#!/usr/bin/env bash
# Score of one packed model in each activation mode on the miniature world:
#   benchmarks/activations_quality.sh [WORKDIR] [OUT.json] [EXTRA bitflux FLAGS...]
# Quantizes the embedded model with the config's method (calibrating first) and packs it once; the
# activation mode is a runtime choice, so the same file is then scored by `bitflux eval` with
# --activations none (W2A16), int8 and fp8 (W2A8). The eval JSONs go to OUT as one object.
set -euo pipefail
cd "$(dirname "$0")/.."
BITFLUX=${BITFLUX:-.venv/bin/bitflux}
WORKDIR=${1:-runs/activations-quality}
OUT=${2:-benchmarks/results/activations-quality.json}
shift $(( $# > 2 ? 2 : $# ))
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$BITFLUX" quantize --workdir "$WORKDIR" --json "$@" > /dev/null
"$BITFLUX" pack --workdir "$WORKDIR" --json "$@" > /dev/null
for mode in none int8 fp8; do
    "$BITFLUX" eval --workdir "$WORKDIR" --activations "$mode" --json "$@" > "$TMP/$mode.json"
done
"${PYTHON:-.venv/bin/python}" - "$TMP" "$OUT" "$WORKDIR $OUT $*" "$(git rev-parse --short HEAD)" <<'PY'
import json, sys
from pathlib import Path
tmp, out, flags, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
modes = {m: json.loads((tmp / f"{m}.json").read_text()) for m in ("none", "int8", "fp8")}
report = {"command": f"benchmarks/activations_quality.sh {flags}".strip(), "commit": commit, "modes": modes}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(report, indent=1) + "\n")
print(f"{'activations':<12}{'overall':>9}{'stderr':>8}")
for m, e in modes.items():
    print(f"{m:<12}{e['overall']:>9.3f}{e.get('overall_stderr', float('nan')):>8.3f}")
PY
