"""How far the 1.58-bit transformer is from full precision: block, velocity and image errors."""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from rich.table import Table

from .artifacts import atomic_file
from .config import Config
from .console import info
from .models import resolve_device
from .streaming import advance, blocks, head, prelude_state
from .teacher import Embeds, psnr, record_transformer_calls, run_pipeline
from .tensorfile import CHECKSUMS, TensorFile

# Fixed prompts of the report, varied on purpose; held out from calibration sets.
REPORT_PROMPTS = [
    "a red circle above a blue square",
    "a green triangle left of a yellow circle",
    "three blue squares",
    "a photo of a cat sitting on a windowsill at sunset",
    "a yellow square and a red triangle",
    "an astronaut riding a horse on the moon, oil painting",
    "two green circles",
    "a bowl of ramen with chopsticks, studio lighting",
]


IMAGE, TEXT = slice(-1, None), slice(0, 1)  # a block's (text, image) outputs: the image or the text stream


def _block_outputs(transformer, calls, streams: slice = slice(None)):
    """{block: [flattened output per call]} and the velocities of a materialised transformer."""
    outs, handles = {}, []
    for name, block in blocks(transformer):
        def hook(_m, _a, out, name=name):
            out = out if isinstance(out, tuple) else (out,)
            out = out[streams]
            outs.setdefault(name, []).append(torch.cat([o.float().flatten() for o in out]))
        handles.append(block.register_forward_hook(hook))
    velocities = []
    try:
        with torch.no_grad():
            for kw in calls:
                velocities.append(transformer(**kw)[0].float())
    finally:
        for h in handles:
            h.remove()
    return outs, velocities


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


class FidelityProbe:
    """How far the 1.58-bit transformer is from FP, measured while quantize walks the blocks.

    At the start the FP pipeline (its transformer streamed) draws the report prompts, which gives
    the FP images and a few of its transformer calls. Two chains of those calls' activations then
    walk the blocks on the host: the FP chain through each FP block, the quantized chain through its
    ternary version; per block, the relative error of the quantized chain's output (text and image
    streams of each call) against the FP chain's; at the end the velocity error. The images of the
    quantized transformer are drawn last. Memory does not depend on the model's depth.
    """

    def __init__(self, cfg: Config, pipe, embeds: Embeds):
        self.cfg, self.device = cfg, resolve_device(cfg.model)
        self.calls, self.fp_images = record_transformer_calls(pipe, embeds, cfg.generate, seed=10_000, keep=4)
        skeleton = pipe.transformer
        self.batch = self.calls[0]["hidden_states"].shape[0]  # rows of one call (the prompts)
        state = prelude_state(skeleton, ({k: v.to(self.device) if torch.is_tensor(v) else v for k, v in kw.items()}
                                         for kw in self.calls))
        self.fp, self.q, self.errors = state, dict(state), {}  # they share tensors: advance them out of place

    def _per_call(self, a: dict, b: dict) -> list[float]:
        out = []
        for i in range(0, a["hidden_states"].shape[0], self.batch):
            rows = slice(i, i + self.batch)
            qa = torch.cat([a["encoder_hidden_states"][rows].flatten(), a["hidden_states"][rows].flatten()])
            fb = torch.cat([b["encoder_hidden_states"][rows].flatten(), b["hidden_states"][rows].flatten()])
            out.append(_rel(qa, fb))
        return out

    def fp_step(self, name: str, fp_block: torch.nn.Module) -> None:
        """Push the FP chain through the FP block ``name``."""
        self.fp = advance(fp_block, self.fp, self.batch, self.device)

    def q_step(self, name: str, q_block: torch.nn.Module) -> None:
        """Push the quantized chain through the ternary block ``name``; record its error against the FP chain."""
        self.q = advance(q_block, self.q, self.batch, self.device)
        self.errors[name] = float(np.mean(self._per_call(self.q, self.fp)))

    def report(self, skeleton, pipe, quantized: torch.nn.Module, embeds: Embeds) -> dict:
        """The report: per-block errors, velocity error, and image PSNR of ``quantized`` (drawn in ``pipe``)."""
        velocity = []
        for i in range(0, self.fp["hidden_states"].shape[0], self.batch):
            rows = slice(i, i + self.batch)
            temb = self.fp["temb"][rows].to(self.device)
            v_fp = head(skeleton, self.fp["hidden_states"][rows].to(self.device), temb)
            v_q = head(skeleton, self.q["hidden_states"][rows].to(self.device), temb)
            velocity.append(_rel(v_q, v_fp))
        pipe.transformer = quantized
        q_images = run_pipeline(pipe, embeds, self.cfg.generate, seed=10_000)
        psnrs = [psnr(a, b) for a, b in zip(q_images, self.fp_images)]
        return {"prompts": len(embeds), "velocity_rel_error": float(np.mean(velocity)), "block_rel_error": self.errors,
                "image_psnr_db": float(np.mean(psnrs)), "image_psnr_db_per_prompt": psnrs}


def fidelity_table(report: dict) -> Table:
    """The fidelity report as a table: one row per block, then the velocity error and image PSNR."""
    table = Table(title=f"1.58-bit vs full precision on {report['prompts']} held-out prompts")
    table.add_column("block")
    table.add_column("relative error", justify="right")
    for name, err in report["block_rel_error"].items():
        table.add_row(name, f"{err:.4f}")
    table.add_row("[bold]velocity[/bold]", f"[bold]{report['velocity_rel_error']:.4f}[/bold]", end_section=True)
    table.add_row("[bold]image PSNR[/bold]", f"[bold]{report['image_psnr_db']:.2f} dB[/bold]")
    return table


def _tensors_key(checkpoint: Path) -> str:
    """sha256 of the checkpoint's per-tensor checksums: which tensors a report is about."""
    return hashlib.sha256(TensorFile(checkpoint).metadata.get(CHECKSUMS, "").encode()).hexdigest()


def report_path(checkpoint: Path, key: str | None = None) -> Path:
    """``fidelity-<key>.json`` beside ``checkpoint``: named by the tensors it measured, so a report
    written before its checkpoint is renamed into place never stands for the previous checkpoint."""
    return Path(checkpoint).with_name(f"fidelity-{(key or _tensors_key(checkpoint))[:16]}.json")


def record_report(measured: Path, report: dict, checkpoint: Path) -> Path:
    """Write ``report``, measured on the file ``measured``, beside ``checkpoint`` (where ``measured``
    is about to be renamed), atomically, for ``pack`` to record; returns the report's path."""
    key = _tensors_key(measured)
    path = report_path(checkpoint, key)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"checkpoint_tensors_sha256": key, "report": report}, sort_keys=True) + "\n")
    return path


def forget_other_reports(keep: Path) -> None:
    """Remove the reports beside ``keep`` but it (they measured earlier checkpoints)."""
    for other in keep.parent.glob("fidelity-*.json"):
        if other != keep:
            other.unlink(missing_ok=True)


def recorded_report(checkpoint: Path) -> dict | None:
    """The report recorded for ``checkpoint``'s tensors, or None (none, damaged, or about other tensors)."""
    path = report_path(checkpoint)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("report"), dict) or \
            data.get("checkpoint_tensors_sha256") != _tensors_key(checkpoint):
        info(f"{path} is damaged or measured other tensors: the fidelity report is not recorded")
        return None
    return data["report"]
