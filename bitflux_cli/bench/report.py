"""``run_bench``: the bench stage's one entry point, and its table for the terminal."""

from pathlib import Path

import torch
from rich.table import Table

from ..artifacts import check_output_file
from ..config import Config
from ..models import build_meta_transformer, model_id, resolve_device
from .accounting import GB, storage
from .memory import MODES, memory_projection
from .profiles import PROFILES, gpu_profile, profile_for_device
from .roofline import latency_projection

STORAGE_LABEL = ("tensor data of the checkpoint (codes, fp32 scales, bf16 low-rank residual and int8 rotation signs "
                 "if any, dense bf16); "
                 "safetensors header not counted")


def _notes(cuda: bool, device: str, profile: dict | None, present: str | None, random_weights: bool, batch: int) -> list[str]:
    if not cuda:
        notes = ["no CUDA device: projection only"]
        if profile is None:
            notes.append(f"no GPU named: latency not projected (name one with --gpu: {', '.join(PROFILES)})")
        if random_weights:
            notes.append("--random-weights only applies to measured mode (needs CUDA)")
        return notes
    notes = [f"measured on the present device, {device}, batch 1" + ("" if batch == 1 else f" (bench.batch={batch} is used for projections only)")]
    if profile is None:
        notes.append(f"present device {device} has no profile: nothing projected")
    elif profile["key"] != present:
        notes.append(f"present device is {device}, profile is {profile['name']}: "
                     f"measured figures are for {device}, {profile['name']} figures are projected")
    else:
        notes.append(f"projection for {profile['name']} given beside the measurement for comparison")
    return notes


def _cuda_device(cfg: Config) -> torch.device:
    """The CUDA device bench measures on: the transformer's ``model.device`` when it names one, else cuda."""
    device = resolve_device(cfg.model)
    return device if device.type == "cuda" else torch.device("cuda")


def run_bench(cfg: Config, gpu: str | None, random_weights: bool, plot: Path | None) -> dict:
    """Benchmark the configured transformer; returns the JSON report (see the keys below).

    Storage and memory always come from shapes on the meta device, with the residual of
    ``quantization.residual_rank`` (0: pure ternary) and the rotation of ``quantization.rotation`` counted
    in storage, memory and latency. Latency is projected (roofline)
    for the GPU profile ``gpu`` (else ``bench.gpu``, else the present CUDA device's profile) and
    measured when CUDA is present (``random_weights``: random full-size weights, no download).
    Keys: model, storage {bf16_bytes, codecs {2bit, base3} {bytes, ratio, bits_per_weight, ...}, residual
    {rank, bytes, bytes_per_rank}, rotation {kind, bytes}}, params, memory,
    latency {projected, measured}, measured, device, gpu_profile, notes, plot.
    """
    gpu = gpu or cfg.bench.gpu
    profile = gpu_profile(gpu) if gpu else None  # unknown names fail before any work
    if plot is not None:
        check_output_file(plot, "--plot", cfg.workdir)  # and a bad plot path
    cuda = torch.cuda.is_available()
    measured_on = _cuda_device(cfg) if cuda else None
    device = torch.cuda.get_device_name(measured_on) if cuda else "cpu"
    present = profile_for_device(device) if cuda else None
    if profile is None and present is not None:
        profile = gpu_profile(present)

    model = build_meta_transformer(cfg.model)
    text_tokens, res, batch = cfg.generate.max_sequence_length, cfg.bench.resolutions, cfg.bench.batch
    rank, rotated = cfg.quantization.residual_rank, cfg.quantization.rotation != "none"
    st = storage(model, rank, rotated)
    latency = {"projected": None, "measured": None}
    if profile is not None:
        latency["projected"] = latency_projection(model, profile, res, batch, text_tokens, cfg.generate.steps, rank, rotated,
                                                  cfg.model.fuse_projections)
    if cuda:
        from .measure import measure  # CUDA-only path

        latency["measured"] = measure(cfg, random_weights, measured_on)
    report = {
        "model": model_id(cfg.model),
        "storage": {"label": STORAGE_LABEL, "bf16_bytes": st["bf16_bytes"], "codecs": st["codecs"], "residual": st["residual"],
                    "rotation": st["rotation"]},
        "params": st["params"],
        "memory": memory_projection(model, st, res, batch, text_tokens),
        "latency": latency,
        "measured": cuda,
        "device": device,
        "gpu_profile": profile,
        "notes": _notes(cuda, device, profile, present, random_weights, batch),
        "plot": None,
    }
    if plot is not None:
        from .plot import plot_report  # matplotlib only when a plot is asked for

        report["plot"] = str(plot_report(report, plot))
    return report


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if not a or not b else f"{a / b:.2f}x"


def render_table(report: dict) -> Table:
    """The report as a rich table (for stderr): storage, memory, fits and latency per resolution."""
    table = Table(title=f"bitflux bench: {report['model']}", caption="\n".join(report["notes"]))
    for col in ("", "bf16", "1.58-bit: 2bit | W2A16", "1.58-bit: base3 | W2A8", "bf16 / 1.58-bit"):
        table.add_column(col, justify="left" if not col else "right")
    st, c = report["storage"], report["storage"]["codecs"]
    table.add_row("storage (GB)", _gb(st["bf16_bytes"]), _gb(c["2bit"]["bytes"]), _gb(c["base3"]["bytes"]),
                  f"{c['2bit']['ratio']:.2f}x | {c['base3']['ratio']:.2f}x")
    table.add_row("bits per ternary weight", "16", f"{c['2bit']['bits_per_weight']:.3f}", f"{c['base3']['bits_per_weight']:.3f}", "")
    if st["residual"]["rank"]:
        table.add_row(f"of which residual r={st['residual']['rank']} (GB)", "", _gb(st["residual"]["bytes"]),
                      _gb(st["residual"]["bytes"]), "")
    if st["rotation"]["kind"] != "none":
        table.add_row("of which rotation signs (MB)", "", f"{st['rotation']['bytes'] / 1e6:.2f}",
                      f"{st['rotation']['bytes'] / 1e6:.2f}", "")
    profile = report["gpu_profile"]
    for r, mem in report["memory"]["per_resolution"].items():
        table.add_row(f"peak @{r} (GB, projected)", *(_gb(mem[m]["peak"]) for m in MODES), f"{mem['ratio']:.2f}x")
        if profile is not None:
            table.add_row(f"fits {profile['key']} @{r}", *("yes" if mem["fits"][profile["key"]][m] else "no" for m in MODES), "")
        proj = report["latency"]["projected"]
        if proj is not None:
            step = {m: v and v["step_ms"] for m, v in proj["per_resolution"][r].items()}
            table.add_row(f"step @{r} (ms, roofline {proj['gpu']})", *(_ms(step[m]) for m in MODES),
                          f"{_ratio(step['bf16'], step['w2a16'])} | {_ratio(step['bf16'], step['w2a8'])}")
        meas = report["latency"]["measured"]
        if meas is not None:
            rows = meas["per_resolution"][r]
            step = {m: rows[m]["step"]["median_ms"] for m in MODES}
            table.add_row(f"step @{r} (ms, measured median)", *(_ms(step[m]) for m in MODES),
                          f"{_ratio(step['bf16'], step['w2a16'])} | {_ratio(step['bf16'], step['w2a8'])}")
            table.add_row(f"peak @{r} (GB, measured)", *(_gb(rows[m]["step_peak_bytes"]) for m in MODES), "")
    return table
