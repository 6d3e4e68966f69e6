"""The embedded mini model with a rotation of each attention head folded into its weights, exactly: a copy
that computes the same function (to float rounding) whose ternary codes quantize other weights.

Attention is linear in the values, head by head, so an orthogonal R_h [d, d] per head (a randomized
Hadamard transform: random signs, then Sylvester's matrix, / sqrt(d)) can turn every head's values
(``to_v``, ``add_v_proj`` rows and biases: ``R_h W_v``) and be turned back in the layers that read the
attention output (``to_out.0``, ``to_add_out``, the attention part of a single block's ``proj_out``
columns: ``W_out R_h^T``). The double blocks' image and text values share R_h, since their tokens meet in
one attention. Unlike ``quantization.rotation`` nothing runs at inference: the file format, the kernels
and the exports are unchanged. The other linears read the residual stream through the adaptive norm's
per-sample, per-channel scale, or a GELU, which no fixed rotation can pass, so only these five
rotate: a test of whether part of the rotation's gain comes without its online Hadamard.

    python benchmarks/fold_head_rotation.py OUT_DIR [--seed S]

OUT_DIR gets the bundled weights (the text encoders, the VAE, train.json copied) with the transformer
folded; ``--set model.path=OUT_DIR`` runs bitflux on it. It checks the folded transformer's output
against the bundled one's before writing.
"""

import argparse
import shutil
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from bitflux_cli.config import ModelConfig
from bitflux_cli.miniworld.model import transformer_config
from bitflux_cli.models.source import embedded_weights
from bitflux_kernels.hadamard import sylvester


def _head_rotation(d: int, gen: torch.Generator) -> torch.Tensor:  # [d, d] float64, orthogonal
    return sylvester(d) * (torch.randint(2, (d,), generator=gen) * 2 - 1)


def fold(sd: dict, head_dim: int, seed: int) -> dict:
    """``sd`` (a FLUX transformer state dict) with a random rotation per head folded into values and outputs."""
    sd, gen = dict(sd), torch.Generator().manual_seed(seed)

    def turn(values: list[str], outputs: list[str]) -> None:
        inner = sd[f"{values[0]}.weight"].shape[0]
        r = torch.block_diag(*[_head_rotation(head_dim, gen) for _ in range(inner // head_dim)])  # [inner, inner]
        for name in (f"{v}.{p}" for v in values for p in ("weight", "bias")):
            sd[name] = (r @ sd[name].double()).to(sd[name].dtype)  # rows: [inner, K], bias [inner]
        for o in outputs:
            w = sd[f"{o}.weight"].double()  # [N, inner (+ the single block's MLP width)]
            w[:, :inner] = w[:, :inner] @ r.T
            sd[f"{o}.weight"] = w.to(sd[f"{o}.weight"].dtype)

    doubles = sorted({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")}, key=int)
    singles = sorted({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")}, key=int)
    for i in doubles:
        a = f"transformer_blocks.{i}.attn"
        turn([f"{a}.to_v", f"{a}.add_v_proj"], [f"{a}.to_out.0", f"{a}.to_add_out"])
    for i in singles:
        turn([f"single_transformer_blocks.{i}.attn.to_v"], [f"single_transformer_blocks.{i}.proj_out"])
    return sd


@torch.no_grad()
def transformer_output(sd: dict) -> torch.Tensor:
    """The mini transformer with weights ``sd`` on two seeded random calls (a 3x3 image grid, 12 text tokens)."""
    model = FluxTransformer2DModel(**transformer_config())
    model.load_state_dict(sd)
    gen = torch.Generator().manual_seed(0)
    c = model.config
    ids = torch.stack([torch.zeros(9), torch.arange(9) // 3, torch.arange(9) % 3], 1)  # a 3x3 token grid
    return model(hidden_states=torch.randn(2, 9, c.in_channels, generator=gen),
                 encoder_hidden_states=torch.randn(2, 12, c.joint_attention_dim, generator=gen),
                 pooled_projections=torch.randn(2, c.pooled_projection_dim, generator=gen),
                 timestep=torch.tensor([0.3, 0.8]), guidance=torch.tensor([3.5, 3.5]),
                 img_ids=ids, txt_ids=torch.zeros(12, 3), return_dict=False)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bundled = embedded_weights(ModelConfig())
    sd = load_file(bundled / "transformer.safetensors")
    folded = fold(sd, transformer_config()["attention_head_dim"], args.seed)
    before, after = transformer_output(sd), transformer_output(folded)
    err = ((after - before).norm() / before.norm()).item()
    assert err < 1e-5, f"the folded transformer's output differs by {err:.2e} (relative)"
    args.out.mkdir(parents=True, exist_ok=True)
    for f in bundled.iterdir():
        if f.name != "transformer.safetensors" and f.is_file():
            shutil.copy(f, args.out / f.name)
    save_file(folded, args.out / "transformer.safetensors")
    print(f"{args.out}: values and attention outputs turned by a Hadamard rotation per head; output relative difference {err:.1e}")


if __name__ == "__main__":
    main()
