"""The eval stage: GenEval-style scores of the FP or the packed 1.58-bit model on the mini world (GenEval and
T2I-CompBench images for their official evaluators: ``eval_suites``)."""

from .artifacts import artifact_path, atomic_file
from .checkpoint import CheckpointFile
from .config import Config
from .errors import UsageError
from .loader import pipeline_for, runtime_activations
from .miniworld.scorer import check, evaluate as score_images
from .miniworld.sheet import contact_sheet
from .miniworld.world import balanced_prompts
from .models import EMBEDDED, model_id
from .teacher import run_pipeline, to_uint8


def evaluate(cfg: Config, full_precision: bool = False) -> dict:
    """Score ``eval.images_per_prompt`` images for each mini-world prompt of ``eval.split``; write a contact sheet.

    ``eval.suite`` geneval or t2i-compbench: generate the benchmark's images for its official evaluator
    instead (``eval_suites.generate_suite``).

    Seeds: image ``j`` of prompt ``i`` uses ``eval.seed + j * len(prompts) + i``.
    """
    if cfg.eval.suite != "mini":
        from .eval_suites import generate_suite
        return generate_suite(cfg, full_precision)
    if cfg.eval.limit is not None:
        raise UsageError("--limit (eval.limit) is for the geneval and t2i-compbench suites; the mini suite's size is eval.per_category")
    if cfg.model.source != EMBEDDED:
        raise UsageError(f"the mini suite scores the embedded mini model; {cfg.model.source} has no programmatic scorer")
    with pipeline_for(cfg, full_precision) as (pipe, _):
        summary = score_pipeline(cfg, pipe, "fp" if full_precision else "ternary")
        # what was scored: the checkpoint's own record, not this run's config, and the activation mode it ran in
        ckpt = None if full_precision else CheckpointFile(artifact_path(cfg.workdir, "pack"))
    return {"stage": "eval", "suite": "mini", "model": "full-precision" if full_precision else "1.58-bit",
            "base_model": model_id(cfg.model), "method": ckpt and ckpt.meta["inputs"].get("method"),
            "codec": ckpt and ckpt.codec, "activations": ckpt and runtime_activations(cfg, ckpt)} | summary


def score_pipeline(cfg: Config, pipe, sheet_name: str) -> dict:
    """The mini suite's score of any pipeline of the embedded model (the packed one, FP, or a peer's
    quantization in ``benchmarks/peers.py``); its contact sheet goes to ``<workdir>/eval/mini-<sheet_name>.png``."""
    specs = balanced_prompts(cfg.eval.split, cfg.eval.seed, cfg.eval.per_category)
    k, n = cfg.eval.images_per_prompt, len(specs)
    captions = [s.caption for s in specs] * k  # flat index j * n + i
    images = []
    pipe.set_progress_bar_config(disable=True)
    for start in range(0, len(captions), cfg.eval.batch):
        chunk = captions[start:start + cfg.eval.batch]
        images += list(run_pipeline(pipe, chunk, cfg.generate, cfg.eval.seed + start))  # [B] of [H, W, 3] in [0, 1]
    images = [to_uint8(im) for im in images]
    per_prompt = [(spec, [images[j * n + i] for j in range(k)]) for i, spec in enumerate(specs)]
    summary = score_images(per_prompt)

    sheet_path = artifact_path(cfg.workdir, "eval") / f"mini-{sheet_name}.png"
    marks = [f"{'ok' if check(imgs[0], spec).ok else 'X'} {spec.caption}" for spec, imgs in per_prompt]
    with atomic_file(sheet_path) as tmp:
        contact_sheet([imgs[0] for _, imgs in per_prompt], marks, cols=12).save(tmp, format="PNG")
    return {"overall": summary["overall"], "overall_stderr": summary["overall_stderr"], "categories": summary["categories"],
            "split": cfg.eval.split, "prompts": n, "distinct_prompts": len(set(specs)), "images_per_prompt": k,
            "seeds": [cfg.eval.seed, cfg.eval.seed + k * n - 1], "steps": cfg.generate.steps,
            "guidance": cfg.generate.guidance, "sheet": str(sheet_path), "per_prompt": summary["per_prompt"]}
