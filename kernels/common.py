"""Pieces shared by the Triton kernels: interpreter switch, M buckets, lazy autotuning, device
guard, operand checks, the scale/bias epilogue.

The packed layout (see layout.py): byte column ``c`` of a packed row holds the four weights
``128 * (c // 32) + 32 * p + c % 32`` for planes ``p = 0..3`` at bit shift ``2 p``.
"""

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
from triton import knobs

from .layout import GROUP


@triton.jit
def packed_k(t):
    """The K index of column t of the packed kernel's permuted activations (packed.py, "Permuted
    activations"): t = 16 wc + 2 s + h is field i = 7 - s + 8 h of packed word wc, i.e. byte
    j = i // 4 and plane p = i % 4 of that word: k = 128 (wc // 8) + 32 p + 4 (wc % 8) + j."""
    wc = t // 16
    i = 7 - t % 16 // 2 + 8 * (t % 2)
    return wc // 8 * 128 + i % 4 * 32 + wc % 8 * 4 + i // 4


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(knobs.runtime.interpret)


def autotuning() -> bool:
    """False with ``BITFLUX_AUTOTUNE=0``: each kernel's prune then keeps one config, which Triton compiles and
    runs without benchmarking any (a quick first call per shape on a new machine, not the fastest kernel)."""
    value = os.environ.get("BITFLUX_AUTOTUNE", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"BITFLUX_AUTOTUNE={value!r} is not 0 or 1")
    return value == "1"


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two, capped at 16384."""
    return min(triton.next_power_of_2(max(m, 1)), 16384)


def check_device(*tensors: torch.Tensor) -> None:
    """Refuse CPU tensors unless the interpreter is on, and GPUs without bf16/int8 tensor cores."""
    dev = tensors[0].device
    if any(t.device != dev for t in tensors):
        raise ValueError("ternary_linear: all tensors must be on one device")
    if interpreting():
        return
    if dev.type != "cuda":
        raise RuntimeError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU); "
                           "use BITFLUX_BACKEND=torch for the CPU path")
    if torch.cuda.get_device_capability(dev) < (8, 0):
        raise RuntimeError("the Triton kernels need an sm80+ GPU (Ampere or newer); use BITFLUX_BACKEND=torch")


@dataclass(frozen=True)
class Space:
    """A kernel's autotune space, built on first use (never at import).

    ``configs()`` lists the candidates, ``prune(configs, named_args, **kw)`` narrows them per call,
    ``key`` names the kernel arguments the best config is cached on, and ``interp`` is the single
    small config used under the interpreter, where autotuning would take minutes.
    """

    configs: Callable[[], list]
    prune: Callable
    key: tuple
    interp: dict

    def kept(self, configs: list, named_args: dict, **kwargs) -> list:
        """``prune``'s configs, or with tuning off (``autotuning()``) its first: the one every prune lists first
        for being sure to launch."""
        configs = self.prune(configs, named_args, **kwargs)
        return configs if autotuning() else configs[:1]


_TUNED = {}


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor (Triton launches on the current device), else a no-op."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch(kernel, space: Space, grid: Callable[[dict], tuple], *args, **kwargs) -> None:
    """Run ``kernel[grid(meta)](*args, **kwargs)`` on the first argument's device.

    Autotuned on CUDA (``autotuner``), ``space.interp`` when interpreting. Autotuning benchmarks
    candidates on the first call per key on a machine, so warm a shape up before CUDA graph capture.
    """
    with device_guard(args[0]):
        if interpreting():
            kernel[grid(space.interp)](*args, **kwargs, **space.interp)
            return
        tuned = _TUNED.get(kernel)
        if tuned is None:
            tuned = _TUNED[kernel] = autotuner(kernel, space)
        tuned[grid](*args, **kwargs)


def autotuner(kernel, space: Space):
    """Triton's autotuner over ``space`` for ``kernel``, its winners kept on disk (``cache_results``:
    in Triton's cache directory, ``TRITON_CACHE_DIR``, keyed by GPU target, Triton version, kernel
    source, tuning key and config list), so a process tunes a shape only once per machine."""
    return triton.autotune(space.configs(), key=list(space.key), prune_configs_by={"early_config_prune": space.kept},
                           cache_results=True)(kernel)


def launch_fixed(kernel, grid: tuple, meta: dict, *args, **kwargs) -> None:
    """Run a kernel that has one config (bandwidth-bound elementwise work): no autotuning, capture-safe."""
    with device_guard(args[0]):
        kernel[grid](*args, **kwargs, **meta)


def output_for(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               in_features: int, out: torch.Tensor | None) -> torch.Tensor:
    """Check a launcher's operands (x2: [M, K], packed: [N, Kp/4] uint8) and return y: [M, N] in x's dtype.

    ``out`` may have any row stride but must be unit-stride along N (what every launcher writes).
    """
    m, k = x2.shape
    n, kq = packed.shape
    if k != in_features or kq * 4 != -(-k // GROUP) * GROUP or packed.dtype != torch.uint8 or packed.stride(1) != 1:
        raise ValueError(f"x [{m}, {k}] and packed {tuple(packed.shape)} {packed.dtype} do not match in_features={in_features}")
    if scale.shape != (n,) or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError("scale must be a contiguous [N] float32 tensor")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError("bias must be a contiguous [N] tensor")
    check_device(x2, packed, scale, *([] if bias is None else [bias]))
    if out is None:
        return torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    if out.shape != (m, n) or out.dtype != x2.dtype:
        raise ValueError(f"out must be [{m}, {n}] {x2.dtype}")
    if n > 1 and out.stride(1) != 1:  # the GEMV and int32 epilogues write row + n: a strided N would go astray
        raise ValueError(f"out must have unit stride along N, got strides {tuple(out.stride())}")
    return out


@triton.jit
def store_scaled(acc, offs_m, offs_n, M, N, scale_ptr, bias_ptr, y_ptr, stride_ym, stride_yn,
                 HAS_BIAS: tl.constexpr):
    """Epilogue: ``y[m, n] = acc[m, n] * scale[n] + bias[n]`` in fp32, stored in y's dtype, masked."""
    mask_n = offs_n < N
    s = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N] fp32
    y = acc * s[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(ptrs, y.to(y_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & mask_n[None, :])
