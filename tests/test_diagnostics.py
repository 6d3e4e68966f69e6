"""The diagnostics behind docs/QUALITY.md's where-the-points-go paragraphs: benchmarks/fp_groups.py's group
swap and benchmarks/velocity_gap.py's per-prompt velocity error, on the tiny chain's packed model;
benchmarks/rotated_ternary.py's rotated block-recon, on a short calibration; benchmarks/fold_head_rotation.py's
exact fold of a rotation per head into the bundled mini model."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bitflux_cli.calibrate import load_calibration
from bitflux_cli.config import ModelConfig, load_config
from bitflux_cli.loader import load_quantized_transformer
from bitflux_cli.models import load_pipeline
from bitflux_cli.models.source import embedded_weights
from bitflux_cli.teacher import fp_pipeline, record_transformer_calls
from bitflux_cli.ternary import TernaryLinear, scoped_linears

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fold_head_rotation import fold, transformer_output  # noqa: E402
from fp_groups import GROUPS, fp_group  # noqa: E402
from rotated_ternary import block_recon, rotated_block_recon, rotations  # noqa: E402
from velocity_gap import per_prompt_errors  # noqa: E402


@pytest.fixture(scope="module")
def models(tiny_chain):
    cfg = tiny_chain["cfg"].model_copy(update={"generate": tiny_chain["cfg"].generate.model_copy(update={"steps": 3})})
    with fp_pipeline(cfg) as (pipe, _):
        calls, _ = record_transformer_calls(pipe, ["two green circles", "a red square", "three blue triangles"],
                                            cfg.generate, seed=0, keep=2)
        yield pipe.transformer, load_quantized_transformer(Path(tiny_chain["pack"]["path"])), calls


def test_fp_group_swaps_exactly_the_group_and_restores_it_even_after_an_error(models):
    fp, packed, _ = models
    fp_linears = dict(scoped_linears(fp))
    before = {n: packed.get_submodule(n) for n in fp_linears}
    with pytest.raises(RuntimeError), fp_group(packed, fp_linears, GROUPS["single blocks"]) as swapped:
        assert swapped == sum(n.startswith("single_transformer_blocks.") for n in fp_linears) > 0
        for name in fp_linears:
            expected = fp_linears[name] if name.startswith("single_transformer_blocks.") else before[name]
            assert packed.get_submodule(name) is expected
        raise RuntimeError("a failing score")
    assert all(packed.get_submodule(n) is m and isinstance(m, TernaryLinear) for n, m in before.items())


def test_velocity_errors_are_per_prompt_zero_against_itself_and_independent_of_the_batch(models):
    fp, packed, calls = models
    assert per_prompt_errors(fp, fp, calls).tolist() == [[0.0] * 3] * 2
    errors = per_prompt_errors(fp, packed, calls)  # [calls, prompts]
    assert errors.shape == (2, 3) and (errors > 0).all()
    second = [{k: v[1:2] if torch.is_tensor(v) and v.shape[0] == 3 else v for k, v in kw.items()} for kw in calls]
    assert per_prompt_errors(fp, packed, second)[:, 0] == pytest.approx(errors[:, 1], rel=1e-4)


@pytest.mark.parametrize("kind", ["random", "hadamard"])
def test_rotations_are_orthogonal_and_hadamard_is_signed_sylvester_blocks(kind):
    get = rotations(kind, seed=3)
    for k in (128, 640):
        r = get(k)
        assert r.shape == (k, k) and torch.allclose(r @ r.T, torch.eye(k), atol=1e-5)
        assert get(k) is r  # one per width
        if kind == "hadamard":  # 640 = five blocks of 128
            assert torch.allclose(r.abs()[:128, :128], torch.full((128, 128), 128 ** -0.5)) and (r[:128, 128:] == 0).all()
    assert torch.equal(rotations("identity")(5), torch.eye(5))


def test_rotated_block_recon_is_block_recon_without_a_rotation_and_ternary_in_the_rotated_basis(tmp_path):
    cfg = load_config("tiny", {"workdir": str(tmp_path), "calibration.prompts.sets": ["mini"], "calibration.prompts.limit": 4,
                               "calibration.steps": 3, "calibration.timesteps": 2, "calibration.tokens": 8,
                               "calibration.shard_size": 2, "calibration.batch": 2, "quantization.block_recon.steps": 5})
    pipe = load_pipeline(cfg.model)
    calib = load_calibration(cfg)
    plain = block_recon.reconstruct(cfg, pipe, calib, lambda m: m.ternary_weight().detach())
    identity = rotations("identity")
    assert all(torch.equal(w, plain[n]) for n, w in rotated_block_recon(cfg, pipe, calib, identity, identity).items())
    rotation = rotations("hadamard")
    rotated = rotated_block_recon(cfg, pipe, calib, rotation, identity)
    assert block_recon.attach_ste.__module__ == "bitflux_cli.methods.ste"  # restored
    for name, w in rotated.items():
        codes = w @ rotation(w.shape[1])  # s * q [N, K]
        row = codes.abs().amax(1, keepdim=True)
        assert torch.allclose(codes / row, (codes / row).round(), atol=1e-4), name
        assert not torch.allclose(w, plain[name])
    product_rotation = cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"rotation": "hadamard"})})
    with pytest.raises(SystemExit, match="quantization.rotation=none"):  # it would rotate twice
        rotated_block_recon(product_rotation, pipe, calib, rotation, identity)


def test_head_rotation_fold_keeps_the_function_and_turns_only_values_and_attention_outputs():
    sd = load_file(embedded_weights(ModelConfig()) / "transformer.safetensors")
    folded = fold(sd, head_dim=32, seed=0)
    turned = {k for k in sd if not torch.equal(sd[k], folded[k])}
    attn = ("attn.to_v.", "attn.add_v_proj.", "attn.to_out.0.weight", "attn.to_add_out.weight", "proj_out.weight")
    assert turned == {k for k in sd if "blocks." in k and any(a in k for a in attn)}
    proj = "single_transformer_blocks.0.proj_out.weight"
    assert torch.equal(sd[proj][:, 128:], folded[proj][:, 128:])  # the MLP's columns stay
    v, v_turned = (w["transformer_blocks.1.attn.to_v.weight"].double().reshape(4, 32, 128) for w in (sd, folded))
    assert torch.allclose(v.mT @ v, v_turned.mT @ v_turned)  # each head turned by an orthogonal [32, 32] alone
    before, after = transformer_output(sd), transformer_output(folded)
    assert (after - before).norm() / before.norm() < 1e-5
