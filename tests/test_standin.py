"""FLUX.1-dev at its real width: a full-width stand-in (3072, random bf16 weights, hub layout) through the CLI.

One double and one single block keep it to a few seconds a command; every shape a linear, the
attention, the text encoders' outputs and the checkpoint see is FLUX.1-dev's.
"""

import json
import shutil

import pytest
from typer.testing import CliRunner

from bitflux_cli import load_quantized_transformer
from bitflux_cli.checkpoint import read_metadata
from bitflux_cli.cli import app
from bitflux_cli.models.source import KNOWN_ARCHITECTURES

SMALL = ["generate.height=32", "generate.width=32", "generate.steps=2", "generate.max_sequence_length=8",
         "quantization.eval_prompts=1", "model.device=cpu", "calibration.prompts.sets=[mini]",
         "calibration.prompts.limit=2", "calibration.steps=2", "calibration.timesteps=1", "calibration.tokens=4",
         "calibration.shard_size=2", "calibration.record_every=1", "quantization.block_recon.steps=1",
         "quantization.block_recon.batch=2", "quantization.act_aware.thresholds=2"]


def bitflux(model, workdir, *args):
    sets = [a for s in SMALL for a in ("--set", s)]
    res = CliRunner().invoke(app, [*map(str, args), "--config", "flux-dev", "--workdir", str(workdir), "--json",
                                   "--set", f"model.path={model}", *sets])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def test_standin_has_the_hub_layout_at_full_width(standin):
    index = json.loads((standin / "transformer/diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2  # sharded
    config = json.loads((standin / "transformer/config.json").read_text())
    dev = KNOWN_ARCHITECTURES["black-forest-labs/FLUX.1-dev"]
    assert {k: config[k] for k in dev if k not in ("num_layers", "num_single_layers")} == \
           {k: v for k, v in dev.items() if k not in ("num_layers", "num_single_layers")}
    for sub in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "scheduler"):
        assert (standin / sub).is_dir()


@pytest.fixture(scope="module")
def chain(standin, tmp_path_factory):
    wd = tmp_path_factory.mktemp("standin-run")
    calib = bitflux(standin, wd, "calibrate")
    # block-recon, the default, runs act-aware as its start; absmean (a per-row ternarize) and distill (66 s
    # here alone) are tested on the tiny model: the suite must stay under 10 minutes on 2 cores
    return wd, calib, bitflux(standin, wd, "quantize", "--method", "block-recon"), bitflux(standin, wd, "pack")


def test_the_default_method_quantizes_the_full_width_model(chain):
    _, calib, q, _ = chain
    assert calib["prompts"] == 2 and calib["calls"] == 2
    fid = q["fidelity"]
    assert q["method"] == "block-recon" and q["quantized_modules"] == 20
    assert len(fid["block_rel_error"]) == 2 and 0 < fid["velocity_rel_error"] < 10
    assert all(0 < e < 10 for e in fid["block_rel_error"].values())


def test_packed_file_is_portable_and_says_where_it_came_from(chain, standin, tmp_path):
    wd, _, _, packed = chain
    meta = read_metadata(packed["path"])
    assert meta["architecture"]["num_attention_heads"] == 24 and meta["architecture"]["num_layers"] == 1
    assert meta["source"]["base_model"] == str(standin.resolve())
    shards = sorted(p.name for p in (standin / "transformer").glob("*.safetensors"))
    assert sorted(meta["source"]["weights_sha256"]) == shards
    moved = tmp_path / "elsewhere/transformer.safetensors"
    moved.parent.mkdir()
    shutil.copy(packed["path"], moved)
    hidden = standin.with_name("moved-away")
    standin.rename(hidden)  # the base model is gone
    try:
        t = load_quantized_transformer(moved)
    finally:
        hidden.rename(standin)
    assert t.transformer_blocks[0].attn.to_q.packed.shape == (3072, 3072 // 4)


def test_generate_from_the_packed_full_width_model(chain, standin, tmp_path):
    wd, *_ = chain
    out = bitflux(standin, wd, "generate", "a red circle", "--out", tmp_path / "img.png")
    assert out["height"] == 32 and (tmp_path / "img.png").stat().st_size > 0


def test_bench_reports_the_standin_architecture(chain, standin):
    wd, *_ = chain
    report = bitflux(standin, wd, "bench", "--gpu", "a10")
    assert report["model"] == str(standin.resolve()) and report["storage"]["codecs"]["2bit"]["ratio"] > 3  # 7.7 at 57 blocks; two blocks carry the embedders alone
