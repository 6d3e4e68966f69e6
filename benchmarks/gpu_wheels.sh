#!/bin/bash
# Run here (with PyPI), before a device call: the wheels bitflux needs that the lent H200's image lacks
# (its python3 is 3.12 with torch, triton, transformers, peft, typer, rich, safetensors, numpy, PyYAML,
# pillow, matplotlib; no diffusers, pydantic or gguf), into .whl/ (git-ignored: carried, not committed).
# About 8 MB. Then: device run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl diffusers==0.42.1 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection gguf==0.19.0
ls -s .whl
