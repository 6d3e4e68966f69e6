"""Train the miniature FLUX on the procedural world: ``make mini-model``.

Three phases, as FLUX.1-dev is made:

1. the VAE (reconstruction + a small KL), then the latent statistics (shift and scale, as FLUX's
   VAE config carries them);
2. flow matching: the transformer and both text encoders together, ``x_t = (1 - t) x0 + t noise``,
   the model predicts ``noise - x0``, ``t`` uniform and shifted towards noise as FLUX's is (where
   the layout is decided), a tenth of the captions empty;
3. guidance distillation: the transformer learns from its guidance input ``g`` the
   classifier-free-guided velocity of a frozen copy of itself, so that ``guidance_scale`` means
   what it means for FLUX.1-dev and one transformer call a step suffices.

Exponential moving averages of the weights are what is saved. ``--init`` continues from an earlier
run's weights (its ``train.json`` is kept in the new one). Deterministic for a seed on a given
machine; runs on CPU (two cores: see the Makefile's ``mini-model`` for the time) or CUDA.
"""

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from safetensors.torch import save_model

from ..artifacts import atomic_dir
from ..console import info
from . import model as mini
from .world import sample_training_batch

TRAINED = ("transformer", "text_encoder", "text_encoder_2")  # trained together after the VAE (flow phase)


def _images(batch: np.ndarray, device) -> torch.Tensor:  # [B, H, W, 3] uint8 -> [B, 3, H, W] in [-1, 1]
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def _warmup_cosine(opt, steps: int, warmup: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train_vae(vae, rng, steps: int, batch: int, device, lr=1e-3, kl=1e-6) -> list[float]:
    """Reconstruction (MSE) + ``kl`` x KL on rendered scenes; returns the loss every 100 steps."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = _warmup_cosine(opt, steps, warmup=max(1, steps // 20))
    log = []
    vae.train()
    for step in range(steps):
        _, imgs = sample_training_batch(rng, batch)
        x = _images(imgs, device)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        loss = F.mse_loss(recon, x) + kl * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log.append(round(loss.item(), 5))
            info(f"vae step {step}/{steps} loss {loss.item():.5f}")
    return log


@torch.no_grad()
def latent_statistics(vae, rng, device, n=1024) -> tuple[float, float]:
    """(shift, scale) so that ``(latent - shift) * scale`` has zero mean and unit variance."""
    lat = torch.cat([vae.encode(_images(sample_training_batch(rng, 128)[1], device)).latent_dist.mean
                     for _ in range(n // 128)])
    return lat.mean().item(), 1.0 / lat.std().item()


def _encode_text(tok, clip, t5, captions, device):
    ids = tok(captions, padding="max_length", max_length=mini.MAX_SEQUENCE_LENGTH, truncation=True,
              return_tensors="pt").input_ids.to(device)  # [B, L]
    return clip(ids, output_hidden_states=False).pooler_output, t5(ids, output_hidden_states=False)[0]


@torch.no_grad()
def latent_pool(vae, rng, n: int, device) -> tuple[list[str], torch.Tensor]:
    """``n`` fresh training scenes encoded once: (captions, latent means [n, 16, h, w] on CPU)."""
    captions, latents = [], []
    for _ in range(-(-n // 256)):
        caps, imgs = sample_training_batch(rng, 256)
        captions += caps
        latents.append(vae.encode(_images(imgs, device)).latent_dist.mean.cpu())
    return captions[:n], torch.cat(latents)[:n]


class _Batches:
    """Noisy training batches from a pool of encoded scenes: the flow-matching inputs FLUX trains on."""

    def __init__(self, vae, rng, pool_size: int, device, timesteps: str, time_shift: float):
        self.captions, self.latents = latent_pool(vae, rng, pool_size, device)  # [n, 16, h, w]
        self.shift, self.scale, self.device = vae.config.shift_factor, vae.config.scaling_factor, device
        self.timesteps, self.time_shift = timesteps, time_shift
        self.gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))

    def __call__(self, batch: int) -> tuple[list[str], dict, torch.Tensor]:
        """(captions, transformer inputs without text, flow target ``noise - x0`` [B, L, 64])."""
        idx = torch.randint(len(self.latents), (batch,), generator=self.gen)
        lat = (self.latents[idx].to(self.device) - self.shift) * self.scale  # [B, 16, h, w]
        b, c, h, w = lat.shape
        x0 = FluxPipeline._pack_latents(lat, b, c, h, w)  # [B, h/2 * w/2, 64]
        noise = torch.randn(x0.shape, generator=self.gen).to(self.device)
        # logit-normal (FLUX's, mid noise) or uniform (7x more of t > 0.9, where the layout is decided)
        z = torch.randn(b, generator=self.gen) if self.timesteps == "logit-normal" else torch.rand(b, generator=self.gen)
        t = torch.sigmoid(z) if self.timesteps == "logit-normal" else z
        t = (self.time_shift * t / (1 + (self.time_shift - 1) * t)).to(self.device)  # SD3/FLUX's shift towards noise
        inputs = {"hidden_states": (1 - t[:, None, None]) * x0 + t[:, None, None] * noise, "timestep": t,
                  "img_ids": FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, lat.dtype)}
        return [self.captions[i] for i in idx.tolist()], inputs, noise - x0

    def uniform(self, batch: int, lo: float, hi: float) -> torch.Tensor:
        """[B] values drawn uniformly in [lo, hi) (guidance scales)."""
        return (lo + (hi - lo) * torch.rand(batch, generator=self.gen)).to(self.device)


def _velocity(tr, inputs: dict, text: tuple[torch.Tensor, torch.Tensor], guidance: torch.Tensor) -> torch.Tensor:
    pooled, seq = text  # [B, 64], [B, T, 64]
    return tr(**inputs, guidance=guidance, pooled_projections=pooled, encoder_hidden_states=seq,
              txt_ids=torch.zeros(seq.shape[1], 3, device=seq.device), return_dict=False)[0]


def _fit(modules: dict, loss_fn, steps: int, lr: float, name: str, ema_decay=0.999, snapshot=None) -> tuple[dict, list]:
    """AdamW with warm-up and cosine decay on ``modules``; returns their EMA copies and the loss log.

    ``snapshot(step, ema)``, when given, is called after every step with the EMA modules.
    """
    ema = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in modules.items()}
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, steps, warmup=max(1, steps // 30))
    log = []
    for m in modules.values():
        m.train().requires_grad_(True)
    for step in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for k, m in modules.items():
                for pe, pm in zip(ema[k].parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log.append(round(loss.item(), 5))
            info(f"{name} step {step}/{steps} loss {loss.item():.4f}")
        if snapshot is not None:
            snapshot(step + 1, ema)
    return ema, log


def train_flow(parts, batches: _Batches, steps: int, batch: int, lr=5e-4, caption_dropout=0.1,
               snapshot=None) -> tuple[dict, list]:
    """Flow matching (``x_t = (1 - t) x0 + t noise``, target ``noise - x0``) with the text encoders
    trained jointly; a ``caption_dropout`` share of captions is empty, which the guidance phase needs."""
    tr, clip, t5 = (parts[k] for k in TRAINED)
    tok = mini.tokenizer()

    def loss_fn():
        captions, inputs, target = batches(batch)
        keep = batches.uniform(batch, 0, 1) >= caption_dropout
        captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        guidance = batches.uniform(batch, 1, 5)  # the guidance phase gives it meaning
        return F.mse_loss(_velocity(tr, inputs, _encode_text(tok, clip, t5, captions, batches.device), guidance), target)

    return _fit(dict(zip(TRAINED, (tr, clip, t5))), loss_fn, steps, lr, "flow", snapshot=snapshot)


def train_guidance(parts, batches: _Batches, steps: int, batch: int, lr=2e-4, scales=(1.0, 6.0),
                   snapshot=None) -> tuple[dict, list]:
    """Guidance distillation, as FLUX.1-dev is made: the transformer learns, from its guidance input g,
    the classifier-free-guided velocity ``v_u + g (v_c - v_u)`` of a frozen copy of itself (``v_u``:
    the empty caption), so that one call a step draws what classifier-free guidance would."""
    tr, clip, t5 = (parts[k] for k in TRAINED)
    teacher = copy.deepcopy(tr).eval().requires_grad_(False)
    clip.eval().requires_grad_(False)
    t5.eval().requires_grad_(False)
    tok = mini.tokenizer()

    def loss_fn():
        captions, inputs, _ = batches(batch)
        g = batches.uniform(batch, *scales)  # [B]
        with torch.no_grad():
            text = _encode_text(tok, clip, t5, captions, batches.device)
            empty = _encode_text(tok, clip, t5, [""] * batch, batches.device)
            both = {k: torch.cat([v, v]) if k != "img_ids" else v for k, v in inputs.items()}
            v_c, v_u = _velocity(teacher, both, tuple(torch.cat(p) for p in zip(text, empty)), torch.cat([g, g])).chunk(2)
            target = v_u + g[:, None, None] * (v_c - v_u)
        return F.mse_loss(_velocity(tr, inputs, text, g), target)

    return _fit({"transformer": tr}, loss_fn, steps, lr, "guidance", snapshot=snapshot)


def save(out: Path, parts: dict, report: dict) -> None:
    """Write ``<out>/<component>.safetensors`` (the VAE's latent statistics in its metadata) and ``train.json``."""
    with atomic_dir(out) as tmp:
        for name, module in parts.items():
            meta = {k: str(module.config[k]) for k in mini.LATENT_STATS} if name == "vae" else None
            save_model(copy.deepcopy(module).float().cpu(), str(tmp / f"{name}.safetensors"), metadata=meta)  # T5 ties weights
        (tmp / "train.json").write_text(json.dumps(report, indent=1))


def main(argv=None) -> None:
    """Train all components and write ``<out>/<component>.safetensors`` plus ``train.json``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "assets" / "mini")
    ap.add_argument("--init", type=Path, help="start from the weights of an earlier run (a directory like --out)")
    ap.add_argument("--vae-steps", type=int, default=1000, help="0 with --init keeps its VAE and latent statistics")
    ap.add_argument("--steps", type=int, default=20000, help="flow-matching steps")
    ap.add_argument("--timesteps", choices=["logit-normal", "uniform"], default="uniform", help="t distribution of both phases")
    ap.add_argument("--time-shift", type=float, default=3.0,
                    help="t -> s t / (1 + (s - 1) t) (SD3, FLUX): 3 gives t > 0.95 2.7x as often, where the layout is decided")
    ap.add_argument("--caption-dropout", type=float, default=0.1, help="share of empty captions in flow matching")
    ap.add_argument("--guidance-steps", type=int, default=2000, help="guidance-distillation steps after flow matching")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--pool", type=int, default=50_000, help="training scenes encoded once for the transformer")
    ap.add_argument("--snapshot-every", type=int, default=0, help="also write the EMA weights to --out every N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    if args.init is not None:
        pipe = mini.build_pipeline(args.init)
        parts = {k: getattr(pipe, k).train() for k in mini.COMPONENTS}
    else:
        parts = mini.build_components(seed=args.seed)
    parts = {k: m.to(device) for k, m in parts.items()}
    start = time.time()
    report = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.init is not None:  # provenance: what the starting weights came from
        report["init"] = json.loads((args.init / "train.json").read_text())
    if args.init is None or args.vae_steps > 0:
        report["vae_loss"] = train_vae(parts["vae"], rng, args.vae_steps, 32, device)
        shift, scale = latent_statistics(parts["vae"].eval(), rng, device)
        parts["vae"].register_to_config(shift_factor=shift, scaling_factor=scale)
    report |= {"latent_shift": parts["vae"].config.shift_factor, "latent_scale": parts["vae"].config.scaling_factor}
    info(f"latent shift {report['latent_shift']:.4f} scale {report['latent_scale']:.4f}")

    def snapshot(phase: str, total: int):
        def write(step: int, ema: dict) -> None:
            if args.snapshot_every and step % args.snapshot_every == 0 and step < total:
                save(args.out, parts | ema, report | {"phase": phase, "step": step, "seconds": round(time.time() - start, 1)})
                info(f"snapshot of {phase} step {step} written to {args.out}")
        return write

    batches = _Batches(parts["vae"].eval(), rng, args.pool, device, args.timesteps, args.time_shift)
    ema, report["flow_loss"] = train_flow(parts, batches, args.steps, args.batch, caption_dropout=args.caption_dropout,
                                          snapshot=snapshot("flow", args.steps))
    parts |= ema
    ema, report["guidance_loss"] = train_guidance(parts, batches, args.guidance_steps, args.batch,
                                                  snapshot=snapshot("guidance", args.guidance_steps))
    parts |= ema
    report |= {"phase": "done", "seconds": round(time.time() - start, 1)}
    save(args.out, parts, report)
    info(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
