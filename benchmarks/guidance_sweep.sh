#!/usr/bin/env bash
# Does the 1.58-bit model lose points because its response to the caption is weaker (a shrunken
# guidance), which a larger guidance would give back? The packed model of a workdir and the FP model,
# scored at guidance 2.5, 3.5 (tiny.yaml's) and 5.0, same prompts and seeds; OUT gets each eval and the
# packed model's paired difference from its own score at 3.5. A diagnostic: the product's guidance is
# the user's, the same for both models.
#   benchmarks/guidance_sweep.sh [WORKDIR] [OUT.json]   (after `make demo`; about 2.5 min on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
BITFLUX=${BITFLUX:-.venv/bin/bitflux}
WORKDIR=${1:-runs/demo}
OUT=${2:-benchmarks/results/guidance-sweep.json}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
for g in 2.5 3.5 5.0; do
    "$BITFLUX" eval --workdir "$WORKDIR" --set "generate.guidance=$g" --json > "$TMP/packed-$g.json"
    "$BITFLUX" eval --workdir "$WORKDIR" --full-precision --set "generate.guidance=$g" --json > "$TMP/fp-$g.json"
done
"${PYTHON:-.venv/bin/python}" - "$TMP" "$OUT" "$WORKDIR $OUT" "$(git rev-parse --short HEAD)" <<'PY'
import json, sys
from pathlib import Path
from bitflux_cli.miniworld.scorer import paired_stderr
from bitflux_cli.miniworld.world import balanced_prompts
tmp, out, flags, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
load = lambda name: json.loads((tmp / f"{name}.json").read_text())
ref = load("packed-3.5")
specs = balanced_prompts(ref["split"], ref["seeds"][0], ref["prompts"] // len(ref["categories"]))
rows = {}
for g in ("2.5", "3.5", "5.0"):
    p, f = load(f"packed-{g}"), load(f"fp-{g}")
    rows[g] = {"packed": p["overall"], "packed_stderr": p["overall_stderr"], "fp": f["overall"], "fp_stderr": f["overall_stderr"],
               "x_fp": p["overall"] / f["overall"], "packed_minus_at_3.5": p["overall"] - ref["overall"],
               "paired_stderr": paired_stderr(specs, p["per_prompt"], ref["per_prompt"]),
               "packed_categories": p["categories"], "fp_categories": f["categories"]}
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({"command": f"benchmarks/guidance_sweep.sh {flags}", "commit": commit, "guidance": rows}, indent=1) + "\n")
print(f"{'guidance':>8}{'packed':>8}{'FP':>8}{'x FP':>7}{'packed vs 3.5':>15}")
for g, r in rows.items():
    print(f"{g:>8}{r['packed']:>8.3f}{r['fp']:>8.3f}{r['x_fp']:>7.3f}{r['packed_minus_at_3.5']:>+9.3f} ± {r['paired_stderr']:.3f}")
PY
