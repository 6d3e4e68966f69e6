"""A full-width FLUX stand-in: FLUX.1-dev's layout with random bf16 weights and fewer blocks.

``write_standin(out, double, single)`` writes a diffusers directory shaped like the hub's
black-forest-labs/FLUX.1-dev: ``model_index.json``, the transformer at FLUX.1-dev's width (3072, 24
heads of 128, joint attention 4096, pooled 768) as sharded safetensors with an index, small CLIP and
T5 encoders with FLUX.1-dev's output widths, a 16-channel VAE, the flow-matching scheduler with
FLUX.1-dev's settings, and CLIP/T5 tokenizers built offline (characters as tokens). It is what the
real-size paths are tested on, since the 24 GB download is not possible here; the weights are
random, so its images mean nothing, but every shape the transformer sees is FLUX.1-dev's.

    python -m bitflux_cli.models.standin OUT --double 1 --single 2
"""

import argparse
import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from ..miniworld.model import VAE
from .source import KNOWN_ARCHITECTURES, build_meta_transformer

CHARS = string.ascii_lowercase + string.digits + ",.'-"
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)
TRANSFORMER_SHARD_BYTES = 1 << 30


def _random(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # norm gains are 1 (as trained models' are, roughly); biases small
        return torch.ones(shape) if "norm" in name else 0.02 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * shape[-1] ** -0.5


def _transformer(out: Path, config: dict, seed: int) -> None:
    meta = build_meta_transformer(config)
    meta.save_config(out)
    gen = torch.Generator().manual_seed(seed)
    shards, shard, size, total = [], {}, 0, 0  # shards: the names in each; one shard in memory at a time
    items = list(meta.state_dict().items())
    for i, (name, t) in enumerate(items):
        shard[name] = _random(name, tuple(t.shape), gen).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size >= TRANSFORMER_SHARD_BYTES or i == len(items) - 1:
            shards.append(list(shard))
            save_file(shard, str(out / f"part-{len(shards)}.tmp"))
            total, shard, size = total + size, {}, 0
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        (out / f"part-{i}.tmp").rename(out / file)
        weight_map |= dict.fromkeys(names, file)
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _tokenizers(out: Path) -> None:
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab |= {c: len(vocab), f"{c}</w>": len(vocab) + 1}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    clip = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), pad_token="<|endoftext|>", model_max_length=77)
    clip.save_pretrained(out / "tokenizer")
    (out / "vocab.json").unlink()
    (out / "merges.txt").unlink()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{c}", -1.0) for c in CHARS] + [(c, -2.0) for c in CHARS]
    uni = Tokenizer(models.Unigram(pieces, unk_id=2))
    uni.normalizer = normalizers.Lowercase()
    uni.pre_tokenizer = pre_tokenizers.Metaspace()
    uni.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=uni, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                         model_max_length=512)
    t5.save_pretrained(out / "tokenizer_2")


def write_standin(out: Path, double: int = 1, single: int = 2, seed: int = 0) -> Path:
    """Write a FLUX.1-dev-layout diffusers directory with ``double`` + ``single`` blocks at ``out``."""
    out = Path(out)
    config = dict(KNOWN_ARCHITECTURES["black-forest-labs/FLUX.1-dev"], num_layers=double, num_single_layers=single)
    for sub in ("transformer", "text_encoder", "text_encoder_2", "vae", "scheduler"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _transformer(out / "transformer", config, seed)
    _tokenizers(out)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vocab = 2 * len(CHARS) + 4
        CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab, hidden_size=config["pooled_projection_dim"], intermediate_size=256, num_hidden_layers=1,
            num_attention_heads=12, max_position_embeddings=77, projection_dim=config["pooled_projection_dim"],
            pad_token_id=1, bos_token_id=0, eos_token_id=1)).to(torch.bfloat16).save_pretrained(out / "text_encoder")
        T5EncoderModel(T5Config(
            vocab_size=vocab, d_model=config["joint_attention_dim"], d_kv=64, d_ff=256, num_layers=1, num_heads=2,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).to(torch.bfloat16).save_pretrained(out / "text_encoder_2")
        vae = AutoencoderKL(**(VAE | {"sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159}))
        vae.to(torch.bfloat16).save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.32.0",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"], "transformer": ["diffusers", "FluxTransformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a full-width FLUX.1-dev-layout stand-in with random bf16 weights.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks (FLUX.1-dev: 19)")
    parser.add_argument("--single", type=int, default=2, help="single-stream blocks (FLUX.1-dev: 38)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_standin(args.out, args.double, args.single, args.seed))


if __name__ == "__main__":
    main()
