"""GGUF export: the ternary linears as ggml TQ2_0, TQ1_0 or Q2_K, in the BFL naming stable-diffusion.cpp
and ComfyUI-GGUF read for FLUX (``general.architecture = "flux"``).

The ggml types cut a row into blocks of 256 weights along K, each with an fp16 scale ``d``:
``w = d * t`` with ``t`` in {-1, 0, 1}. bitflux has one fp32 scale per row, so every block of row n
gets ``d = fp16(scale[n])``: exact up to the fp16 rounding of the scale. Block layouts (ggml-quants.c):

- TQ2_0 (66 bytes, 2.0625 bits a weight): ``qs[64]`` then ``d``. Byte j of the 32-byte half h holds
  ``t + 1`` of weights 128h + j, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7: bitflux's 2-bit runtime
  layout (docs/FORMAT.md) is this very layout, so a 256-block is two of its 128-groups.
- TQ1_0 (54 bytes, 1.6875 bits a weight): ``qs[48]``, ``qh[4]``, then ``d``. Trits ``u = t + 1``,
  five a byte, most significant first, as ``ceil(q * 256 / 243)``: qs[j] (j < 32) holds weights j,
  32+j, .., 128+j; qs[32+j] (j < 16) holds 160+j, 176+j, .., 224+j; qh[j] holds 240+j, 244+j,
  248+j, 252+j as the four high trits (the fifth is 0).
- Q2_K (84 bytes, 2.625 bits a weight): ``scales[16]``, ``qs[64]``, ``d``, ``dmin``; weight i of 16-weight
  sub-block s is ``d * (scales[s] & 15) * q - dmin * (scales[s] >> 4)``, ``qs`` laid out as TQ2_0's. With
  every ``scales`` byte 0x11, ``d = dmin = fp16(scale[n])`` and ``q = t + 1`` (TQ2_0's bytes), that is
  ``d * t``: a general 2-bit type that holds ternary weights exactly, for readers without the TQ types'
  fast paths (ComfyUI-GGUF dequantizes Q2_K in torch, TQ2_0/TQ1_0 in numpy on the CPU).

1-D tensors are F32 (as ComfyUI-GGUF's converter writes them), other tensors keep their dtype
(BF16, F16 or F32). The file is written one tensor at a time.
"""

from pathlib import Path

import gguf
import numpy as np
import torch

from ..artifacts import atomic_file
from ..checkpoint import CheckpointFile, to_runtime_2bit
from ..errors import UsageError
from . import GGUF_CODECS, bfl_tensor, method_of, provenance
from .keys import bfl_modules, bfl_table

QK = 256  # weights a TQ block
TYPES = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0,
         "q2_k": gguf.GGMLQuantizationType.Q2_K}
FILE_TYPES = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0,
              "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K}
_DENSE = {torch.bfloat16: gguf.GGMLQuantizationType.BF16, torch.float16: gguf.GGMLQuantizationType.F16,
          torch.float32: gguf.GGMLQuantizationType.F32}
ROWS = 4096  # rows encoded at a time: bounds TQ1_0's temporaries


def fp16_scale(scale: torch.Tensor, name: str) -> torch.Tensor:
    """scale [N] fp32 -> [N] fp16, refused when fp16 cannot hold it (overflow, or rounding to 0)."""
    half = scale.half()
    if not bool(torch.isfinite(half).all() and (half > 0).all()):
        bad = float(scale[~(torch.isfinite(half) & (half > 0))][0])
        raise UsageError(f"{name}: scale {bad:g} does not fit a GGUF block's fp16 scale")
    return half


def _two_bit_parts(packed: torch.Tensor, half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """packed [N, K/4] uint8 (bitflux 2-bit layout, K % 256 == 0), half [N] fp16 -> a 256-block's quants
    [N, K/256, 64] and its fp16 scale's bytes [N, K/256, 2]."""
    n = packed.shape[0]
    qs = packed.reshape(n, -1, QK // 4)
    return qs, half.view(torch.uint8).reshape(n, 1, 2).expand(n, qs.shape[1], 2)


def tq2_0_blocks(packed: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """packed [N, K/4] uint8, half [N] fp16 -> [N, K/256 * 66] uint8."""
    qs, d = _two_bit_parts(packed, half)
    return torch.cat([qs, d], dim=2).reshape(len(packed), -1)


def q2_k_blocks(packed: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """packed [N, K/4] uint8, half [N] fp16 -> [N, K/256 * 84] uint8."""
    qs, d = _two_bit_parts(packed, half)
    scales = torch.full((*qs.shape[:2], QK // 16), 0x11, dtype=torch.uint8)  # sub-block scale 1, min 1
    return torch.cat([scales, qs, d, d], dim=2).reshape(len(packed), -1)  # d, and dmin the same


def tq1_0_blocks(codes: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """codes [N, K] int8 (K % 256 == 0), half [N] fp16 -> [N, K/256 * 54] uint8."""
    n, k = codes.shape
    u = (codes + 1).view(torch.uint8).reshape(n, k // QK, QK)  # trits in {0, 1, 2}

    def trits(lo: int, count: int, width: int) -> torch.Tensor:  # sum 3^(4-i) u[lo + i*width + j]: <= 242, fits uint8
        q = torch.zeros(n, k // QK, width, dtype=torch.uint8)
        for i in range(count):
            q += u[..., lo + i * width: lo + (i + 1) * width] * (81 // 3 ** i)
        return q

    q = torch.cat([trits(0, 5, 32), trits(160, 5, 16), trits(240, 4, 4)], dim=2).to(torch.int16)  # [N, K/256, 52]
    q = (q + (13 * q + 242) // 243).to(torch.uint8)  # ceil(q * 256 / 243), as 256 = 243 + 13
    d = half.view(torch.uint8).reshape(n, 1, 2).expand(n, q.shape[1], 2)
    return torch.cat([q, d], dim=2).reshape(n, -1)


def _ternary(ckpt: CheckpointFile, parts: tuple[str, ...], codec: str, name: str) -> torch.Tensor:
    """The fused module's TQ rows [N, K/256 * type size] uint8, encoded ROWS rows at a time."""
    out = []
    for m in parts:
        n, k = ckpt.modules[m]
        half = fp16_scale(ckpt.read(f"{m}.scale"), name)
        if codec in TWO_BIT:
            packed = to_runtime_2bit(ckpt.read(f"{m}.codes"), ckpt.codec, n, k)  # [N, K/4]
            out.append(TWO_BIT[codec](packed, half))
        else:
            codes = ckpt.codes(m)
            out += [tq1_0_blocks(codes[i:i + ROWS], half[i:i + ROWS]) for i in range(0, n, ROWS)]
    return torch.cat(out, dim=0)


TWO_BIT = {"tq2_0": tq2_0_blocks, "q2_k": q2_k_blocks}  # the codecs that reuse the 2-bit layout's bytes


def check_gguf_compatible(ckpt: CheckpointFile) -> None:
    """Refuse, in one line, a checkpoint whose ternary rows do not split into 256-weight blocks."""
    bad = {m: k for m, (_, k) in ckpt.modules.items() if k % QK}
    if bad:
        m, k = next(iter(sorted(bad.items())))
        raise UsageError(f"{ckpt.path}: GGUF's 256-weight blocks need K % 256 == 0, and {len(bad)} quantized layers have "
                         f"other widths (e.g. {m}: K = {k}); export this model with --format bfl or diffusers instead")


def write_gguf(ckpt: CheckpointFile, out: Path, codec: str = "tq2_0") -> dict:
    """Write ``ckpt`` as a GGUF file at ``out``; returns its size and tensor counts."""
    if codec not in TYPES:
        raise UsageError(f"--codec {codec!r}: GGUF takes {', '.join(GGUF_CODECS)}")
    check_gguf_compatible(ckpt)
    arch = ckpt.meta["architecture"]
    fused = {m: parts for m, parts in bfl_modules(arch).items() if parts[0] in ckpt.modules}
    plan = []  # (name, byte shape, numpy dtype, ggml type, make)
    for entry in bfl_table(arch):
        module, _, leaf = entry.bfl.rpartition(".")
        if module in fused and leaf == "weight":
            n = sum(ckpt.modules[p][0] for p in fused[module])
            k = ckpt.modules[fused[module][0]][1]
            size = gguf.GGML_QUANT_SIZES[TYPES[codec]][1]
            plan.append((entry.bfl, (n, k // QK * size), np.uint8, TYPES[codec],
                         lambda p=fused[module], name=entry.bfl: _ternary(ckpt, p, codec, name).numpy()))
            continue
        shape, dtype = _dense_meta(ckpt, entry.parts)
        shape = (sum(s[0] for s in shape),) + shape[0][1:]
        if len(shape) == 1 or dtype == torch.float32:
            plan.append((entry.bfl, shape, np.float32, None, lambda e=entry: bfl_tensor(ckpt, e, torch.float32).numpy()))
        else:  # BF16/F16 as raw bytes: numpy has no bfloat16
            plan.append((entry.bfl, shape[:-1] + (shape[-1] * 2,), np.uint8, _DENSE[dtype],
                         lambda e=entry, d=dtype: bfl_tensor(ckpt, e, d).view(torch.uint8).numpy()))

    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="flux")
        writer.add_name(f"{ckpt.meta['base_model']} 1.58-bit ({method_of(ckpt.meta)}, bitflux)")
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(FILE_TYPES[codec])
        for key, value in provenance(ckpt, f"gguf-{codec}").items():
            writer.add_string(f"bitflux.{key}", value)
        for name, shape, dtype, raw, _ in plan:
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            writer.add_tensor_info(name, shape, np.dtype(dtype), nbytes, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, dtype, _, make in plan:
            data = np.ascontiguousarray(make())
            if data.shape != shape or data.dtype != dtype:
                raise RuntimeError(f"{name}: made {data.dtype} {data.shape}, planned {np.dtype(dtype)} {shape}")
            writer.write_tensor_data(data)
        writer.close()
    return {"codec": codec, "bytes": out.stat().st_size, "tensors": len(plan), "ternary_tensors": len(fused)}


def _dense_meta(ckpt: CheckpointFile, parts: tuple[str, ...]) -> tuple[list[tuple[int, ...]], torch.dtype]:
    entries = [ckpt.file.entries[p] for p in parts]
    return [e.shape for e in entries], entries[0].dtype
