"""Train the miniature FLUX on the procedural world: ``make mini-model``.

VAE first (reconstruction + a small KL), then the latent statistics (shift and scale, as FLUX's
VAE config carries them), then the transformer and both text encoders together with the
flow-matching objective FLUX is trained with: ``x_t = (1 - t) x0 + t noise``, the model predicts
``noise - x0``, ``t`` logit-normal. An exponential moving average of the weights is what is saved.
Deterministic for a seed on a given machine; runs on CPU (about an hour on two cores) or CUDA.
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

TRAINED = ("transformer", "text_encoder", "text_encoder_2")  # trained together after the VAE


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


def train_transformer(parts, rng, steps: int, batch: int, device, pool_size: int, lr=5e-4,
                      ema_decay=0.999, snapshot=None) -> tuple[dict, list[float]]:
    """Flow matching on VAE latents with the text encoders trained jointly; returns EMA weights.

    ``snapshot(step, ema)``, when given, is called every so often (see ``main``) with the EMA weights.
    """
    vae, tr, clip, t5 = parts["vae"].eval(), parts["transformer"], parts["text_encoder"], parts["text_encoder_2"]
    trainable = [tr, clip, t5]  # in the order of TRAINED
    params = [p for m in trainable for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, steps, warmup=max(1, steps // 30))
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in trainable]
    tok = mini.tokenizer()
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    gen = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**31)))
    log = []
    for m in trainable:
        m.train()
    pool_captions, pool = latent_pool(vae, rng, pool_size, device)
    for step in range(steps):
        idx = torch.randint(len(pool), (batch,), generator=gen)
        captions = [pool_captions[i] for i in idx.tolist()]
        lat = (pool[idx].to(device) - shift) * scale  # [B, 16, h, w]
        b, c, h, w = lat.shape
        x0 = FluxPipeline._pack_latents(lat, b, c, h, w)  # [B, h/2 * w/2, 64]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, device, lat.dtype)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = torch.sigmoid(torch.randn(b, generator=gen)).to(device)  # logit-normal timesteps
        xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        guidance = (1 + 4 * torch.rand(b, generator=gen)).to(device)  # any guidance in [1, 5] is in-distribution
        pooled, seq = _encode_text(tok, clip, t5, captions, device)
        v = tr(hidden_states=xt, timestep=t, guidance=guidance, pooled_projections=pooled,
               encoder_hidden_states=seq, txt_ids=torch.zeros(seq.shape[1], 3, device=device),
               img_ids=img_ids, return_dict=False)[0]
        loss = F.mse_loss(v, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, m in zip(ema, trainable):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        if step % 100 == 0 or step == steps - 1:
            log.append(round(loss.item(), 5))
            info(f"transformer step {step}/{steps} loss {loss.item():.4f}")
        if snapshot is not None:
            snapshot(step + 1, dict(zip(TRAINED, ema)))
    return dict(zip(TRAINED, ema)), log


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
    ap.add_argument("--vae-steps", type=int, default=1500, help="0 with --init keeps its VAE and latent statistics")
    ap.add_argument("--steps", type=int, default=9000)
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
    if args.init is None or args.vae_steps > 0:
        report["vae_loss"] = train_vae(parts["vae"], rng, args.vae_steps, 32, device)
        shift, scale = latent_statistics(parts["vae"].eval(), rng, device)
        parts["vae"].register_to_config(shift_factor=shift, scaling_factor=scale)
    report |= {"latent_shift": parts["vae"].config.shift_factor, "latent_scale": parts["vae"].config.scaling_factor}
    info(f"latent shift {report['latent_shift']:.4f} scale {report['latent_scale']:.4f}")

    def snapshot(step: int, ema: dict) -> None:
        if args.snapshot_every and step % args.snapshot_every == 0 and step < args.steps:
            save(args.out, parts | ema, report | {"step": step, "seconds": round(time.time() - start, 1)})
            info(f"snapshot of step {step} written to {args.out}")

    ema, report["transformer_loss"] = train_transformer(parts, rng, args.steps, args.batch, device, args.pool,
                                                        snapshot=snapshot)
    report |= {"step": args.steps, "seconds": round(time.time() - start, 1)}
    save(args.out, parts | ema, report)
    info(f"wrote {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
