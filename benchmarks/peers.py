"""Peer quantizers (HQQ, optimum-quanto, SDNQ, torchao) at 2 and 4 bits, scored by ``bitflux eval``'s mini-world harness.

    python benchmarks/peers.py [--peers hqq-2-g64,...] [--images 4] [--workdir runs/peers] [--out benchmarks/results/peers.json]

``pip install -e '.[peers]'`` first (optional extras, not core dependencies). For each peer the FP pipeline of the
embedded model (``configs/tiny.yaml``: float32, CPU) is loaded, exactly bitflux's scope is quantized with the peer's
own public API and recommended settings (``bitflux_cli.ternary.scoped_linears``: the 52 linears of the double and
single blocks; checked after quantizing), everything else (embedders, norms, top-level ``proj_out``, text encoders,
VAE) stays FP, and ``bitflux_cli.evaluate.score_pipeline`` scores it: 192 held-out prompts x ``--images``, the
seeds of ``bitflux eval``. FP is scored fresh in the same run, so every ratio has the same denominator; bitflux's
own methods are read from ``benchmarks/results/mini-quality.json`` (``benchmarks/mini_quality.sh``), not rerun.

Bits per weight, one function for everyone (``bits_per_weight``), over the in-scope linears' weights:

    bpw = (sum code_bits * weights + 16 * (scales + zero_points)) / sum weights

``code_bits`` is the format's code width (HQQ's 1.58-bit codes are stored in 2 bits; torchao holds its int2/int4
codes unpacked in int8 in memory and is counted at 2/4); every scale and zero point counts 16 bits whatever dtype the
library holds it in; a zero-point tensor that is identically zero (a symmetric format's) is not counted. bitflux's
2-bit format is 2 bits a weight + one scale a row: 2 + 16/K here, and 2 + 32/K at its real fp32 scale.
A setting that a library cannot run on the CPU is recorded with its error, not scored.
"""

import argparse
import importlib.metadata
import json
import os
import shlex
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from bitflux_cli.artifacts import atomic_file
from bitflux_cli.config import load_config
from bitflux_cli.miniworld.scorer import paired_stderr
from bitflux_cli.miniworld.world import balanced_prompts
from bitflux_cli.ternary import scoped_linears

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ["torch", "diffusers", "hqq", "optimum-quanto", "sdnq", "torchao"]
META_BITS = 16


@dataclass(frozen=True)
class Storage:
    """What one quantized linear stores: its weight count, the code width and how many scales and zero points."""

    weights: int
    code_bits: int
    scales: int
    zeros: int


def bits_per_weight(layers: list[Storage], meta_bits: int = META_BITS) -> float:
    """(code bits x weights + ``meta_bits`` for each scale and zero point) / weights, summed over ``layers``."""
    return sum(s.code_bits * s.weights + meta_bits * (s.scales + s.zeros) for s in layers) / sum(s.weights for s in layers)


def storage(weights: int, code_bits: int, scale: torch.Tensor, zero: torch.Tensor | None) -> Storage:
    """A layer's ``Storage``; ``zero`` not counted when absent or identically zero (a symmetric format)."""
    return Storage(weights, code_bits, scale.numel(), 0 if zero is None or not zero.any() else zero.numel())


def bitflux_storage(transformer: nn.Module) -> list[Storage]:
    """bitflux's 2-bit format on the in-scope linears: 2 bits a weight, one scale a row, no zero point."""
    return [Storage(lin.weight.numel(), 2, lin.out_features, 0) for _, lin in scoped_linears(transformer)]


def signature(model: nn.Module) -> dict[str, str]:
    """Each module's class and its weight's class, by full name: what a quantizer changes."""
    return {name: f"{type(m).__qualname__}/{type(getattr(m, 'weight', None)).__qualname__}" for name, m in model.named_modules()}


def changed(before: dict[str, str], model: nn.Module) -> set[str]:
    """Names of ``before``'s modules that ``model`` has replaced, removed, or whose weight became another class."""
    after = signature(model)
    return {name for name, sig in before.items() if after.get(name) != sig}


# --- the peers: each quantizes the named linears of a transformer in place and returns their Storage, by name

def hqq(nbits: float, group_size: int):
    """HQQ's ``HQQLinear`` in place of each linear (float32 compute on the CPU)."""
    def apply(t: nn.Module, names: list[str]) -> dict[str, Storage]:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
        out = {}
        for name in names:
            q = HQQLinear(t.get_submodule(name), BaseQuantizeConfig(nbits=nbits, group_size=group_size),
                          compute_dtype=torch.float32, device="cpu")
            t.set_submodule(name, q)
            # packing "2bit_u8" / "4bit_u8": the stored code width (1.58-bit codes are kept in 2 bits)
            out[name] = storage(q.meta["shape"].numel(), int(q.meta["packing"][0]), q.meta["scale"], q.meta["zero"])
        return out
    return apply


def quanto(qtype: str):
    """optimum-quanto's ``quantize`` (with its HQQ optimizer) on exactly the named modules, then ``freeze``."""
    def apply(t: nn.Module, names: list[str]) -> dict[str, Storage]:
        from optimum.quanto import freeze, qtypes, quantize
        from optimum.quanto.tensor.optimizers import HqqOptimizer
        quantize(t, weights=qtypes[qtype], optimizer=HqqOptimizer(), include=names)
        freeze(t)
        out = {}
        for name in names:
            w = t.get_submodule(name).weight  # WeightQBitsTensor: _data codes, _scale and _shift a group (128, or a row)
            out[name] = storage(w.numel(), w.qtype.bits, w._scale, w._shift)
        return out
    return apply


def sdnq(dtype: str, group_size: int):
    """SDNQ's ``sdnq_post_load_quant`` on each double and single block (every linear of a block is in scope)."""
    def apply(t: nn.Module, names: list[str]) -> dict[str, Storage]:
        from sdnq import sdnq_post_load_quant
        from sdnq.common import dtype_dict
        # block by block, add_skip_keys=False: SDNQ's own FLUX skip list would keep the single blocks' proj_out
        # and single block 0's norm.linear FP, outside the scope everyone else quantizes; weight-only (no int8 matmul)
        for blocks in (t.transformer_blocks, t.single_transformer_blocks):
            for block in blocks:
                sdnq_post_load_quant(block, weights_dtype=dtype, group_size=group_size, use_quantized_matmul=False,
                                     add_skip_keys=False)
        out = {}
        for name in names:
            m = t.get_submodule(name)
            d = m.sdnq_dequantizer
            out[name] = storage(d.original_shape.numel(), dtype_dict[d.weights_dtype]["num_bits"], m.scale, m.zero_point)
        return out
    return apply


def torchao(config: Callable[[], object], code_bits: int):
    """torchao's ``quantize_`` with the config ``config()`` makes, filtered to the named modules by full path."""
    def apply(t: nn.Module, names: list[str]) -> dict[str, Storage]:
        from torchao.quantization import quantize_
        quantize_(t, config(), filter_fn=lambda _m, fqn: fqn in names)
        out = {}
        for name in names:
            w = t.get_submodule(name).weight  # IntxUnpackedToInt8Tensor: qdata int8, scale and zero_point a group
            out[name] = storage(w.numel(), code_bits, w.scale, w.zero_point)
        return out
    return apply


def intx(dtype: str, group_size: int):
    """torchao's ``IntxWeightOnlyConfig`` (symmetric, groups along K): runs on the CPU."""
    def make():
        from torchao.quantization import IntxWeightOnlyConfig, PerGroup
        return IntxWeightOnlyConfig(weight_dtype=getattr(torch, dtype), granularity=PerGroup(group_size))
    return make


def int4_weight_only(group_size: int):
    """torchao's ``Int4WeightOnlyConfig``: its int4 weight-only recipe (GPU kernels)."""
    def make():
        from torchao.quantization import Int4WeightOnlyConfig
        return Int4WeightOnlyConfig(group_size=group_size)
    return make


PEERS = {  # name: (library, settings, apply)
    "hqq-2-g64": ("hqq", "HQQLinear, BaseQuantizeConfig(nbits=2, group_size=64) (axis=1, optimize=True)", hqq(2, 64)),
    "hqq-2-g128": ("hqq", "HQQLinear, BaseQuantizeConfig(nbits=2, group_size=128)", hqq(2, 128)),
    "hqq-1.58-g64": ("hqq", "HQQLinear, BaseQuantizeConfig(nbits=1.58, group_size=64): 3 levels in 2-bit codes", hqq(1.58, 64)),
    "hqq-4-g64": ("hqq", "HQQLinear, BaseQuantizeConfig(nbits=4, group_size=64): HQQ's recommended start", hqq(4, 64)),
    "quanto-qint2-hqq": ("optimum-quanto", "quantize(weights=qint2, optimizer=HqqOptimizer()), freeze; groups of 128 "
                         "(a row where K = 128)", quanto("qint2")),
    "quanto-qint4-hqq": ("optimum-quanto", "quantize(weights=qint4, optimizer=HqqOptimizer()), freeze", quanto("qint4")),
    "sdnq-uint2-g64": ("sdnq", "sdnq_post_load_quant(weights_dtype='uint2', group_size=64, use_quantized_matmul=False)",
                       sdnq("uint2", 64)),
    "sdnq-uint4-g64": ("sdnq", "sdnq_post_load_quant(weights_dtype='uint4', group_size=64, use_quantized_matmul=False)",
                       sdnq("uint4", 64)),
    "torchao-int2-g32": ("torchao", "quantize_(IntxWeightOnlyConfig(weight_dtype=torch.int2, granularity=PerGroup(32)))",
                         torchao(intx("int2", 32), 2)),
    "torchao-int4-g32": ("torchao", "quantize_(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))",
                         torchao(intx("int4", 32), 4)),
    "torchao-int4wo-g128": ("torchao", "quantize_(Int4WeightOnlyConfig(group_size=128)): torchao's int4 weight-only",
                            torchao(int4_weight_only(128), 4)),
}


def quantize_scope(pipe, apply) -> list[Storage]:
    """Quantize the pipeline's in-scope linears with ``apply``; refuse a peer that changed any other module."""
    t = pipe.transformer
    names = [name for name, _ in scoped_linears(t)]
    before = signature(t)
    layers = apply(t, names)
    if (got := changed(before, t)) != set(names):
        raise RuntimeError(f"quantized outside bitflux's scope: {sorted(got ^ set(names))}")
    return [layers[n] for n in names]


def score(cfg, sheet: str, apply=None) -> dict:
    """Load the FP pipeline, quantize its scope with ``apply`` (None: FP), score it; with timings and bits."""
    from bitflux_cli.evaluate import score_pipeline
    from bitflux_cli.teacher import fp_pipeline
    with fp_pipeline(cfg) as (pipe, _):
        t0 = time.perf_counter()
        layers = quantize_scope(pipe, apply) if apply else None
        t1 = time.perf_counter()
        result = score_pipeline(cfg, pipe, sheet)
        t2 = time.perf_counter()
    extra = {"bits_per_weight": bits_per_weight(layers), "quantized_linears": len(layers),
             "quantized_weights": sum(s.weights for s in layers)} if layers else {}
    return extra | {"quantize_s": round(t1 - t0, 1), "score_s": round(t2 - t1, 1)} | result


def bitflux_rows(path: Path, fp: float, transformer: nn.Module) -> dict:
    """bitflux's own methods from ``mini-quality.json`` (2-bit codec), with bits a weight by ``bits_per_weight``."""
    report = json.loads(path.read_text())
    layers = bitflux_storage(transformer)
    return {"source": os.path.relpath(path, ROOT), "command": report["command"], "fp_overall": report["fp"]["overall"],
            "bits_per_weight": bits_per_weight(layers), "bits_per_weight_fp32_scale": bits_per_weight(layers, 32),
            "methods": {m: {"overall": r["eval"]["overall"], "categories": r["eval"]["categories"],
                            "ratio_to_fp": r["eval"]["overall"] / fp, "ratio_to_own_fp": r["ratio_to_fp"]}
                        for m, r in report["methods"].items()}}


def versions() -> dict:
    """Installed version of each library in ``LIBRARIES`` (None: not installed)."""
    out = {}
    for lib in LIBRARIES:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = None
    return out


def write(report: dict, out: Path) -> None:
    """The report as JSON, atomically (temp file, then rename)."""
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")


def table(report: dict) -> str:
    """The report as a plain-text table: bits a weight, overall, its standard error, ratio to FP, scoring time."""
    fp = report["fp"]["overall"]
    rows = [f"{'model':<22}{'bits/w':>8}{'overall':>9}{'+-':>7}{'x FP':>7}{'score s':>9}",
            f"{'full precision':<22}{32:>8}{fp:>9.3f}{report['fp']['overall_stderr']:>7.3f}{1:>7.3f}{report['fp']['score_s']:>9.0f}"]
    bf = report["bitflux"]
    for m, r in bf["methods"].items():
        rows.append(f"{'bitflux ' + m:<22}{bf['bits_per_weight']:>8.3f}{r['overall']:>9.3f}{'':>7}{r['ratio_to_fp']:>7.3f}")
    for name, r in report["peers"].items():
        if "error" in r:
            rows.append(f"{name:<22}  not run on CPU: {r['error'][:80]}")
        else:
            rows.append(f"{name:<22}{r['bits_per_weight']:>8.3f}{r['overall']:>9.3f}{r['overall_stderr']:>7.3f}"
                        f"{r['ratio_to_fp']:>7.3f}{r['score_s']:>9.0f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of: {', '.join(PEERS)}")
    p.add_argument("--images", type=int, default=4, help="images a prompt (eval.images_per_prompt)")
    p.add_argument("--workdir", type=Path, default=Path("runs/peers"), help="contact sheets go to WORKDIR/eval/")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/peers.json")
    p.add_argument("--bitflux", type=Path, default=ROOT / "benchmarks/results/mini-quality.json",
                   help="bitflux's own scores (benchmarks/mini_quality.sh), read, not rerun")
    args = p.parse_args(argv)
    names = [n for n in args.peers.split(",") if n]
    if unknown := [n for n in names if n not in PEERS]:
        p.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    cfg = load_config("tiny", {"workdir": str(args.workdir), "model.device": "cpu",
                                  "eval.images_per_prompt": args.images})
    report = {"command": shlex.join(["python", "benchmarks/peers.py", *(sys.argv[1:] if argv is None else argv)]),
              "versions": versions(), "config": "tiny", "device": "cpu", "dtype": cfg.model.dtype,
              "bits_formula": "(code_bits * weights + 16 * (scales + zero_points)) / weights over the 52 in-scope linears",
              "fp": score(cfg, "fp")}
    fp = report["fp"]["overall"]
    from bitflux_cli.models import build_meta_transformer
    report["bitflux"] = bitflux_rows(args.bitflux, fp, build_meta_transformer(cfg.model))
    report["peers"] = {}
    write(report, args.out)
    specs = balanced_prompts(cfg.eval.split, cfg.eval.seed, cfg.eval.per_category)  # the prompts score_pipeline scores
    for name in names:
        library, settings, apply = PEERS[name]
        entry = {"library": library, "version": report["versions"][library], "settings": settings}
        try:
            r = score(cfg, f"peer-{name}", apply)
        except Exception as exc:  # a setting the library cannot run here: recorded, not scored
            entry["error"] = f"{type(exc).__name__}: {exc}".strip()
            entry["traceback_tail"] = traceback.format_exc().strip().splitlines()[-6:]
        else:
            entry |= r | {"ratio_to_fp": r["overall"] / fp,
                          "diff_to_fp_stderr": paired_stderr(specs, r["per_prompt"], report["fp"]["per_prompt"])}
        report["peers"][name] = entry
        write(report, args.out)  # after every peer: a long run keeps what it measured
    print(table(report))
    return report


if __name__ == "__main__":
    main()
