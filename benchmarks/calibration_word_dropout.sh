#!/bin/bash
# Calibration prompts with words dropped, against the held-out gap (benchmarks/results/split-gap.json):
# in the training captions a count word only ever comes with some shapes ("two circles", never "three
# circles"), so the calibration cannot tell a student that reads the count from the shape word from one
# that reads it from the count word. Captions with one word dropped ("circles", "two") break that tie
# without using any held-out caption (checked). Prompt files of the 384 training captions (the `mini` set)
# plus 192, 384 or 768 one-word-dropped copies (768: every caption twice), then calibrate + quantize,
# pack, eval (tiny.yaml, 192 prompts x 4 images); the 384 run again at block_recon.seed=1 on its
# calibration; the 192 run also on the training split. Writes $1/<name>.{quantize,eval}.json.
# Usage: bash benchmarks/calibration_word_dropout.sh RUNS_DIR   (3-5 min a run on 2 CPU cores)
set -euo pipefail
R=$(realpath -m "$1"); mkdir -p "$R"
python - "$R" <<'PY'
import random, sys
from bitflux_cli.miniworld.world import balanced_prompts
train = [s.caption for s in balanced_prompts("train", seed=0, per_category=64)]  # the `mini` set
test_only = {s.caption for s in balanced_prompts("test", seed=0, per_category=32)} - set(train)
for n in (192, 384, 768):
    rng = random.Random(0)
    variants = []
    for cap in (rng.sample(train, n) if n < len(train) else train * (n // len(train))):
        words = cap.split()
        i = rng.randrange(len(words))
        variants.append(" ".join(words[:i] + words[i + 1:]))
    assert not test_only & set(variants)
    open(f"{sys.argv[1]}/word-dropout-{n}.txt", "w").write("\n".join(train + variants) + "\n")
PY
source "$(dirname "$0")/variants.sh"
run() { local name=$1 prompts=$2; shift 2; variant "$name" --set "calibration.prompts.sets=[$prompts]" "$@"; }  # name prompts-file --set ...
run word-dropout-192 "$R/word-dropout-192.txt"
bitflux eval --workdir "$R/word-dropout-192" --json --set eval.split=train > "$R/word-dropout-192-train.eval.json"
run word-dropout-384 "$R/word-dropout-384.txt"
fresh_from word-dropout-384 word-dropout-384-seed1
run word-dropout-384-seed1 "$R/word-dropout-384.txt" --set quantization.block_recon.seed=1
run word-dropout-768 "$R/word-dropout-768.txt"
