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
COMMIT=$(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo "+changes")
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
LR=$LR LAMBDA=$LAMBDA FLAGS="$FLAGS" TAG=$TAG python - "$R" "$OUT" "$COMMIT" $SEEDS <<'PY'
import json, os, statistics, sys
from pathlib import Path
from bitflux_cli.miniworld.scorer import paired_stderr
from bitflux_cli.miniworld.world import balanced_prompts
R, out, commit, seeds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
rows, deltas = {}, []
for s in seeds:
    names = {1: f"w1-s{s}", 2: f"w2{os.environ['TAG']}-s{s}"}
    e = {w: json.loads((R / f"{names[w]}.eval.json").read_text()) for w in (1, 2)}
    q = {w: json.loads((R / f"{names[w]}.quantize.json").read_text())["fidelity"] for w in (1, 2)}
    specs = balanced_prompts(e[1]["split"], e[1]["seeds"][0], e[1]["prompts"] // len(e[1]["categories"]))
    d = e[2]["overall"] - e[1]["overall"]; deltas.append(d)
    rows[s] = {("adaround" if w == 2 else "default"): {"overall": e[w]["overall"], "overall_stderr": e[w]["overall_stderr"], "categories": e[w]["categories"],
                              "velocity_rel_error": q[w]["velocity_rel_error"], "block_rel_error": q[w]["block_rel_error"]} for w in (1, 2)}
    rows[s]["difference"] = {"overall": d, "paired_stderr": paired_stderr(specs, e[2]["per_prompt"], e[1]["per_prompt"])}
    print(f"seed {s}: default {e[1]['overall']:.4f} adaround {e[2]['overall']:.4f} diff {d:+.4f} ± {rows[s]['difference']['paired_stderr']:.4f}"
          f"  velocity error {q[1]['velocity_rel_error']:.3f} / {q[2]['velocity_rel_error']:.3f}")
spread = statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else None
flags = f"FLAGS='{os.environ['FLAGS']}' TAG={os.environ['TAG']} " if os.environ["FLAGS"] else ""
report = {"command": f"SEEDS='{' '.join(seeds)}' LR={os.environ['LR']} LAMBDA={os.environ['LAMBDA']} {flags}benchmarks/block_recon_adaround.sh {R.parent} {out}",
          "commit": commit, "seeds": rows,
          "mean": {"default": statistics.mean(r["default"]["overall"] for r in rows.values()),
                   "adaround": statistics.mean(r["adaround"]["overall"] for r in rows.values()),
                   "difference": statistics.mean(deltas), "difference_stderr_across_seeds": spread}}
out.write_text(json.dumps(report, indent=1) + "\n")
print(report["mean"])
PY
