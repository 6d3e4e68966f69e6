"""GenEval and T2I-CompBench at FLUX scale: images in the folder layouts their official evaluators read.

``bitflux eval --suite geneval | t2i-compbench`` writes, under ``<workdir>/eval/<suite>-<fp|ternary>/``:

- **geneval** (553 prompts of ``geneval/evaluation_metadata.jsonl``): ``<i:05d>/metadata.jsonl`` (line
  ``i`` of that file, as is) and ``<i:05d>/samples/<j:04d>.png``. It is the layout of GenEval's README
  ("Image generation", djghosh13/geneval): ``evaluation/evaluate_images.py`` takes the folders whose name
  is all digits, ``json.load``s their ``metadata.jsonl`` and scores every ``samples/\\d+\\.png``.
- **t2i-compbench** (the 8 ``t2i_compbench/<category>_val.txt``, 300 each): ``<category>/samples/
  <prompt>_<i * K + j:06d>.png``, ``i`` the prompt's line in its file, as T2I-CompBench's
  ``GORS_finetune/inference_eval.py`` names them (Karine-Huang/T2I-CompBench Readme, "Evaluation"). Its
  evaluators take ``<category>/`` as ``--out_dir``/``--outpath``, read the prompt from the name before the
  first ``_``, the question id from the digits after the last, and count every file in ``samples/``: a
  prompt holding ``_`` or ``/`` is refused, and nothing else is written there.

Image ``j`` of prompt ``i`` (``i`` over the suite's whole list: 553, or 2,400 with the categories in
``T2I_CATEGORIES`` order) is drawn with seed ``eval.seed + j * N + i``, so it does not depend on
``--limit``, ``--images`` or the number of ranks. Images are written atomically: a present one is whole
and is skipped on a rerun. ``run.json`` records what the images depend on (model, checkpoint sha256,
generate settings, seed, images per prompt); a folder made by another run is emptied first. Under
``torchrun`` prompt ``i`` goes to rank ``i % world_size``; after a barrier rank 0 writes ``manifest.json``:
counts, seeds, the checkpoint's sha256/method/codec (and the activation mode it records; ``activations``
is the mode the images were drawn in: ``quantization.activations`` when set, else the recorded one) and
the official evaluators' commands.
"""

import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image

from .artifacts import artifact_path, atomic_file, file_sha256, require
from .checkpoint import CheckpointFile
from .config import MAX_SEED, Config
from .console import info, progress
from .distributed import init_distributed
from .errors import UsageError
from .loader import packed_checkpoint, pipeline_for, runtime_activations
from .models import model_id
from .prompts import FILES, T2I_CATEGORIES, PromptDataError, read_pinned
from .teacher import run_pipeline, to_uint8

FORMAT = 1
SUITES = ("geneval", "t2i-compbench")
GENEVAL_FILE = "geneval/evaluation_metadata.jsonl"
COUNTS = {"geneval": 553, "t2i-compbench": 2400}  # prompts in the pinned data; checked on every load
T2I_PER_CATEGORY = 300
# T2I-CompBench's scorer per category (run from a checkout of Karine-Huang/T2I-CompBench; complex is
# scored by three of them, then combined by 3_in_1.py)
_T2I_EVAL = {
    "color": ["cd BLIPvqa_eval && python BLIP_vqa.py --out_dir={d}"],
    "shape": ["cd BLIPvqa_eval && python BLIP_vqa.py --out_dir={d}"],
    "texture": ["cd BLIPvqa_eval && python BLIP_vqa.py --out_dir={d}"],
    "spatial": ["cd UniDet_eval && python 2D_spatial_eval.py --outpath={d}"],
    "3d_spatial": ["cd UniDet_eval && python 3D_spatial_eval.py --outpath={d}"],
    "numeracy": ["cd UniDet_eval && python numeracy_eval.py --outpath={d}"],
    "non_spatial": ["python CLIPScore_eval/CLIP_similarity.py --outpath={d}"],
    "complex": ["cd BLIPvqa_eval && python BLIP_vqa.py --out_dir={d}",
                "cd UniDet_eval && python 2D_spatial_eval.py --outpath={d} --complex True",
                "python CLIPScore_eval/CLIP_similarity.py --outpath={d} --complex True",
                "cd 3_in_1_eval && python 3_in_1.py --outpath={d}"],
}


@dataclass
class Item:
    """One prompt: its index in the suite's whole list (seed and rank follow from it), its image paths
    (sample ``j`` at ``images[j]``) and small text files written beside them."""

    index: int
    prompt: str
    images: list[Path]
    files: dict[Path, str] = field(default_factory=dict)


def _check_count(suite: str, n: int) -> None:
    if n != COUNTS[suite]:
        raise PromptDataError(f"{suite}: {n} prompts in the data, expected {COUNTS[suite]}")


def geneval_items(data_dir: Path | None, root: Path, k: int, limit: int | None = None) -> tuple[list[Item], int]:
    """The GenEval prompts (the first ``limit``) as items under ``root``, and the number in the whole list."""
    lines = [line for line in read_pinned(GENEVAL_FILE, data_dir) if line.strip()]
    _check_count("geneval", len(lines))
    items = []
    for i, line in enumerate(lines[:limit]):
        folder = root / f"{i:05d}"
        items.append(Item(i, json.loads(line)["prompt"], [folder / "samples" / f"{j:04d}.png" for j in range(k)],
                          {folder / "metadata.jsonl": line + "\n"}))
    return items, len(lines)


def t2i_items(data_dir: Path | None, root: Path, k: int, limit: int | None = None) -> tuple[list[Item], int]:
    """The T2I-CompBench validation prompts (the first ``limit`` of each category) as items under ``root``,
    and the number in the whole list."""
    items, offset = [], 0
    for cat in T2I_CATEGORIES:
        rel = f"t2i_compbench/{cat}_val.txt"
        prompts = [p.strip() for p in read_pinned(rel, data_dir) if p.strip()]
        if len(prompts) != T2I_PER_CATEGORY:
            raise PromptDataError(f"{rel}: {len(prompts)} prompts, expected {T2I_PER_CATEGORY}")
        for line, prompt in enumerate(prompts[:limit]):
            if "_" in prompt or "/" in prompt or len(prompt.encode()) > 240:  # the evaluators split the name at "_"
                raise PromptDataError(f"{rel} line {line + 1}: {prompt!r} cannot be a T2I-CompBench file name")
            samples = root / cat / "samples"
            items.append(Item(offset + line, prompt, [samples / f"{prompt}_{line * k + j:06d}.png" for j in range(k)]))
        offset += len(prompts)
    _check_count("t2i-compbench", offset)
    return items, offset


def evaluator_commands(suite: str, root: Path) -> list[str]:
    """The official evaluators' commands for the images in ``root`` (absolute: they run from the evaluator's checkout)."""
    root = Path(root).resolve()
    if suite == "geneval":  # from a checkout of djghosh13/geneval, its detector downloaded
        results = shlex.quote(f"{root}/results.jsonl")
        return [f"python evaluation/evaluate_images.py {shlex.quote(str(root))} --outfile {results} --model-path <OBJECT_DETECTOR_FOLDER>",
                f"python evaluation/summary_scores.py {results}"]
    return [c.format(d=shlex.quote(f"{root / cat}/")) for cat in T2I_CATEGORIES for c in _T2I_EVAL[cat]]


def _write_text(path: Path, text: str) -> None:
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        with atomic_file(path) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _save_png(path: Path, pixels) -> None:
    with atomic_file(path) as tmp:  # a present image is a whole one
        Image.fromarray(pixels).save(tmp, format="PNG")


def _fingerprint(cfg: Config, suite: str, full_precision: bool, ckpt: dict | None) -> dict:
    """What the images depend on; a folder whose ``run.json`` differs is emptied before generating."""
    gen = cfg.generate.model_dump(mode="json", exclude={"seed"})
    return {"format": FORMAT, "suite": suite, "model": model_id(cfg.model), "dtype": cfg.model.dtype,
            "full_precision": full_precision, "checkpoint_sha256": ckpt and ckpt["sha256"],
            # the --activations override; unset (None), the mode the checkpoint with that sha256 records
            "activations": None if full_precision else cfg.quantization.activations, "generate": gen, "seed": cfg.eval.seed,
            "images_per_prompt": cfg.eval.images_per_prompt}


def _prepare(root: Path, fingerprint: dict) -> None:
    """Rank 0: empty ``root`` when another run's images are in it, then record this run's fingerprint."""
    run = root / "run.json"
    try:
        old = json.loads(run.read_text())
    except (OSError, ValueError):
        old = None
    if old != fingerprint and root.is_dir() and any(root.iterdir()):
        info(f"{root} holds images of another run ({'no run.json' if old is None else 'other settings'}): regenerating")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    _write_text(run, json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")


def generate_suite(cfg: Config, full_precision: bool = False) -> dict:
    """Generate ``eval.images_per_prompt`` images for every prompt of ``eval.suite`` (GenEval or
    T2I-CompBench) in the layout its official evaluator reads; resumable, data-parallel under torchrun."""
    suite, k, start = cfg.eval.suite, cfg.eval.images_per_prompt, cfg.eval.seed
    if suite not in SUITES:
        raise UsageError(f"unknown suite {suite!r} for image generation: {', '.join(SUITES)}")
    rank, world = init_distributed()
    root = artifact_path(cfg.workdir, "eval") / f"{suite}-{'fp' if full_precision else 'ternary'}"
    make = geneval_items if suite == "geneval" else t2i_items
    items, n = make(cfg.calibration.prompts.data_dir, root, k, cfg.eval.limit)
    if start + k * n - 1 > MAX_SEED:
        raise UsageError(f"eval.seed {start} + {k * n} images passes the largest seed ({MAX_SEED})")
    ckpt = fingerprint = None  # rank 0's: it checks the folder and writes the manifest
    if rank == 0:
        if not full_precision:
            f = CheckpointFile(packed_checkpoint(cfg))  # on the embedded model a missing one is made first
            ckpt = {"path": str(f.path), "sha256": file_sha256(f.path), "method": f.meta["inputs"].get("method"),
                    "codec": f.codec, "activations": f.meta["activations"]}
        fingerprint = _fingerprint(cfg, suite, full_precision, ckpt)
        _prepare(root, fingerprint)
    if world > 1:
        dist.barrier()
    activations = None if full_precision else runtime_activations(cfg, CheckpointFile(require(cfg.workdir, "pack")))

    mine = [it for it in items if it.index % world == rank]
    for it in mine:
        for path, text in it.files.items():
            _write_text(path, text)
    todo = [(it.prompt, start + j * n + it.index, path) for it in mine for j, path in enumerate(it.images) if not path.is_file()]
    where = "" if world == 1 else f" on rank {rank} of {world}"
    info(f"{suite}: {len(items)} prompts x {k} images in {root}: {len(todo)} to generate{where}")
    if todo:
        with pipeline_for(cfg, full_precision) as (pipe, _):
            pipe.set_progress_bar_config(disable=True)
            with progress(suite, len(todo), "images") as advance:
                for b in range(0, len(todo), cfg.eval.batch):
                    chunk = todo[b:b + cfg.eval.batch]
                    images = run_pipeline(pipe, [c[0] for c in chunk], cfg.generate, [c[1] for c in chunk])  # [B, H, W, 3] in [0, 1]
                    for (_, _, path), image in zip(chunk, images):
                        _save_png(path, to_uint8(image))
                    advance(len(chunk))
    counts = torch.tensor([len(todo), sum(len(it.images) for it in mine) - len(todo)])  # generated, skipped
    if world > 1:
        dist.all_reduce(counts)  # also the barrier before rank 0 counts the files
    generated, skipped = counts.tolist()
    indices = [it.index for it in items]
    result = {"stage": "eval", "suite": suite, "model": "full-precision" if full_precision else "1.58-bit",
              "base_model": model_id(cfg.model), "method": ckpt and ckpt["method"], "codec": ckpt and ckpt["codec"],
              "activations": activations, "path": str(root), "prompts": len(items), "total_prompts": n,
              "images_per_prompt": k, "images": len(items) * k, "generated": generated, "skipped": skipped,
              "seeds": [start + min(indices), start + (k - 1) * n + max(indices)], "steps": cfg.generate.steps,
              "guidance": cfg.generate.guidance, "world_size": world, "manifest": str(root / "manifest.json")}
    if rank == 0:
        missing = [p for it in items for p in it.images if not p.is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} images missing after generation, e.g. {missing[0]}")
        categories = {}
        if suite == "t2i-compbench":
            for it in items:
                cat = it.images[0].parent.parent.name
                categories[cat] = categories.get(cat, 0) + 1
        rels = [GENEVAL_FILE] if suite == "geneval" else [f"t2i_compbench/{c}_val.txt" for c in T2I_CATEGORIES]
        manifest = result | {"format": FORMAT, "checkpoint": ckpt, "categories": categories,
                             "seed_rule": "image j of prompt i (index in the whole list): eval.seed + j * total_prompts + i",
                             "data": {rel: FILES[rel][1] for rel in rels}, "fingerprint": fingerprint,
                             "evaluate": evaluator_commands(suite, root), "config": cfg.resolved()}
        with atomic_file(root / "manifest.json") as tmp:
            tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    return result
