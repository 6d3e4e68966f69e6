#!/bin/bash
# One call on a lent GPU (the device tool's run, in the repository root, $OUT set), what only a GPU
# shows, in order of value, each step time-boxed so the call ends inside 9 minutes:
#  1. every kernel test compiled for the GPU (no TRITON_INTERPRET: tests/test_kernels_* run on CUDA
#     against the float64 reference) and the `gpu`-marked tests (inductor, CUDA graph capture, bench);
#  2. `bitflux bench --kernels` (its function, a JSON per shape): every FLUX shape checked, then timed eagerly and from CUDA graphs beside
#     cuBLAS bf16 and the int8/fp8 ceilings;
#  3. the FLUX.1-dev transformer at full size with random weights: step latency and peak memory,
#     bf16 / W2A16 / W2A8 at 1024²;
#  4. the rotation (quantization.rotation): the Triton kernel against the torch path on FLUX's widths;
#  5. step 3 again with BITFLUX_AUTOTUNE=0 (one untuned config per shape): what skipping the tuning costs in
#     step latency; only in the time the first four left.
# Prepare with `bash benchmarks/gpu_wheels.sh` here; results land in $OUT (commit them under
# benchmarks/results/ with this command beside them).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# bitflux laid out as pyproject.toml installs it (kernels/ as bitflux_kernels, configs/ as bitflux_cli.configs),
# copied rather than built: nothing to compile, and no build tools needed there
cp -r bitflux_cli /tmp/site/ && cp -r kernels /tmp/site/bitflux_kernels && cp -r configs /tmp/site/bitflux_cli/configs || exit 1
export PYTHONPATH=/tmp/site
# -P: without it python3 -c puts the repository root first on sys.path, whose bitflux_cli has no configs/
BITFLUX="python3 -P -c 'from bitflux_cli.cli import main; main()'"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
} | tee "$OUT/env.txt"
# 12 of the 16 cores as workers (pytest-xdist is on the image): the ~160 kernel compiles and ~90 autotune keys are CPU-bound,
# one process took well over the time box; the full log is written as it goes, so a timeout still reports
timeout 210 python3 -m pytest -q -p no:cacheprovider -n 12 --maxfail=10 -rf tests/test_kernels_common.py \
    tests/test_kernels_packed.py tests/test_kernels_large_m.py tests/test_kernels_dispatch.py tests/test_kernels_bench.py \
    tests/test_bench_measure_gpu.py tests/test_rotation.py::test_compiled_kernel_on_cuda_rounds_once_per_product \
    > "$OUT/pytest-gpu.log" 2>&1
tail -40 "$OUT/pytest-gpu.log"
# what `bitflux bench --kernels --json` runs (bench_kernels), one FLUX shape a file as each finishes:
# a timeout keeps the shapes done
timeout 150 python3 -P -c "
import json, os
from bitflux_kernels.bench import FLUX_SHAPES, bench_kernels
for n, k in FLUX_SHAPES:
    report = bench_kernels(shapes=[(n, k)])
    with open(os.path.join(os.environ['OUT'], f'h200-kernels-{n}x{k}.json'), 'w') as f:
        json.dump(report, f, indent=1)
" 2> "$OUT/h200-kernels.err"
timeout 120 bash -c "$BITFLUX bench --config flux-dev --random-weights --json --set bench.resolutions=[1024]" \
    > "$OUT/h200-flux-dev-random.json" 2> "$OUT/h200-flux-dev-random.err"
timeout 25 python3 -P -c "
import json, os, torch
from bitflux_cli.bench.measure import time_cuda
from bitflux_kernels.hadamard import rotate_torch
from bitflux_kernels.hadamard_triton import hadamard_triton
from bitflux_cli.rotation import signs
rows = []
for k in (3072, 12288, 15360):
    x, s = torch.randn(4608, k, device='cuda', dtype=torch.bfloat16), signs(k).cuda()
    t = {name: time_cuda(lambda: f(x, s), 3, 20)['median_ms'] for name, f in (('triton', hadamard_triton), ('torch', rotate_torch))}
    rows.append({'m': 4608, 'k': k, **{f'{n}_ms': v for n, v in t.items()}, 'triton_gbs': 4 * x.numel() / t['triton'] / 1e6})
json.dump(rows, open(os.path.join(os.environ['OUT'], 'h200-hadamard.json'), 'w'), indent=1)
" 2> "$OUT/h200-hadamard.err"
left=$(( 530 - SECONDS ))  # what the 9 minutes leave: the earlier steps usually end well inside their boxes
(( left > 30 )) && timeout $left env BITFLUX_AUTOTUNE=0 bash -c "$BITFLUX bench --config flux-dev --random-weights --json \
    --set bench.resolutions=[1024]" > "$OUT/h200-flux-dev-random-untuned.json" 2> "$OUT/h200-flux-dev-random-untuned.err"
tail -3 "$OUT"/*.err
