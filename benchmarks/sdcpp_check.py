"""Load a bitflux GGUF (TQ2_0/TQ1_0) with stable-diffusion.cpp's Python bindings and say what happened.

    .venv/bin/python benchmarks/sdcpp_check.py --venv /tmp/sdcpp-venv --gguf flux-tq2_0.gguf [flux-tq1_0.gguf] \
        [--standin DIR] [--companions DIR] [--reference flux-bf16.safetensors] [--install] [--out JSON]

stable-diffusion-cpp-python lives in its own virtualenv (``--venv``; ``--install`` creates it and
builds the package from its sdist, CPU backend, timed). Each attempt runs in a child process of that
venv's Python, so sd.cpp's own log (it prints what it loaded, the tensor types, unknown or missing
tensors) and any ggml abort are captured whole. sd.cpp needs a CLIP-L or T5-XXL and a VAE beside a
FLUX transformer, and builds them at their fixed real sizes; attempts, in order:

- ``standin``: the stand-in's own small diffusers-layout CLIP and VAE (``--standin``);
- ``full-size``: a random CLIP-L (HF layout, 123M) and a random FLUX VAE (diffusers layout, 84M)
  written to ``--companions`` (needs torch, transformers, diffusers in the Python running this
  script); no T5 (sd.cpp then feeds zeros for its 4096-wide context).

Each attempt loads the GGUF as ``diffusion_model_path`` and, if that works, generates one 64x64
image in 2 steps (random weights: any image). ``--reference`` (the same model exported as bf16,
``bitflux export --format bfl``) is run the same way at two seeds: each GGUF's image is compared
with the reference's (mean |diff| over RGB 0-255), beside the difference a new seed makes. The JSON
holds the package version, the build time, the command, the log excerpts and the outcomes.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, os, sys, time, importlib.metadata
from PIL import ImageStat
from stable_diffusion_cpp import StableDiffusion
a = json.loads(sys.argv[1])
out = {"version": importlib.metadata.version("stable-diffusion-cpp-python")}
t = time.time()
try:
    sd = StableDiffusion(diffusion_model_path=a["gguf"], clip_l_path=a["clip_l"], vae_path=a["vae"],
                         n_threads=a["threads"], verbose=True)
except Exception as e:
    out |= {"loaded": False, "error": f"{type(e).__name__}: {e}"}
    print("SDCPP_CHECK " + json.dumps(out), flush=True)
    os._exit(0)
if not sd._model.model:  # new_sd_ctx returned NULL: the binding checks `is None` and does not raise
    out |= {"loaded": False, "error": "new_sd_ctx returned NULL"}
    print("SDCPP_CHECK " + json.dumps(out), flush=True)
    os._exit(0)  # free_sd_ctx(NULL) at exit would segfault
out |= {"loaded": True, "load_s": round(time.time() - t, 1)}
t = time.time()
try:
    images = sd.generate_image("a red circle", width=64, height=64, sample_steps=2, cfg_scale=1.0, guidance=3.5,
                               sample_method="euler", seed=a["seed"])
except Exception as e:
    out |= {"generated": False, "error": f"{type(e).__name__}: {e}"}
else:
    img = images[0]
    img.save(a["png"])
    st = ImageStat.Stat(img)
    out |= {"generated": True, "generate_s": round(time.time() - t, 1), "image": {"size": list(img.size), "mode": img.mode,
            "mean": [round(m, 2) for m in st.mean], "stddev": [round(s, 2) for s in st.stddev], "png": a["png"]}}
print("\nSDCPP_CHECK " + json.dumps(out), flush=True)
os._exit(0)
"""

# sd.cpp log lines worth keeping: what it detected and loaded, and every warning and error
REPEATED = re.compile(r"unknown tensor|not in model file|wrong shape")
KEEP = re.compile(r"\[(WARN|ERROR)|version|flux:|type|unknown tensor|not in model file|wrong shape|loading|load |"
                  r"params backend buffer|total params|sampling|generat|decod|ggml_|abort|assert|Couldn't|failed", re.I)


def excerpt(lines: list[str], each: int = 4) -> tuple[list[str], dict[str, int]]:
    """The kept lines, at most ``each`` of every repeated kind (one per tensor), and how many of each kind there were."""
    out, counts = [], {}
    for line in lines:
        kind = REPEATED.search(line)
        if kind:
            counts[kind[0]] = counts.get(kind[0], 0) + 1
            if counts[kind[0]] > each:
                continue
        if KEEP.search(line):
            out.append(line[:300])
    return out, counts


def install(venv: Path) -> dict:
    """Create ``venv`` and build stable-diffusion-cpp-python there (CPU backend); returns the time and status."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = os.environ | {"CMAKE_BUILD_PARALLEL_LEVEL": "1", "MAKEFLAGS": "-j1", "OMP_NUM_THREADS": "1"}
    t = time.time()
    res = subprocess.run(["nice", "-n", "19", str(venv / "bin/pip"), "install", "stable-diffusion-cpp-python"],
                         env=env, capture_output=True, text=True)
    return {"seconds": round(time.time() - t), "ok": res.returncode == 0,
            "error_tail": None if res.returncode == 0 else (res.stdout + res.stderr)[-3000:]}


def write_companions(out: Path) -> dict[str, str]:
    """Random full-size CLIP-L (transformers layout) and FLUX VAE (diffusers layout) safetensors under ``out``."""
    paths = {"clip_l": out / "clip_l.safetensors", "vae": out / "flux_vae.safetensors"}
    if all(p.exists() for p in paths.values()):
        return {k: str(p) for k, p in paths.items()}
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768))
    sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.state_dict().items()}
    save_file({k: v.half().contiguous() for k, v in sd.items()}, str(paths["clip_l"]))  # clip_l.safetensors' names
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                        layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
    save_file({k: v.half().contiguous() for k, v in vae.state_dict().items()}, str(paths["vae"]))
    return {k: str(p) for k, p in paths.items()}


def attempt(venv: Path, gguf: Path, clip_l: str, vae: str, png: Path, threads: int, timeout: int, seed: int = 0) -> dict:
    """Run one load + 64x64 generation in the venv's Python; returns the outcome and sd.cpp's log excerpt."""
    args = json.dumps({"gguf": str(gguf), "clip_l": clip_l, "vae": vae, "png": str(png), "threads": threads, "seed": seed})
    t = time.time()
    try:
        res = subprocess.run([str(venv / "bin/python"), "-c", WORKER, args], capture_output=True, text=True,
                             timeout=timeout, env=os.environ | {"OMP_NUM_THREADS": "1"})
        log, rc = res.stdout + res.stderr, res.returncode
    except subprocess.TimeoutExpired as e:
        log, rc = ((e.stdout or b"") + (e.stderr or b"")).decode(errors="replace"), "timeout"
    found = re.findall(r"SDCPP_CHECK (\{.*\})", log)  # may follow a progress bar on its line
    got = json.loads(found[-1]) if found else {}
    lines = [line.rstrip() for line in log.splitlines() if line.strip() and "SDCPP_CHECK" not in line and "|==" not in line]
    outcome = ("generated" if got.get("generated") else "load failed" if got.get("loaded") is False
               else "generation failed" if got.get("loaded") else f"process ended (rc={rc}) before reporting")
    kept, counts = excerpt(lines)
    stat = [line.split("stat:", 1)[1] for line in lines if "Diffusion model weight type stat:" in line]
    types = {k: int(n) for k, n in re.findall(r"(\w+):\s*(\d+)", stat[0])} if stat else {}
    transformer = [line for line in lines if "model.diffusion_model." in line and REPEATED.search(line)]
    return {"outcome": outcome, "clip_l": clip_l, "vae": vae, "rc": rc, "wall_s": round(time.time() - t, 1), **got,
            "transformer_types": types, "transformer_tensor_problems": transformer[:10],
            "tensor_problem_counts": counts, "log_excerpt": kept, "log_tail": [line[:300] for line in lines[-8:]]}


def scrambled_copy(src: Path, out: Path) -> Path:
    """A copy of a TQ2_0 GGUF with the two 32-byte halves of every block's ``qs`` swapped: weights moved along K,
    the kind of layout error the comparison with the bf16 reference has to catch."""
    import shutil

    import gguf
    import numpy as np

    shutil.copyfile(src, out)
    data = np.memmap(out, dtype=np.uint8, mode="r+")
    for t in gguf.GGUFReader(src).tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.TQ2_0:
            blocks = data[t.data_offset: t.data_offset + t.n_bytes].reshape(-1, 66)  # [blocks, qs[64] + d]
            blocks[:, :64] = np.concatenate([blocks[:, 32:64], blocks[:, :32]], axis=1)
    data.flush()
    return out


def mean_abs(a: str, b: str) -> float:
    """Mean |a - b| over the RGB values (0-255) of two images of one size."""
    import numpy as np
    from PIL import Image

    pa, pb = (np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in (a, b))
    return round(float(np.abs(pa - pb).mean()), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, required=True)
    parser.add_argument("--gguf", type=Path, required=True, nargs="+")
    parser.add_argument("--standin", type=Path, help="stand-in diffusers directory: try its own CLIP and VAE first")
    parser.add_argument("--companions", type=Path, help="where to write the random full-size CLIP-L and FLUX VAE")
    parser.add_argument("--reference", type=Path, help="the same model as bf16 (bitflux export --format bfl): each "
                        "GGUF's full-size image is compared with its image, and a second seed gives the scale")
    parser.add_argument("--install", action="store_true", help="create --venv and build the package first (timed)")
    parser.add_argument("--build", type=json.loads, help='build facts measured outside, as JSON, e.g. {"seconds": 2400}')
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per attempt")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    report = {"command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]), "package": "stable-diffusion-cpp-python",
              "build": install(args.venv) if args.install else args.build, "files": {}}
    sets = []
    if args.standin:
        sets.append(("standin", str(args.standin / "text_encoder/model.safetensors"),
                     str(args.standin / "vae/diffusion_pytorch_model.safetensors")))
    if args.companions:
        c = write_companions(args.companions)
        sets.append(("full-size", c["clip_l"], c["vae"]))
    for gguf in args.gguf:
        runs = {}
        for name, clip_l, vae in sets:
            runs[name] = attempt(args.venv, gguf, clip_l, vae, gguf.with_suffix(f".{name}.png"), args.threads, args.timeout)
            report["version"] = runs[name].get("version", report.get("version"))
            print(f"{gguf.name:40s} {name:10s} {runs[name]['outcome']}", file=sys.stderr)
        report["files"][gguf.name] = {"bytes": gguf.stat().st_size, "attempts": runs}
    if args.reference and args.companions:
        ref = {seed: attempt(args.venv, args.reference, c["clip_l"], c["vae"], args.reference.with_suffix(f".seed{seed}.png"),
                             args.threads, args.timeout, seed) for seed in (0, 1)}
        report["reference"] = {"file": args.reference.name, "bytes": args.reference.stat().st_size,
                               "outcome": ref[0]["outcome"], "log_excerpt": ref[0]["log_excerpt"]}
        if all(r.get("generated") for r in ref.values()):
            report["reference"]["seed1_vs_seed0_mean_abs"] = mean_abs(ref[0]["image"]["png"], ref[1]["image"]["png"])
            for name, f in report["files"].items():
                run = f["attempts"].get("full-size", {})
                if run.get("generated"):
                    run["vs_reference_mean_abs"] = mean_abs(run["image"]["png"], ref[0]["image"]["png"])
                    print(f"{name:40s} vs bf16 reference: mean |diff| {run['vs_reference_mean_abs']} "
                          f"(another seed: {report['reference']['seed1_vs_seed0_mean_abs']})", file=sys.stderr)
            tq2 = [g for g in args.gguf if "tq2_0" in report["files"][g.name]["attempts"]["full-size"]["transformer_types"]]
            if tq2:  # control: a deliberately mis-laid TQ2_0 file must differ from the reference far more
                bad = scrambled_copy(tq2[0], tq2[0].with_suffix(".scrambled.gguf"))
                run = attempt(args.venv, bad, c["clip_l"], c["vae"], bad.with_suffix(".png"), args.threads, args.timeout)
                diff = mean_abs(run["image"]["png"], ref[0]["image"]["png"]) if run.get("generated") else None
                report["reference"]["control_scrambled_tq2_0"] = {
                    "file": f"{tq2[0].name} with each block's qs halves swapped", "outcome": run["outcome"],
                    "vs_reference_mean_abs": diff}
                bad.unlink()
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
