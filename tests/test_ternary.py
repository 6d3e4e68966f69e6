"""absmean ternarization, TernaryLinear, the quantization scope and the FLUX.1-dev fraction."""

import torch
from torch import nn

from bitflux_cli import TernaryLinear, quantize_transformer, ternarize
from bitflux_cli.config import load_config
from bitflux_cli.models import build_meta_transformer
from bitflux_cli.ternary import in_scope, parameter_counts, scoped_linears


def test_absmean_formula():
    w = torch.randn(16, 40)
    codes, scale = ternarize(w)
    assert torch.allclose(scale, w.abs().mean(dim=1))
    assert torch.equal(codes, torch.clamp(torch.round(w / scale[:, None]), -1, 1).to(torch.int8))
    assert set(codes.unique().tolist()) <= {-1, 0, 1}


def test_ternary_linear_matches_dense_ternary_weight():
    lin = nn.Linear(200, 37)
    codes, scale = ternarize(lin.weight)
    q = TernaryLinear.from_codes(codes, scale, lin.bias.detach())
    x = torch.randn(3, 5, 200)
    ref = x @ (codes.float() * scale[:, None]).T + lin.bias
    assert torch.allclose(q(x), ref, atol=1e-4, rtol=1e-4)
    # frozen parameters, as bitsandbytes' and torchao's weights are: offload hooks move them
    assert {n: p.requires_grad for n, p in q.named_parameters()} == {"packed": False, "scale": False, "bias": False}


def test_scope_matches_full_paths_only():
    t = build_meta_transformer(load_config("tiny").model)
    names = [n for n, _ in scoped_linears(t)]
    assert "proj_out" not in names and "single_transformer_blocks.0.proj_out" in names
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in names)
    assert not in_scope("transformer_blocks.0.norm1.linear", nn.LayerNorm(4))


def test_flux_dev_quantized_fraction_is_99_5_percent():
    counts = parameter_counts(build_meta_transformer(load_config("flux-dev").model))
    assert counts["total_params"] == 11_901_408_320
    assert round(100 * counts["fraction"], 1) == 99.5  # linears of the blocks, as the paper counts
    assert round(100 * counts["ternary_weight_fraction"], 2) == 99.44  # their weights alone
    assert counts["quantized_modules"] == 19 * 14 + 38 * 6  # 14 linears a double block, 6 a single


def test_quantize_transformer_replaces_every_block_linear():
    from bitflux_cli.models import load_fp_transformer
    t = load_fp_transformer(load_config("tiny").model)
    n_before = len(list(scoped_linears(t)))
    used = quantize_transformer(t)
    assert len(used) == n_before and not list(scoped_linears(t))
    assert isinstance(t.proj_out, nn.Linear)  # top-level proj_out stays full precision
