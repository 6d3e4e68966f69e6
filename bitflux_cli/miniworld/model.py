"""The miniature FLUX: the exact FLUX.1 architecture at a size that trains on two CPU cores.

A real ``FluxPipeline``: ``FluxTransformer2DModel`` (double and single blocks, guidance
embedding), CLIP and T5 text encoders behind a WordPiece tokenizer built in code, a 16-channel
``AutoencoderKL`` and the flow-matching Euler scheduler. Weights come from a directory of
safetensors files (one per component) when one is given or bundled, else from a seeded random
initialisation, so the model is the same on every machine.
"""

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_model
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from .world import IMAGE_SIZE

MAX_SEQUENCE_LENGTH = 12  # T5 tokens (captions are at most 9 with </s>); CLIP uses the same length

SPECIAL = ["<pad>", "</s>", "<unk>"]
PLURAL = "##s"  # a plural is its singular's token and this suffix piece, as subword tokenizers split words
WORDS = """a an the one two three four five six of and with photo picture image
red green blue yellow orange purple white black pink cyan gray brown
circle square triangle star
small big large tiny
above below left right top bottom next to on under beside
""".split() + [PLURAL]

TRANSFORMER = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=4,
    attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
    pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=[8, 12, 12],
)
# Narrow and without mid-block attention: flat shapes need little, and it trains 3x faster on CPU.
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, layers_per_block=1, norm_num_groups=8,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 32, 32, 32], sample_size=IMAGE_SIZE, mid_block_add_attention=False,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.0, shift_factor=0.0,
)
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
LATENT_STATS = ("shift_factor", "scaling_factor")  # VAE config values, kept in vae.safetensors' metadata


def tokenizer() -> PreTrainedTokenizerFast:
    """WordPiece tokenizer over the world's vocabulary, lower-cased, unknown words to <unk>.

    ``three triangles`` is ``three triangle ##s </s>``: with whole-word plurals, a held-out count
    (``two triangles``) was a pair of tokens never seen together, and the mini model drew one triangle.
    """
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # CLIP pools the hidden state at </s>: without it the pooled vector would see only word one
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=MAX_SEQUENCE_LENGTH)


def _text_encoders() -> tuple[CLIPTextModel, T5EncoderModel]:
    n = len(SPECIAL) + len(WORDS)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=n, hidden_size=TRANSFORMER["pooled_projection_dim"], intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_SEQUENCE_LENGTH,
        projection_dim=TRANSFORMER["pooled_projection_dim"], pad_token_id=0, bos_token_id=1, eos_token_id=1))
    t5 = T5EncoderModel(T5Config(
        vocab_size=n, d_model=TRANSFORMER["joint_attention_dim"], d_kv=16, d_ff=128, num_layers=2,
        num_heads=4, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    return clip, t5


def build_components(seed: int = 0, with_transformer: bool = True) -> dict[str, torch.nn.Module]:
    """The trainable components, randomly initialised from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip, t5 = _text_encoders()
        parts = {"vae": AutoencoderKL(**VAE), "text_encoder": clip, "text_encoder_2": t5}
        if with_transformer:
            parts["transformer"] = FluxTransformer2DModel(**TRANSFORMER)
        return parts


def build_pipeline(weights: Path | None = None, dtype: torch.dtype = torch.float32,
                   transformer: torch.nn.Module | None = None) -> FluxPipeline:
    """The mini ``FluxPipeline``; ``weights`` is a directory of ``<component>.safetensors``.

    ``transformer`` replaces the transformer (e.g. a quantized one) without building the FP one.
    """
    parts = build_components(with_transformer=transformer is None)
    for name, module in parts.items():
        if weights is not None:
            path = str(Path(weights) / f"{name}.safetensors")
            load_model(module, path)
            if name == "vae":
                with safe_open(path, framework="pt") as f:
                    meta = f.metadata() or {}
                module.register_to_config(**{k: float(meta[k]) for k in LATENT_STATS if k in meta})
        module.to(dtype).eval()  # built from configs, not from_pretrained: T5 dropout would be on
    if transformer is not None:
        parts["transformer"] = transformer  # kept as given: its scales stay fp32
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tokenizer(),
                        tokenizer_2=tokenizer(), **parts)


def transformer_config() -> dict:
    """Constructor arguments of the mini transformer (for building it on the meta device)."""
    return dict(TRANSFORMER)
