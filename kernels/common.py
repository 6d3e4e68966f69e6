"""Pieces shared by the Triton kernels: interpreter switch, M buckets, lazy autotuning, 2-bit decode.

The packed layout (see layout.py): byte column ``c`` of a packed row holds the four weights
``128 * (c // 32) + 32 * p + c % 32`` for planes ``p = 0..3`` at bit shift ``2 p``. A kernel loads
one [BLOCK_N, BLOCK_KQ] byte tile and gets four [BLOCK_N, BLOCK_KQ] weight slices, each matching
the activation columns given by ``plane_k``.
"""

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import triton
import triton.language as tl
from triton import knobs

from .layout import GROUP, LANE


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return bool(knobs.runtime.interpret)


def m_bucket(m: int) -> int:
    """Autotune key for M: the next power of two, capped at 16384."""
    return min(triton.next_power_of_2(max(m, 1)), 16384)


def dot_dtype(dtype: torch.dtype):
    """Operand type of the W2A16 ``tl.dot`` for activations of ``dtype``.

    Triton 3.9's interpreter multiplies the raw bits of bf16 operands in ``tl.dot``; there bf16 is
    upcast to fp32, which changes no result (bf16 x ternary products are exact in fp32).
    """
    if dtype == torch.bfloat16:
        return tl.float32 if interpreting() else tl.bfloat16
    return {torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


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


_TUNED = {}
_GROUP = tl.constexpr(GROUP)
_LANE = tl.constexpr(LANE)


def device_guard(t: torch.Tensor):
    """``torch.cuda.device(t.device)`` for a CUDA tensor (Triton launches on the current device), else a no-op."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def launch(kernel, space: Space, grid: Callable[[dict], tuple], *args, **kwargs) -> None:
    """Run ``kernel[grid(meta)](*args, **kwargs)`` on the first argument's device.

    Autotuned on CUDA, ``space.interp`` when interpreting. Autotuning benchmarks candidates on the
    first call per key, so warm a shape up before CUDA graph capture.
    """
    with device_guard(args[0]):
        if interpreting():
            kernel[grid(space.interp)](*args, **kwargs, **space.interp)
            return
        tuned = _TUNED.get(kernel)
        if tuned is None:
            tuned = triton.autotune(space.configs(), key=list(space.key),
                                    prune_configs_by={"early_config_prune": space.prune})(kernel)
            _TUNED[kernel] = tuned
        tuned[grid](*args, **kwargs)


def launch_fixed(kernel, grid: tuple, meta: dict, *args, **kwargs) -> None:
    """Run a kernel that has one config (bandwidth-bound elementwise work): no autotuning, capture-safe."""
    with device_guard(args[0]):
        kernel[grid](*args, **kwargs, **meta)


def keep_fitting(configs, n: int, kq: int, m_cap: int):
    """Configs whose tiles fit (BLOCK_M <= m_cap), preferring BLOCK_N | N and BLOCK_KQ | KQ.

    Every FLUX (N, K) has N a multiple of 256 and Kp/4 a multiple of 256, so the whole space
    divides them; odd shapes keep the non-dividing configs rather than none.
    """
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= m_cap
           and c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n)) and c.kwargs["BLOCK_KQ"] <= kq]
    fit = fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_KQ"])]
    even = [c for c in fit if n % c.kwargs["BLOCK_N"] == 0 and kq % c.kwargs["BLOCK_KQ"] == 0]
    return even or fit


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


def gemm_space(act_arg: str, big: tuple, small: tuple) -> Space:
    """Autotune space of a tensor-core GEMM kernel whose activation pointer argument is ``act_arg``.

    ``big`` (buckets of M >= 128) and ``small`` (below) list (BLOCK_M, BLOCK_N, BLOCK_KQ, num_warps,
    num_stages): a few hand-picked tiles each, no 128x256 tile with 4 warps (spills). The pruner
    drops tiles over the device's shared memory, counting the pipelined operands (activations
    BLOCK_M x 4 BLOCK_KQ, packed weights BLOCK_N x BLOCK_KQ per stage) plus the decoded weight
    tile that sm90 stages through shared memory for wgmma (BLOCK_N x 4 BLOCK_KQ activation-sized).
    """
    def configs():
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_KQ": bkq, "GROUP_M": 8}, num_warps=w, num_stages=s)
                for bm, bn, bkq, w, s in big + small]

    def prune(configs, named_args, **kwargs):
        bucket, n, kq, act = named_args["M_BUCKET"], named_args["N"], named_args["KQ"], named_args[act_arg]
        budget = torch.cuda.get_device_properties(act.device).shared_memory_per_block_optin

        def smem(c):
            bm, bn, bkq = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_KQ"]
            return c.num_stages * bkq * (bm * 4 * act.element_size() + bn) + bn * 4 * bkq * act.element_size()

        cands = [c for c in configs if (c.kwargs["BLOCK_M"] >= 64) == (bucket >= 128) and smem(c) <= budget]
        return keep_fitting(cands or configs, n, kq, max(16, bucket))

    return Space(configs, prune, key=("M_BUCKET", "N", "KQ"),
                 interp={"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_KQ": 32, "GROUP_M": 4})


@triton.jit
def tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program, GROUP_M row tiles at a time so weight tiles stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def operand_ptrs(x_ptr, w_ptr, offs_m, offs_n, M, N, stride_xm, stride_wn, BLOCK_KQ: tl.constexpr):
    """(x_rows [BLOCK_M, 1], w_ptrs [BLOCK_N, BLOCK_KQ] at the first byte column, offs_c [BLOCK_KQ]).

    Rows past M and N wrap around, which keeps the main loop free of M/N masks; the store masks them.
    """
    offs_c = tl.arange(0, BLOCK_KQ)
    x_rows = x_ptr + (offs_m % M)[:, None].to(tl.int64) * stride_xm
    w_ptrs = w_ptr + (offs_n % N)[:, None].to(tl.int64) * stride_wn + offs_c[None, :]
    return x_rows, w_ptrs, offs_c


@triton.jit
def plane_k(kq, offs_c, p: tl.constexpr):
    """K indices [BLOCK_KQ] of plane ``p`` for byte columns ``kq + offs_c`` (kq a multiple of 32)."""
    return (kq + offs_c) // _LANE * _GROUP + _LANE * p + offs_c % _LANE


@triton.jit
def plane_codes(wb, p: tl.constexpr):
    """Ternary codes int8 in {-1, 0, 1} of plane ``p`` of a packed byte tile ``wb`` (uint8)."""
    return ((wb >> (2 * p)) & 3).to(tl.int8) - 1


@triton.jit
def plane_weights(wb, p: tl.constexpr, DTYPE: tl.constexpr):
    """Plane ``p`` of ``wb`` as weights of type DTYPE (via fp32: the interpreter mis-casts int8 to bf16)."""
    return plane_codes(wb, p).to(tl.float32).to(DTYPE)


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
