"""The diagnostics behind the README's where-the-points-go paragraph: benchmarks/fp_groups.py's group
swap and benchmarks/velocity_gap.py's per-prompt velocity error, on the tiny chain's packed model."""

import sys
from pathlib import Path

import pytest
import torch

from bitflux_cli.loader import load_quantized_transformer
from bitflux_cli.teacher import fp_pipeline, record_transformer_calls
from bitflux_cli.ternary import TernaryLinear, scoped_linears

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fp_groups import GROUPS, fp_group  # noqa: E402
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
