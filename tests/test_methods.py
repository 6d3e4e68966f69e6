"""Quantization methods on the tiny model: exact ternary codes, and each lowers the error it targets vs absmean."""

import copy
import sys
from pathlib import Path

import pytest
import torch

from bitflux_cli.calibrate import load_calibration, teacher_kwargs
from bitflux_cli.config import load_config
from bitflux_cli.fidelity import IMAGE, REPORT_PROMPTS, TEXT, _block_outputs
from bitflux_cli.methods import METHODS, run_method
from bitflux_cli.methods.act_aware import search, weighted_error
from bitflux_cli.methods.adaround import GAMMA, ZETA, AdaRound, _SoftCodes
from bitflux_cli.methods.ste import STELinear
from bitflux_cli.models import load_pipeline
from bitflux_cli.teacher import record_transformer_calls, velocity_errors
from bitflux_cli.ternary import quantize_transformer, scoped_linears



def tiny(workdir: Path, **overrides):
    """The tiny config with an eight-prompt calibration in the mini world's language and short training."""
    base = {"workdir": str(workdir), "calibration.prompts.sets": ["mini"], "calibration.prompts.limit": 8,
            "calibration.steps": 4, "calibration.timesteps": 2, "calibration.tokens": 8,
            "calibration.shard_size": 2, "calibration.batch": 2, "generate.steps": 4,
            "quantization.block_recon.steps": 30, "quantization.distill.steps": 30}
    return load_config("tiny", base | overrides)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared with other jobs: two threads per process thrash
    cfg = tiny(tmp_path_factory.mktemp("methods"))
    pipe = load_pipeline(cfg.model)
    pipe.set_progress_bar_config(disable=True)
    calib = load_calibration(cfg)
    held_out, _ = record_transformer_calls(pipe, REPORT_PROMPTS[:2], cfg.generate, seed=10_000, keep=4)
    codes = {m: run(cfg, pipe, calib, m) for m in METHODS}
    yield {"cfg": cfg, "pipe": pipe, "calib": calib, "codes": codes, "held_out": held_out}
    torch.set_num_threads(n)


def run(cfg, pipe, calib, method):
    return run_method(cfg.model_copy(update={"quantization": cfg.quantization.model_copy(update={"method": method})}), pipe, calib)


def student(pipe, codes):
    model = copy.deepcopy(pipe.transformer)
    quantize_transformer(model, codes)
    return model


def block_error(pipe, codes, calls) -> float:
    """Mean over blocks and calls of the relative image-stream output error of the student vs FP."""
    fp, q = (_block_outputs(model, calls, IMAGE)[0] for model in (pipe.transformer, student(pipe, codes)))
    return sum(float((q[n][i] - fp[n][i]).norm() / fp[n][i].norm()) for n in fp for i in range(len(calls))) / (len(fp) * len(calls))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_exact_ternary_codes_and_scales(setup, method):
    codes = setup["codes"][method]
    linears = dict(scoped_linears(setup["pipe"].transformer))
    assert codes.keys() == linears.keys()
    for name, (c, s) in codes.items():
        assert c.dtype == torch.int8 and c.shape == linears[name].weight.shape
        assert set(c.unique().tolist()) <= {-1, 0, 1}
        assert s.dtype == torch.float32 and s.shape == (c.shape[0],) and torch.isfinite(s).all() and (s > 0).all()


def test_act_aware_lowers_the_weighted_layer_error(setup):
    aa, am = setup["codes"]["act-aware"], setup["codes"]["absmean"]
    total_aa = total_am = 0.0
    for name, lin in scoped_linears(setup["pipe"].transformer):
        d = setup["calib"].second_moment(name)
        e_aa, e_am = weighted_error(lin.weight, *aa[name], d), weighted_error(lin.weight, *am[name], d)
        assert (e_aa <= e_am * (1 + 1e-5)).all(), name
        total_aa, total_am = total_aa + e_aa.sum().item(), total_am + e_am.sum().item()
    assert total_aa < 0.9 * total_am


def test_act_aware_search_in_row_chunks_equals_one_pass(monkeypatch):
    module = sys.modules["bitflux_cli.methods.act_aware"]  # the package exports a function of the same name
    weight, d = torch.randn(1000, 384, generator=torch.Generator().manual_seed(0)).bfloat16(), torch.rand(384) * 3
    whole = search(weight, d, [0.5, 0.3, 0.7, 1.0])
    monkeypatch.setattr(module, "_CHUNK", 384 * 100)  # chunks of 64 rows, the last one 40
    chunked = search(weight, d, [0.5, 0.3, 0.7, 1.0])
    assert torch.equal(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1], rtol=1e-6, atol=0)


def test_block_recon_lowers_the_block_output_error(setup):
    calls = setup["held_out"]
    err = {m: block_error(setup["pipe"], setup["codes"][m], calls) for m in ("absmean", "act-aware", "block-recon")}
    assert err["block-recon"] < err["act-aware"] < err["absmean"], err


def test_block_recon_with_learned_rounding_exports_exact_codes_and_beats_act_aware(setup, tmp_path):
    cfg = tiny(tmp_path, **{"quantization.block_recon.rounding": "adaround"})
    codes = run(cfg, setup["pipe"], setup["calib"], "block-recon")
    for c, s in codes.values():
        assert c.dtype == torch.int8 and set(c.unique().tolist()) <= {-1, 0, 1} and (s > 0).all()
    err = {m: block_error(setup["pipe"], c, setup["held_out"]) for m, c in (("adaround", codes), ("act-aware", setup["codes"]["act-aware"]))}
    assert err["adaround"] < err["act-aware"], err
    assert cfg.quantization.block_recon.model_dump()["rounding"] == "adaround"
    assert "rounding" not in setup["cfg"].quantization.block_recon.model_dump()  # the default's files keep their bytes


def _learned_rounding(seed: int = 0) -> tuple[dict[str, STELinear], AdaRound, torch.Generator]:
    """Two STE linears of different shapes at absmean's scales (some |w| > s on both signs), and their AdaRound."""
    g = torch.Generator().manual_seed(seed)
    ste = {}
    for name, (n, k) in {"a": (8, 64), "b": (5, 16)}.items():
        linear = torch.nn.Linear(k, n)
        linear.weight.data = torch.randn(n, k, generator=g)  # [N, K]
        scale = linear.weight.data.abs().mean(1)  # [N]
        ste[name] = STELinear(linear, scale / 2, scale)
    return ste, AdaRound(ste), g


def test_learned_rounding_starts_at_the_clipped_weight_and_fixes_the_codes_it_chose():
    ste, rounding, g = _learned_rounding()
    weights = {name: m.weight.detach().clone() for name, m in ste.items()}
    scales = {name: m.log_scale.detach().exp() for name, m in ste.items()}
    assert rounding.v.requires_grad and not any(m.weight.requires_grad for m in ste.values())
    assert rounding.soft(None) == 0
    for name, m in ste.items():  # soft codes: w / s itself, clipped to the grid
        s = scales[name][:, None]
        torch.testing.assert_close(m.ternary_weight(), torch.minimum(torch.maximum(weights[name], -s), s), rtol=0, atol=1e-5)
    rounding.v.data = torch.randn(rounding.v.shape, generator=g)
    assert rounding.soft(2.0) > 0
    x = torch.randn(3, 64, generator=g)
    hard = rounding.floor + (rounding.v >= 0).to(torch.int8)  # [P]
    rounding.fix()
    got = torch.cat([m.export()[0].flatten() for m in ste.values()])
    assert torch.equal(got, hard) and set(got.unique().tolist()) == {-1, 0, 1}
    for name, m in ste.items():
        codes, s = m.export()
        assert m.codes is None and torch.equal(m.ternary_weight(), codes.float() * s[:, None])
    with torch.no_grad():
        assert torch.equal(ste["a"](x), torch.nn.functional.linear(x, ste["a"].export()[0].float() * scales["a"][:, None],
                                                                    ste["a"].bias))


def test_learned_rounding_chooses_between_the_two_grid_points_around_each_weight_on_both_signs():
    ste, rounding, _ = _learned_rounding()
    r = torch.cat([(m.weight / m.log_scale.exp()[:, None]).flatten() for m in ste.values()]).detach()  # [P]
    assert (r > 1).any() and (r < -1).any()
    assert torch.equal(rounding.floor, torch.where(r < 0, -1, 0).to(torch.int8))  # w >= s may still become 0, as w <= -s may
    rounding.v.data = torch.where(torch.rand(rounding.v.shape) > 0.5, 10.0, -10.0)  # every choice made
    assert rounding.soft(2.0) == 0
    rounding.v.data.fill_(-10.0)  # every weight rounded towards 0 or -1
    rounding.fix()
    assert torch.equal(torch.cat([m.export()[0].flatten() for m in ste.values()]), rounding.floor)


@pytest.mark.parametrize("beta", [None, 2.0, 7.3, 20.0])
def test_learned_rounding_backward_matches_autograd_of_adarounds_formulas(beta):
    _, rounding, g = _learned_rounding()
    v = (torch.randn(rounding.v.shape, generator=g, dtype=torch.float64) * 3).requires_grad_()  # saturated and not
    sizes = rounding.sizes
    grad_codes = torch.randn(v.shape, generator=g, dtype=torch.float64)
    codes, penalty = _SoftCodes.apply(v, rounding.floor, sizes, beta)
    got = torch.autograd.grad((codes * grad_codes).sum() + 0.7 * penalty, v)[0]
    h = (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)  # AdaRound's rectified sigmoid
    want_codes = rounding.floor + h
    want_penalty = (sum((1 - (2 * part - 1).abs().pow(beta)).mean() for part in h.split(sizes)) / len(sizes)
                    if beta else torch.zeros((), dtype=torch.float64))
    want = torch.autograd.grad((want_codes * grad_codes).sum() + 0.7 * want_penalty, v)[0]
    torch.testing.assert_close(codes, want_codes, rtol=0, atol=1e-15)
    torch.testing.assert_close(penalty, want_penalty, rtol=0, atol=1e-15)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def context_error(pipe, codes, calls) -> float:
    """Relative error of the first double block's text-stream output, student vs FP (same inputs: the embedders are FP)."""
    fp, q = (torch.cat(_block_outputs(model, calls, TEXT)[0]["transformer_blocks.0"])
             for model in (pipe.transformer, student(pipe, codes)))
    return float((q - fp).norm() / fp.norm())


def test_block_recon_context_weight_lowers_the_text_stream_error(setup, tmp_path):
    cfg = tiny(tmp_path, **{"quantization.block_recon.context_weight": 1.0})
    with_context = run(cfg, setup["pipe"], setup["calib"], "block-recon")
    image_only = tiny(tmp_path, **{"quantization.block_recon.context_weight": 0.0})
    without = run(image_only, setup["pipe"], setup["calib"], "block-recon")
    err = [context_error(setup["pipe"], codes, setup["held_out"]) for codes in (with_context, without)]
    assert err[0] < 0.9 * err[1], err


def test_distill_lowers_the_velocity_error(setup):
    pipe, codes = setup["pipe"], setup["codes"]
    records = setup["calib"].records()
    train = [teacher_kwargs(records, torch.tensor([i]), pipe.device) for i in range(len(records["calls.step"]))]
    for calls in (train, setup["held_out"]):
        start = sum(velocity_errors(pipe.transformer, student(pipe, codes["absmean"]), calls))
        trained = sum(velocity_errors(pipe.transformer, student(pipe, codes["distill"]), calls))
        assert trained < 0.95 * start, (trained, start)


def test_distill_resumes_from_its_checkpoint(setup, tmp_path):
    pipe, calib = setup["pipe"], setup["calib"]
    short = tiny(tmp_path, **{"quantization.distill.steps": 4, "quantization.distill.save_every": 2})
    METHODS["distill"](short, pipe, calib)
    assert (tmp_path / "distill/state.safetensors").is_file()
    resumed = METHODS["distill"](tiny(tmp_path, **{"quantization.distill.steps": 8}), pipe, calib)
    (tmp_path / "distill/state.safetensors").unlink()
    straight = METHODS["distill"](tiny(tmp_path, **{"quantization.distill.steps": 8}), pipe, calib)
    for name in straight:
        assert torch.equal(resumed[name][0], straight[name][0]) and torch.equal(resumed[name][1], straight[name][1])


def test_block_recon_keeps_its_activations_within_the_budget(setup):
    from bitflux_cli.methods.block_recon import BlockRecon

    records = setup["calib"].records(lambda k: k == "calls.hidden_states")
    n, per_call = len(records["calls.step"]), None
    full = BlockRecon(setup["cfg"], setup["pipe"].transformer, setup["calib"])
    text = full.state["encoder_hidden_states"][0]  # the FP block's text-stream target, one a call, is held too
    per_call = sum(full.state[k][0].numel() * full.state[k].element_size() for k in ("hidden_states", "encoder_hidden_states"))
    per_call += text.numel() * text.element_size() * (setup["cfg"].quantization.block_recon.context_weight > 0)
    assert full.calls == n
    budget = 3.5 * per_call / 1e9  # room for three calls
    cfg = setup["cfg"].model_copy(update={"quantization": setup["cfg"].quantization.model_copy(update={"activation_budget_gb": budget})})
    capped = BlockRecon(cfg, setup["pipe"].transformer, setup["calib"])
    assert capped.calls == 3 and capped.state["hidden_states"].shape[0] == 3
