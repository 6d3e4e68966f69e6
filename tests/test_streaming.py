"""Streaming: safetensors read and written a tensor at a time, the FP transformer one block at a time."""

import json

import pytest
import torch
from safetensors.torch import load_file

from bitflux_cli.config import load_config
from bitflux_cli.errors import ArtifactError
from bitflux_cli.models import fp_skeleton, load_fp_transformer
from bitflux_cli.streaming import advance, block_names, blocks, head, load_block, prelude, prelude_state, streamed
from bitflux_cli.tensorfile import TensorFile, specs_of, write_tensorfile


def test_tensorfile_round_trip_is_read_by_safetensors_and_reproducible(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"b.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16), "a.codes": torch.randint(0, 255, (7,), dtype=torch.uint8),
               "c.scale": torch.rand(4, generator=g), "d.empty": torch.zeros(0, 3)}
    for name in ("one", "two"):
        write_tensorfile(tmp_path / f"{name}.safetensors", specs_of(tensors.items()), {"z": "1", "a": "2"})
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "two.safetensors").read_bytes()
    theirs = load_file(str(tmp_path / "one.safetensors"))  # the library's own reader
    mine = TensorFile(tmp_path / "one.safetensors")
    assert theirs.keys() == tensors.keys() == mine.entries.keys()
    for k, t in tensors.items():
        assert torch.equal(theirs[k], t) and torch.equal(mine.read(k), t) and mine.read(k).dtype == t.dtype
    sums = json.loads(mine.metadata["checksums"])
    assert sorted(sums) == sorted(tensors) and all(len(s) == 64 for s in sums.values())


def test_tensorfile_refuses_a_truncated_or_lying_header(tmp_path):
    path = tmp_path / "t.safetensors"
    write_tensorfile(path, specs_of([("x", torch.ones(100))]), {})
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ArtifactError, match="truncated"):
        TensorFile(path)
    path.write_bytes(b"\xff" * 8 + data[8:])  # a declared header larger than the file
    with pytest.raises(ArtifactError, match="header length"):
        TensorFile(path)


def test_write_checks_what_the_producer_made(tmp_path):
    with pytest.raises(ValueError, match="declared"):
        write_tensorfile(tmp_path / "t.safetensors", {"x": (torch.float32, (3,), lambda: torch.ones(4))}, {})
    assert not list(tmp_path.iterdir())  # nothing half-written is left


@pytest.fixture(scope="module")
def tiny():
    cfg = load_config("tiny")
    return cfg, load_fp_transformer(cfg.model)


def _kwargs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(2, 9, 64, generator=g), "encoder_hidden_states": torch.randn(2, 12, 64, generator=g),
            "pooled_projections": torch.randn(2, 64, generator=g), "timestep": torch.rand(2, generator=g),
            "guidance": torch.full((2,), 3.5), "img_ids": torch.zeros(9, 3), "txt_ids": torch.zeros(12, 3), "return_dict": False}


def test_streamed_forward_equals_the_whole_model_holding_one_block(tiny):
    cfg, whole = tiny
    skeleton, weights = fp_skeleton(cfg.model)
    assert all(p.is_meta for _, b in blocks(skeleton) for p in b.parameters())
    resident = []
    def count(*_):
        resident.append(sum(not p.is_meta for _, b in blocks(skeleton) for p in b.parameters()))
    hooks = [b.register_forward_hook(count) for _, b in blocks(skeleton)]
    with torch.no_grad(), streamed(skeleton, weights, "cpu"):
        out = skeleton(**_kwargs())[0]
    for h in hooks:
        h.remove()
    per_block = [sum(1 for _ in b.parameters()) for _, b in blocks(whole)]
    assert resident == per_block  # when each block returns, it alone is materialised
    assert all(p.is_meta for _, b in blocks(skeleton) for p in b.parameters())  # and emptied after
    with torch.no_grad():
        assert torch.equal(out, whole(**_kwargs())[0])


def test_walking_the_blocks_by_hand_is_the_forward(tiny):
    cfg, whole = tiny
    skeleton, weights = fp_skeleton(cfg.model)
    state = prelude(skeleton, _kwargs(1))
    with torch.no_grad():
        for name in block_names(skeleton):
            block = load_block(skeleton, weights, name, "cpu")
            state["encoder_hidden_states"], state["hidden_states"] = block(**state)
        velocity = head(skeleton, state["hidden_states"], state["temb"])
        assert torch.allclose(velocity, whole(**_kwargs(1))[0], rtol=1e-5, atol=1e-6)


def test_walking_the_calls_in_batches_in_place_or_not_is_the_forward(tiny):
    """prelude_state + advance over 4 calls in batches of 3 (a short last batch): in place over the
    state's own tensors, or into new ones, both give the forward's velocity of every call."""
    cfg, whole = tiny
    skeleton, weights = fp_skeleton(cfg.model)
    calls = [_kwargs(1), _kwargs(2)]  # 2 rows each
    with torch.no_grad():
        want = torch.cat([whole(**kw)[0] for kw in calls])
    got = []
    for in_place in (False, True):
        state = prelude_state(skeleton, calls)
        before = state["hidden_states"]
        for name in block_names(skeleton):
            state = advance(load_block(skeleton, weights, name, "cpu"), state, 3, "cpu", in_place=in_place)
        assert (state["hidden_states"] is before) == in_place
        with torch.no_grad():
            got.append(head(skeleton, state["hidden_states"], state["temb"]))
    assert torch.equal(got[0], got[1])  # writing over the inputs changes nothing
    assert torch.allclose(got[0], want, rtol=1e-5, atol=1e-5)  # batches of 3 rows, not 2: other matmul blocking


def test_quantize_checks_its_prompt_files_before_reading_any_weight(tmp_path, monkeypatch):
    from bitflux_cli.errors import UsageError
    from bitflux_cli.quantize import quantize
    from bitflux_cli.streaming import Weights

    def refuse(*_args, **_kwargs):
        raise AssertionError("a weight was read before the inputs were checked")

    monkeypatch.setattr(Weights, "read", refuse)
    cfg = load_config("tiny", {"workdir": str(tmp_path / "wd"), "quantization.method": "act-aware",
                               "calibration.prompts.sets": [str(tmp_path / "missing.txt")]})
    with pytest.raises(UsageError, match="missing.txt"):
        quantize(cfg)


def test_a_device_per_component():
    from bitflux_cli.models import resolve_device

    cfg = load_config("tiny", {"model.device": {"transformer": "cpu", "text_encoder_2": "meta"}}).model
    assert resolve_device(cfg).type == "cpu" and resolve_device(cfg, "text_encoder_2").type == "meta"
    assert resolve_device(cfg, "vae").type == "cpu"  # unnamed components follow the transformer
    with pytest.raises(Exception, match="model.device"):
        load_config("tiny", {"model.device": {"unet": "cpu"}})


def test_quantize_removes_the_parts_a_killed_run_left(tmp_path):
    from bitflux_cli.quantize import quantize

    stale = tmp_path / "wd/ternary/.parts-killed"
    stale.mkdir(parents=True)
    (stale / "000.safetensors").write_bytes(b"half")
    cfg = load_config("tiny", {"workdir": str(tmp_path / "wd"), "quantization.method": "absmean",
                               "quantization.eval_prompts": 1, "generate.steps": 2})
    quantize(cfg)
    assert not stale.exists() and (tmp_path / "wd/ternary/transformer.safetensors").is_file()
    assert not list((tmp_path / "wd/ternary").glob(".parts-*"))
