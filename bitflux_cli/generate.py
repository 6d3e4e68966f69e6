"""The generate stage: a prompt -> a PNG, through the 1.58-bit transformer (or the FP one)."""

import re
import time
from pathlib import Path

from PIL import Image

from .artifacts import artifact_path, atomic_file, check_output_file
from .checkpoint import CheckpointFile
from .config import Config
from .loader import packed_checkpoint, pipeline_for, runtime_activations
from .models import resolve_device
from .teacher import run_pipeline


def default_output(cfg: Config, prompt: str) -> Path:
    """``<workdir>/images/<prompt-slug>-<seed>.png``."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "image"
    return artifact_path(cfg.workdir, "generate") / f"{slug}-{cfg.generate.seed}.png"


def generate(cfg: Config, prompt: str, out: Path | None = None, full_precision: bool = False) -> dict:
    """Draw ``prompt`` with the packed 1.58-bit transformer from the workdir (or the FP model)."""
    out = Path(out) if out is not None else default_output(cfg, prompt)
    check_output_file(out, "--out", cfg.workdir)  # before any model loads: a bad path must not cost the whole run
    device = resolve_device(cfg.model)
    with pipeline_for(cfg, full_precision) as (pipe, backend):
        start = time.perf_counter()
        image = run_pipeline(pipe, [prompt], cfg.generate, cfg.generate.seed, output_type="pil")[0]
        seconds = time.perf_counter() - start
    activations = None if full_precision else runtime_activations(cfg, CheckpointFile(packed_checkpoint(cfg)))
    with atomic_file(out) as tmp:  # in the format the name says (img.jpg: JPEG), PNG when it says none PIL writes
        image.save(tmp, format=Image.registered_extensions().get(out.suffix.lower(), "PNG"))
    return {"stage": "generate", "path": str(out), "prompt": prompt, "seed": cfg.generate.seed,
            "seconds": seconds, "backend": backend, "activations": activations,
            "steps": cfg.generate.steps, "height": cfg.generate.height, "width": cfg.generate.width,
            "guidance": cfg.generate.guidance, "device": str(device), "offload": cfg.model.offload}
