"""Whether to torch.compile the model: on for CUDA, off on CPU, NANOCHAT_COMPILE=0/1 overrides."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from nanochat.common import autodetect_dtype
from nanochat.gpt import GPT


def compile_enabled(device: torch.device | str) -> bool:
    """NANOCHAT_COMPILE when set (0 or 1), else on for CUDA only."""
    # Off on CPU: the runs there are tests and small profiles, where compile time is not won back.
    env = os.environ.get("NANOCHAT_COMPILE")
    if env is None:
        return torch.device(device).type == "cuda"
    if env not in ("0", "1"):
        raise ValueError(f"NANOCHAT_COMPILE={env!r}: use 0 or 1")
    return env == "1"


def maybe_compile(
    model: nn.Module, device: torch.device | str, enabled: bool | None = None
) -> nn.Module:
    """torch.compile(model) when `enabled` (None: compile_enabled(device)), else model itself.

    The compiled wrapper shares its parameters with `model` but its state_dict keys carry an
    "_orig_mod." prefix: train with the result, save and load `model`.
    """
    if enabled is None:
        enabled = compile_enabled(device)
    if not enabled:
        return model
    if isinstance(model, GPT) and model.compute_dtype is None:
        # Resolve the dtype now, outside the graph: autodetect_dtype reads os.environ and asks the
        # GPU for its capability, Python that has no place inside a compiled forward.
        model.compute_dtype = autodetect_dtype(torch.device(device))
    # Fixed shapes (dynamic=False): training batches all have one shape. Decoding with the KV cache
    # changes shape every step, so it uses the uncompiled model.
    return torch.compile(model, dynamic=False)
