"""Storage accounting of a 1.58-bit transformer, computed from shapes on the meta device.

Counts tensor data only, exactly as ``save_checkpoint`` lays it out: per in-scope linear the
codec's code bytes plus an fp32 scale per output row (plus, with a low-rank residual of rank r,
bf16 ``up`` [N, r] and ``down`` [r, K]: 2 r (N + K) bytes; with ``quantization.rotation``, the int8
signs [K]: K bytes), and every other parameter (biases of the quantized linears included) at 2 bytes
(bf16). The safetensors header (8-byte length, JSON of
names, shapes and offsets, and bitflux's metadata with a sha256 per tensor) is not counted: about
250-300 bytes per tensor, so about 0.5 MB for FLUX.1-dev's 1,654 tensors (0.015% of 3.1 GB).
"""

from torch import nn

from bitflux_kernels.layout import base3_bytes, packed_2bit_bytes

from ..ternary import parameter_counts, scoped_linears

BF16 = 2  # bytes per dense parameter, and per residual element
SIGN = 1  # bytes per rotation sign (int8)
GB = 1e9  # reports use decimal GB
SCALE = 4  # bytes per fp32 scale
CODEC_BYTES = {"2bit": packed_2bit_bytes, "base3": base3_bytes}


def storage(model: nn.Module, residual_rank: int = 0, rotated: bool = False) -> dict:
    """Bytes of ``model`` in bf16 and in each codec (with a residual of ``residual_rank`` and, when
    ``rotated``, the rotation's signs), with ratios, bits per ternary weight (codes, scales, residual and
    signs over the in-scope weights) and parameter counts.

    Returns ``{"bf16_bytes", "codecs": {codec: {"bytes", "codes_bytes", "scale_bytes", "residual_bytes",
    "rotation_bytes", "dense_bytes", "ratio", "bits_per_weight"}}, "residual": {"rank", "bytes",
    "bytes_per_rank"}, "rotation": {"kind", "bytes"}, "params": parameter_counts(model)}``.
    """
    params = parameter_counts(model)
    shapes = [tuple(m.weight.shape) for _, m in scoped_linears(model)]  # [(N, K)]
    bf16_bytes = params["total_params"] * BF16
    dense_bytes = (params["total_params"] - params["ternary_weight_params"]) * BF16
    scale_bytes = sum(n for n, _ in shapes) * SCALE
    per_rank = sum(n + k for n, k in shapes) * BF16  # up [N, 1] + down [1, K] per linear
    residual = {"rank": residual_rank, "bytes": residual_rank * per_rank, "bytes_per_rank": per_rank}
    rotation = {"kind": "hadamard" if rotated else "none", "bytes": rotated * sum(k for _, k in shapes) * SIGN}
    codecs = {}
    for codec, code_bytes in CODEC_BYTES.items():
        codes = sum(code_bytes(n, k) for n, k in shapes)
        ternary = codes + scale_bytes + residual["bytes"] + rotation["bytes"]
        codecs[codec] = {"bytes": ternary + dense_bytes, "codes_bytes": codes, "scale_bytes": scale_bytes,
                         "residual_bytes": residual["bytes"], "rotation_bytes": rotation["bytes"],
                         "dense_bytes": dense_bytes,
                         "ratio": bf16_bytes / (ternary + dense_bytes),
                         "bits_per_weight": 8 * ternary / params["ternary_weight_params"]}
    return {"bf16_bytes": bf16_bytes, "codecs": codecs, "residual": residual, "rotation": rotation, "params": params}
