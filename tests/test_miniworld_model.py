"""The committed mini model: bundled, trained, and drawing what simple held-out prompts ask."""

import json

import numpy as np

from bitflux_cli.config import load_config
from bitflux_cli.miniworld import model as mini
from bitflux_cli.miniworld.scorer import score
from bitflux_cli.miniworld.world import balanced_prompts
from bitflux_cli.models import load_pipeline
from bitflux_cli.models.source import embedded_weights
from bitflux_cli.teacher import run_pipeline, to_uint8


def test_bundled_weights_are_the_trained_model():
    cfg = load_config(None)
    weights = embedded_weights(cfg.model)
    assert weights is not None, "bitflux_cli/assets/mini/ is missing: the embedded model would be random"
    report = json.loads((weights / "train.json").read_text())
    assert report["phase"] == "done"  # a finished run, not a snapshot
    assert sum(f.stat().st_size for f in weights.glob("*.safetensors")) < 30e6
    assert set(mini.COMPONENTS) <= {f.stem for f in weights.glob("*.safetensors")}


def test_trained_model_draws_single_objects_and_colours():
    # A random or broken model scores ~0 here (one blob of the right shape and colour on white).
    cfg = load_config(None)
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    specs = [s for s in balanced_prompts("test", seed=1, per_category=6) if s.category in ("single_object", "colors")]
    images = run_pipeline(pipe, [s.caption for s in specs], cfg.generate, seed=100)  # [B] of [H, W, 3] in [0, 1]
    hits = [score(to_uint8(im), s) for im, s in zip(images, specs)]
    assert np.mean(hits) >= 0.75, [(s.caption, h) for s, h in zip(specs, hits)]
