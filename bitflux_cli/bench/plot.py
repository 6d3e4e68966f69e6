"""The bench figure: storage, peak memory and step latency, bf16 vs 1.58-bit, as one PNG."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..artifacts import atomic_file  # noqa: E402
from .accounting import GB  # noqa: E402
from .memory import MODES  # noqa: E402

COLORS = {"bf16": "#7f7f7f", "2bit": "#1f77b4", "base3": "#2ca02c", "w2a16": "#1f77b4", "w2a8": "#ff7f0e"}
NAMES = {"bf16": "bf16", "2bit": "1.58-bit 2bit", "base3": "1.58-bit base3", "w2a16": "1.58-bit W2A16",
         "w2a8": "1.58-bit W2A8"}


def _grouped(ax, groups: list[str], series: dict[str, list], fmt: str) -> None:
    """Bars of each series side by side within each group, values written on the bars."""
    width = 0.8 / len(series)
    for i, (key, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=NAMES[key], color=COLORS[key])
        ax.bar_label(bars, labels=["n/a" if v is None else fmt.format(v) for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.legend(fontsize=7)


def _figures(report: dict) -> tuple[dict, dict, str]:
    """Peak GB and step ms per mode and resolution: measured when there is a measurement."""
    measured = report["latency"].get("measured")
    if measured:
        rows = measured["per_resolution"]
        peak = {m: [rows[r][m]["step_peak_bytes"] / GB for r in rows] for m in MODES}
        step = {m: [rows[r][m]["step"]["median_ms"] for r in rows] for m in MODES}
        return peak, step, f"measured on {measured['device']}"
    rows = report["memory"]["per_resolution"]
    peak = {m: [rows[r][m]["peak"] / GB for r in rows] for m in MODES}
    projected = report["latency"].get("projected") or {"per_resolution": {r: dict.fromkeys(MODES) for r in rows}}
    step = {m: [(v[m] or {}).get("step_ms") for v in projected["per_resolution"].values()] for m in MODES}
    gpu = (report["gpu_profile"] or {}).get("name", "no GPU named")
    return peak, step, f"projected (roofline) for {gpu}"


def plot_report(report: dict, path: Path) -> Path:
    """Write the three-panel bar chart of ``report`` to ``path`` (PNG, atomically)."""
    storage = report["storage"]
    resolutions = [f"{r}px" for r in report["memory"]["per_resolution"]]
    peak, step, how = _figures(report)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    _grouped(axes[0], ["transformer"], {"bf16": [storage["bf16_bytes"] / GB],
                                        **{c: [v["bytes"] / GB] for c, v in storage["codecs"].items()}}, "{:.2f}")
    axes[0].set(title="storage (GB)", ylabel="GB")
    _grouped(axes[1], resolutions, peak, "{:.2f}")
    axes[1].set(title="peak memory, transformer (GB)", ylabel="GB")
    _grouped(axes[2], resolutions, step, "{:.0f}")
    axes[2].set(title="step latency (ms)", ylabel="ms")
    fig.suptitle(f"{report['model']}: {how}")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)
