#!/bin/bash
# Calibration prompts with random word sequences added, against the held-out gap: the 1.58-bit model's
# error on a held-out composition points along the teacher's change towards training compositions
# (benchmarks/error_direction.py), as if the student read "three" as coming with squares or triangles,
# the only shapes it comes with in the calibration captions. Sequences of the world's vocabulary words
# drawn uniformly (lengths as the training captions'), with no two neighbouring words that are neighbours
# in any caption of the language, train or test, plurals read as their singular as the tokenizer does (so
# no sequence holds a phrase such as "three circles" or "three circle", held out or not), put words together that no caption does, and the student matches the teacher on them too.
# Prompt files: the 384 training captions (the `mini` set) + 192, 384 or 1152 random sequences; calibrate +
# quantize, pack, eval (tiny.yaml, 192 prompts x 4 images); the 384 and 1152 runs again at block_recon.seed=1
# on their calibrations. Writes $1/<name>.{quantize,eval}.json.
# Usage: bash benchmarks/calibration_random_words.sh RUNS_DIR   (about 5 min a run on 2 CPU cores)
set -euo pipefail
R=$(realpath -m "$1"); mkdir -p "$R"
python - "$R" <<'PY'
import random, sys
from bitflux_cli.miniworld.world import CATEGORIES, SHAPES, VOCAB_WORDS, balanced_prompts, prompts
train = [s.caption for s in balanced_prompts("train", seed=0, per_category=64)]  # the `mini` set
captions = [s.caption.split() for c in CATEGORIES for s in prompts(c, "all")]
captions += [s.caption.split() for s in balanced_prompts("test", seed=0, per_category=32)]  # eval's own, to be sure
stem = {w + "s": w for w in SHAPES}  # the tokenizer reads "circles" as "circle ##s": compare at the singular
def pairs(words):
    words = [stem.get(w, w) for w in words]
    return set(zip(words, words[1:]))
bigrams = set().union(*map(pairs, captions))
for n in (192, 384, 1152):
    rng = random.Random(0)
    extra = []
    while len(extra) < n:
        words = [rng.choice(VOCAB_WORDS) for _ in range(len(rng.choice(train).split()))]
        if not bigrams & pairs(words):
            extra.append(" ".join(words))
    open(f"{sys.argv[1]}/random-words-{n}.txt", "w").write("\n".join(train + extra) + "\n")
PY
source "$(dirname "$0")/variants.sh"
run() { local name=$1 prompts=$2; shift 2; variant "$name" --set "calibration.prompts.sets=[$prompts]" "$@"; }  # name prompts-file --set ...
run random-words-384 "$R/random-words-384.txt"
run random-words-192 "$R/random-words-192.txt"
fresh_from random-words-384 random-words-384-seed1
run random-words-384-seed1 "$R/random-words-384.txt" --set quantization.block_recon.seed=1
run random-words-1152 "$R/random-words-1152.txt"
fresh_from random-words-1152 random-words-1152-seed1
run random-words-1152-seed1 "$R/random-words-1152.txt" --set quantization.block_recon.seed=1
