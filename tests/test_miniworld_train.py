"""The training script: flow-matching batches (targets, the timestep shift), determinism and --init."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from bitflux_cli.miniworld import model as mini
from bitflux_cli.miniworld.train import _Batches


@pytest.fixture(scope="module")
def vae():
    return mini.build_components(seed=0, with_transformer=False)["vae"].eval()


@pytest.mark.parametrize("shift, share_above_095", [(1.0, 0.05), (3.0, 1 - 0.95 / 1.1)])
def test_time_shift_moves_timesteps_towards_noise(vae, shift, share_above_095):
    batches = _Batches(vae, np.random.default_rng(0), 8, "cpu", timesteps="uniform", time_shift=shift)
    t = torch.cat([batches(512)[1]["timestep"] for _ in range(8)])  # [4096]
    assert abs((t > 0.95).float().mean().item() - share_above_095) < 0.015
    assert 0 <= t.min() and t.max() <= 1


def test_target_is_noise_minus_clean_latent(vae):
    batches = _Batches(vae, np.random.default_rng(0), 8, "cpu", timesteps="uniform", time_shift=3.0)
    captions, inputs, target = batches(4)
    t = inputs["timestep"][:, None, None]  # [B, 1, 1]
    x0 = inputs["hidden_states"] - t * target  # x_t = (1 - t) x0 + t noise = x0 + t (noise - x0)
    lat = (batches.latents - batches.shift) * batches.scale  # [8, 16, 6, 6]
    packed = FluxPipeline._pack_latents(lat, 8, 16, 6, 6)  # [8, 9, 64]: FLUX's 2x2 patches
    assert len(captions) == 4 and all(any(torch.allclose(x, p, atol=1e-5) for p in packed) for x in x0)


def test_training_is_deterministic_and_continues_with_init(tmp_path):
    from safetensors.torch import load_file

    from bitflux_cli.miniworld.train import main

    tiny = ["--vae-steps", "2", "--steps", "3", "--guidance-steps", "2", "--batch", "4", "--pool", "8"]
    for name in ("a", "b"):
        main([*tiny, "--out", str(tmp_path / name)])
    main([*tiny, "--init", str(tmp_path / "a"), "--vae-steps", "0", "--out", str(tmp_path / "c")])
    for component in mini.COMPONENTS:
        a, b, c = (load_file(tmp_path / run / f"{component}.safetensors") for run in "abc")
        assert all(torch.equal(a[k], b[k]) for k in a), component
        changed = any(not torch.equal(a[k], c[k]) for k in a)
        assert changed == (component != "vae"), component  # --vae-steps 0 keeps the VAE
