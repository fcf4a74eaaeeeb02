"""Shared plumbing for every stage: base dir, device/dtype, torchrun init, seeding, printing.

Nothing here knows about models or data; it only answers "where am I running and with what".
"""

from __future__ import annotations

import ctypes
import os
import random
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def autodetect_device() -> torch.device:
    """CUDA when present, else CPU. NANOCHAT_DEVICE=cpu|cuda|mps forces one."""
    forced = os.environ.get("NANOCHAT_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def autodetect_dtype(device: torch.device) -> torch.dtype:
    """Compute dtype: bf16 on CUDA with SM >= 80, fp32 elsewhere. NANOCHAT_DTYPE overrides."""
    forced = os.environ.get("NANOCHAT_DTYPE")
    if forced in ("float16", "fp16"):
        # fp16 gradients underflow without a loss scaler (torch.amp.GradScaler), which the training
        # loops do not have; bf16 has fp32's exponent range and needs none.
        raise ValueError(
            f"NANOCHAT_DTYPE={forced} is not supported: fp16 training needs a grad scaler and this "
            "code has none; use bf16 on CUDA with SM >= 80 (A100, H100, ...), fp32 otherwise"
        )
    if forced:
        if forced not in _DTYPES:
            raise ValueError(f"NANOCHAT_DTYPE={forced!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[forced]
    # bf16 tensor cores arrived with Ampere (SM 80); older GPUs emulate it slowly, so they get fp32.
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return torch.bfloat16
    return torch.float32


@dataclass
class DistInfo:
    is_ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
CPU_HEAP_KEEP_BYTES = 1 << 30
GLIBC_MMAP_CAP_BEFORE_2_35 = 32 << 20  # older glibc refuses a larger mmap threshold


def keep_freed_memory_for_reuse() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to
    the kernel. True where both thresholds are now 1 GiB (glibc >= 2.35); False elsewhere: older
    glibc gets what it accepts (an mmap threshold of 32 MiB), other C libraries nothing.

    Why: a CPU training step allocates and frees the same large tensors every step (activations,
    the head's logits: 32 MiB at 4,096 rows x a 2,048 vocabulary). By default glibc serves
    allocations above a threshold (at most 32 MiB) with a fresh mmap and returns them on free,
    and trims the heap's free top, so each step the kernel maps and zeroes those pages again:
    ~90,000 page faults a step at the cpu profile's pretraining shape, a quarter of its time
    (docs/experiments.md, "Page faults"). With both thresholds at 1 GiB the memory stays with the
    process at its peak and is reused; the cost is that a process keeps its peak heap (plus up to
    1 GiB free) until it exits. It overrides MALLOC_* / GLIBC_TUNABLES malloc settings. GPU runs
    allocate their tensors on the device; there this is not called."""
    try:  # glibc answers this (no subprocess, unlike ctypes.util.find_library); others raise
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (AttributeError, ValueError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, CPU_HEAP_KEEP_BYTES)
    if mallopt(_M_MMAP_THRESHOLD, CPU_HEAP_KEEP_BYTES):
        return bool(trimmed)
    mallopt(_M_MMAP_THRESHOLD, GLIBC_MMAP_CAP_BEFORE_2_35)
    return False


def init_distributed() -> DistInfo:
    """Initialise torch.distributed when launched by torchrun (NCCL on CUDA, gloo on CPU). On CPU
    it also keeps freed memory for reuse (keep_freed_memory_for_reuse)."""
    device = autodetect_device()
    if device.type == "cpu":
        keep_freed_memory_for_reuse()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(False, 0, 0, 1, device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if backend == "nccl" else None)
    return DistInfo(True, rank, local_rank, world_size, device)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def reduce_by_name(values: dict[str, float], info: DistInfo, op: str = "sum") -> dict:
    """{name: value} summed (op "sum") or maximised ("max") over all ranks, by name: the keys are
    sorted into one tensor, so every rank must pass the same names (a missing one is an error,
    not a silent shift of every later value)."""
    names = sorted(values)
    if not info.is_ddp:
        return {name: float(values[name]) for name in names}
    # str hashes differ between processes: a checksum of the names is the same on every rank
    shape = torch.tensor([len(names), zlib.crc32("\0".join(names).encode())], device=info.device)
    lowest, highest = shape.clone(), shape.clone()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
    dist.all_reduce(highest, op=dist.ReduceOp.MAX)
    if not torch.equal(lowest, highest):
        raise RuntimeError(f"reduce_by_name: the ranks reduce different metric names ({names})")
    packed = torch.tensor([values[n] for n in names], dtype=torch.float64, device=info.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(names, packed.tolist()))


def gather_by_name(lists: dict[str, list], info: DistInfo) -> dict[str, list]:
    """{name: list} concatenated over ranks in rank order; a name some ranks lack (they had
    nothing to measure) gathers what the others have."""
    if not info.is_ddp:
        return {name: list(v) for name, v in lists.items()}
    parts = [None] * info.world_size
    dist.all_gather_object(parts, lists)
    names = sorted(set().union(*parts))
    return {name: [v for part in parts for v in part.get(name, [])] for name in names}


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed so progress shows under torchrun and tee."""
    if get_rank() == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Peak dense bf16 FLOP/s per device, for MFU. Unknown devices get MFU None rather than a guess.
_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A10": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "GH200": 989e12,
    "B200": 2250e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in sorted(_PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if key in name:
            return value
    return None
