"""FlashAttention for the scope attention where it is installed (ReAttentionConfig.attention_backend): flash-attn-4
(`flash_attn.cute`, Hopper and Blackwell) or flash-attn 2.1+ (Ampere and Hopper); SDPA everywhere else.

Both packages' flash_attn_func take q [B, c, Hq, D] and k/v [B, L, Hkv, D] (GQA native) in fp16/bf16 on CUDA, and
align `causal=True` bottom-right when c < L: query t sees keys 0..L-c+t, as the scope's last c positions must. The
packages are imported at the first choice, not with this module, once per process; a choice is made once per
(setting, device, dtype, head_dim, decode step or query chunk)."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

FIX = ("pip install flash-attn-4 (Hopper, Blackwell; or flash-attn>=2.1 on Ampere), or use attention_backend='auto' "
       "(SDPA where FlashAttention cannot run)")
DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class FlashKernel:
    """One installed FlashAttention package and what it runs (kept conservative: what its releases all support)."""

    package: str
    # flash_attn_func(q [B, c, Hq, D], k, v [B, L, Hkv, D], softmax_scale=, causal=) -> out [B, c, Hq, D] or (out, lse)
    function: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    archs: tuple[int, ...]  # CUDA compute capability majors
    head_dims: frozenset[int]

    def unfit(self, arch: int | None, dtype: torch.dtype, head_dim: int) -> str | None:
        """Why this kernel cannot run attention on a device of compute capability `arch` (None: not CUDA) in
        `dtype` with `head_dim`; None when it can."""
        archs = " or ".join(f"{major}.x" for major in self.archs)
        if arch is None:
            return f"{self.package} runs on CUDA devices only (compute capability {archs})"
        if arch not in self.archs:
            return f"{self.package} runs on compute capability {archs}, not {arch}.x"
        if dtype not in DTYPES:
            return f"{self.package} runs in float16/bfloat16, not {dtype}"
        if head_dim not in self.head_dims:
            return f"{self.package} is used for head_dim {sorted(self.head_dims)}, not {head_dim}"
        return None


def _flash_attn_4() -> FlashKernel:
    from flash_attn.cute import flash_attn_func

    return FlashKernel("flash-attn-4", flash_attn_func, archs=(9, 10), head_dims=frozenset((64, 96, 128)))


def _flash_attn_2() -> FlashKernel:
    import flash_attn
    from flash_attn import flash_attn_func
    from packaging.version import Version

    if Version(flash_attn.__version__) < Version("2.1"):
        raise ImportError(f"flash-attn {flash_attn.__version__} aligns causal masks top-left (2.1+: bottom-right)")
    return FlashKernel("flash-attn 2.x", flash_attn_func, archs=(8, 9), head_dims=frozenset(range(8, 257, 8)))


LOADERS = {"flash-attn-4": _flash_attn_4, "flash-attn 2.x": _flash_attn_2}  # preferred first


@functools.lru_cache(maxsize=1)
def installed() -> tuple[tuple[FlashKernel, ...], tuple[str, ...]]:
    """The FlashAttention packages importable here, preferred first, and why each other one is not."""
    kernels, missing = [], []
    for package, load in LOADERS.items():
        try:
            kernels.append(load())
        except Exception as err:  # a broken install (a CUDA library or driver it lacks) counts as not installed
            missing.append(f"{package} is not importable ({type(err).__name__}: {err})")
    return tuple(kernels), tuple(missing)


def _arch(device: torch.device) -> int | None:
    """`device`'s CUDA compute capability major (9: Hopper), None off CUDA."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def choose_flash(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int,
                 decode: bool = False) -> FlashKernel | None:
    """The FlashAttention kernel that `attention_backend=backend` runs on `device` in `dtype` with `head_dim`, for a
    decode step (one query) or a query chunk; None for SDPA. "auto": the first installed kernel that runs it, else
    SDPA, and SDPA for decode steps (on the H200 a flash-attn-4 call costs ~0.09 ms of host time, more than SDPA's
    whole decode step at 0.04-0.10 ms; query chunks of 16-512 run 1.3-4x faster); "flash": that kernel for every call,
    or a ValueError naming why none runs and the fix; "sdpa": SDPA."""
    if backend == "sdpa" or (backend == "auto" and decode):
        return None
    kernels, reasons = installed()
    arch = _arch(device)
    for kernel in kernels:
        reason = kernel.unfit(arch, dtype, head_dim)
        if reason is None:
            return kernel
        reasons += (reason,)
    if backend == "flash":
        raise ValueError(f"attention_backend='flash' cannot run here: {'; '.join(reasons)}. Fix: {FIX}")
    return None
