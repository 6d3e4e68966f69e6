"""GPU profiles for projections: memory, bandwidth and dense tensor-core rates from vendor datasheets.

Rates are dense (no 2:4 sparsity). ``bf16_tflops`` is the 16-bit tensor rate with fp32
accumulation: bf16 where the card has it, fp16 on V100 and T4 (``bf16: False``). ``int8_tops`` is
the dense int8 tensor rate, ``None`` where there are no int8 tensor cores (V100). ``memory_gb`` is
the datasheet figure in decimal GB (1e9 bytes), which is close to what the driver exposes.
"""

import re

from ..errors import UsageError

PROFILES: dict[str, dict] = {
    "a10": dict(name="NVIDIA A10", memory_gb=24, bandwidth_gbs=600, bf16_tflops=125, int8_tops=250, bf16=True),
    # AWS-only variant; no NVIDIA datasheet: AWS/third-party figures (same memory, lower tensor rate).
    "a10g": dict(name="NVIDIA A10G", memory_gb=24, bandwidth_gbs=600, bf16_tflops=70, int8_tops=140, bf16=True),
    "l4": dict(name="NVIDIA L4", memory_gb=24, bandwidth_gbs=300, bf16_tflops=121, int8_tops=242, bf16=True),
    "l20": dict(name="NVIDIA L20", memory_gb=48, bandwidth_gbs=864, bf16_tflops=119.5, int8_tops=239, bf16=True),
    "l40s": dict(name="NVIDIA L40S", memory_gb=48, bandwidth_gbs=864, bf16_tflops=362, int8_tops=733, bf16=True),
    "a100-40g": dict(name="NVIDIA A100 40GB SXM", memory_gb=40, bandwidth_gbs=1555, bf16_tflops=312, int8_tops=624, bf16=True),
    "a100-80g": dict(name="NVIDIA A100 80GB SXM", memory_gb=80, bandwidth_gbs=2039, bf16_tflops=312, int8_tops=624, bf16=True),
    "h100": dict(name="NVIDIA H100 SXM", memory_gb=80, bandwidth_gbs=3350, bf16_tflops=989, int8_tops=1979, bf16=True),
    "h200": dict(name="NVIDIA H200 SXM", memory_gb=141, bandwidth_gbs=4800, bf16_tflops=989, int8_tops=1979, bf16=True),
    "rtx3090": dict(name="NVIDIA GeForce RTX 3090", memory_gb=24, bandwidth_gbs=936, bf16_tflops=71, int8_tops=284, bf16=True),
    "rtx4090": dict(name="NVIDIA GeForce RTX 4090", memory_gb=24, bandwidth_gbs=1008, bf16_tflops=165.2, int8_tops=660.6, bf16=True),
    "v100": dict(name="NVIDIA V100 32GB SXM2", memory_gb=32, bandwidth_gbs=900, bf16_tflops=125, int8_tops=None, bf16=False),
    "t4": dict(name="NVIDIA T4", memory_gb=16, bandwidth_gbs=320, bf16_tflops=65, int8_tops=130, bf16=False),
}
ALIASES = {"a100": "a100-80g", "h100-sxm": "h100", "3090": "rtx3090", "4090": "rtx4090"}

# torch.cuda.get_device_name() -> profile; the first match wins, so A10G precedes A10.
_DEVICE_NAMES = [(r"A10G", "a10g"), (r"A10\b", "a10"), (r"\bL4\b", "l4"), (r"\bL20\b", "l20"),
                 (r"L40S", "l40s"), (r"A100.*40\s?GB", "a100-40g"), (r"A100", "a100-80g"), (r"H100", "h100"),
                 (r"H200", "h200"), (r"3090", "rtx3090"), (r"4090", "rtx4090"), (r"V100", "v100"), (r"\bT4\b", "t4")]


def gpu_profile(name: str) -> dict:
    """The profile of a GPU by name (case-insensitive, aliases allowed), with its ``key``.

    An unknown name raises ``UsageError`` listing the known ones.
    """
    key = name.strip().lower().replace("_", "-")
    key = ALIASES.get(key, key)
    if key not in PROFILES:
        raise UsageError(f"unknown GPU {name!r}; known: {', '.join(PROFILES)} (aliases: {', '.join(ALIASES)})")
    return {"key": key, **PROFILES[key]}


def profile_for_device(device_name: str) -> str | None:
    """The profile key of a CUDA device name (e.g. "NVIDIA H100 80GB HBM3" -> "h100"), or None."""
    for pattern, key in _DEVICE_NAMES:
        if re.search(pattern, device_name, re.IGNORECASE):
            return key
    return None
