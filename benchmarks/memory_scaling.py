"""Peak host memory of each stage on full-width FLUX stand-ins at two depths, and the projection to FLUX.1-dev.

    python benchmarks/memory_scaling.py benchmarks/results/memory-scaling.json [--work DIR]

For each depth (1 double + 2 single blocks, then 2 + 4) it writes a stand-in (FLUX.1-dev's width,
random bf16 weights, ``bitflux_cli.models.standin``), then runs the CLI with ``--config flux-dev
--set model.path=...``, ``model.offload: sequential`` (the FP transformer streamed from its
files) and small image/calibration settings: calibrate; quantize with absmean,
act-aware and block-recon (with each ``block_recon.rounding``; fidelity report included); pack; generate from the packed file
(``model.offload: none``: the whole packed transformer in memory). Each
command runs in its own process on the CPU and its peak resident memory is the kernel's (``wait4``'s
``ru_maxrss``, what ``/usr/bin/time -v`` prints as "Maximum resident set size"). This process
imports neither torch nor bitflux: a child's peak counts the memory of the process it was forked
from (Linux keeps the pre-exec high-water mark), so the parent must stay small. The growth from the
shallow to the deep model per added GB of bf16 block weights is the slope; the projection adds
FLUX.1-dev's remaining block weights at that slope.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


DEPTHS = [(1, 2), (2, 4)]
SMALL = ["model.offload=sequential", "generate.height=64", "generate.width=64", "generate.steps=2", "generate.max_sequence_length=16",
         "quantization.eval_prompts=1", "model.device=cpu", "calibration.prompts.sets=[mini]",
         "calibration.prompts.limit=4", "calibration.steps=2", "calibration.timesteps=1", "calibration.tokens=16",
         "calibration.shard_size=4", "calibration.record_every=1", "quantization.block_recon.steps=2",
         "quantization.block_recon.batch=2", "quantization.act_aware.thresholds=4"]
COMMANDS = {  # the FP model streamed from its files (calibrate); generate holds the whole packed model
    "calibrate": ["calibrate"],
    "quantize absmean": ["quantize", "--method", "absmean"],
    "quantize act-aware": ["quantize", "--method", "act-aware"],
    "quantize block-recon": ["quantize", "--method", "block-recon"],
    "quantize block-recon adaround": ["quantize", "--method", "block-recon", "--set", "quantization.block_recon.rounding=adaround"],
    "pack": ["pack"],
    "generate": ["generate", "a red circle above a blue square", "--out", "{work}/img.png"],
}
OVERRIDES = {"generate": ["model.offload=none"]}  # after SMALL: the last --set of a key wins


BLOCK_GB = """
from bitflux_cli.models.source import KNOWN_ARCHITECTURES, build_meta_transformer
arch = dict(KNOWN_ARCHITECTURES["black-forest-labs/FLUX.1-dev"], num_layers={double}, num_single_layers={single})
model = build_meta_transformer(arch)
print(sum(p.numel() for b in [*model.transformer_blocks, *model.single_transformer_blocks] for p in b.parameters()) * 2 / 1e9)
"""


def block_gb(double: int, single: int) -> float:
    """bf16 GB of the transformer blocks of a FLUX.1-dev-width model of this depth."""
    code = BLOCK_GB.format(double=double, single=single)
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def peak_rss(argv: list[str]) -> tuple[float, float]:
    """(peak resident GB, wall seconds) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err[-2000:]}")
    return usage.ru_maxrss * 1024 / 1e9, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--work", type=Path, default=None, help="where the stand-ins and workdirs go (default: a temp dir)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bitflux-mem-"))
    bitflux = str(Path(sys.executable).with_name("bitflux"))
    runs = []
    for double, single in DEPTHS:
        model = work / f"standin-{double}-{single}"
        if not (model / "model_index.json").is_file():
            subprocess.run([sys.executable, "-m", "bitflux_cli.models.standin", str(model), "--double", str(double),
                            "--single", str(single)], check=True, capture_output=True)
        wd = work / f"wd-{double}-{single}"
        row = {"double": double, "single": single, "block_gb": block_gb(double, single), "peak_gb": {}, "seconds": {}}
        for label, cmd in COMMANDS.items():
            argv = [bitflux, *[c.format(work=wd) for c in cmd], "--config", "flux-dev", "--workdir", str(wd),
                    "--set", f"model.path={model}", *[a for s in SMALL + OVERRIDES.get(label, []) for a in ("--set", s)]]
            row["peak_gb"][label], row["seconds"][label] = peak_rss(argv)
            print(f"{double}+{single} {label:22s} {row['peak_gb'][label]:6.2f} GB {row['seconds'][label]:6.0f} s", flush=True)
        runs.append(row)
    shallow, deep = runs
    added = deep["block_gb"] - shallow["block_gb"]
    flux = block_gb(19, 38)
    slopes = {k: (deep["peak_gb"][k] - shallow["peak_gb"][k]) / added for k in COMMANDS}
    report = {
        "command": "python benchmarks/memory_scaling.py " + str(args.out),
        "cpu_count": os.cpu_count(), "runs": runs, "added_block_gb": added,
        "slope_gb_per_block_gb": slopes, "flux_dev_block_gb": flux,
        "projected_flux_dev_peak_gb": {k: deep["peak_gb"][k] + slopes[k] * (flux - deep["block_gb"]) for k in COMMANDS},
        "settings": SMALL,
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'command':22s} {'shallow':>8s} {'deep':>8s} {'GB/GB':>6s} {'FLUX.1-dev':>10s}")
    for k in COMMANDS:
        print(f"{k:22s} {shallow['peak_gb'][k]:8.2f} {deep['peak_gb'][k]:8.2f} {slopes[k]:6.2f} "
              f"{report['projected_flux_dev_peak_gb'][k]:10.2f}")


if __name__ == "__main__":
    main()
