"""Bits per byte: a tokenizer-independent language-modelling loss.

Mean cross-entropy per *token* depends on the vocabulary (a bigger vocab packs more text into each
token, so its per-token loss is higher for the same model quality). Dividing the summed loss by the
number of UTF-8 *bytes* those tokens stand for removes that dependence:

    bpb = sum_t nats(t) / (ln 2 * sum_t bytes(t))

over every target token t. Special tokens (<|bos|> ...) have bytes == 0 in `token_bytes` and are
left out of both sums, as are ignored targets (-1). Under torchrun each rank evaluates its own
batches and the two sums are all-reduced, so every rank returns the same number.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _next(batches):
    # Accept a plain iterator of (x, y) or a DataLoader-style object with next_batch().
    if hasattr(batches, "next_batch"):
        return batches.next_batch()
    return next(batches)


@torch.no_grad()
def evaluate_bpb(model, batches, steps: int, token_bytes: torch.Tensor) -> float:
    """Bits per byte of `model` over `steps` batches (x, y) drawn from `batches`.

    token_bytes: 1-D tensor, number of UTF-8 bytes of each token id (0 for special tokens), on the
    model's device. Returns a Python float (inf if no byte was seen on any rank).
    """
    if steps < 1:
        raise ValueError(f"evaluate_bpb needs steps >= 1, got {steps}")
    device = token_bytes.device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    if not hasattr(batches, "next_batch"):
        batches = iter(batches)
    was_training = model.training
    model.eval()
    try:
        for _ in range(steps):
            x, y = _next(batches)
            # (B*T,), 0 where y == -1
            nats = model(x, y, loss_reduction="none").reshape(-1).double()
            y = y.reshape(-1)
            valid = y >= 0
            nbytes = torch.where(
                valid, token_bytes[y.clamp(min=0)], torch.zeros_like(y, dtype=token_bytes.dtype)
            )
            counted = nbytes > 0  # drops specials and ignored targets from the numerator too
            total_nats += (nats * counted).sum()
            total_bytes += nbytes.to(torch.int64).sum()
    finally:
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total_nats, op=dist.ReduceOp.SUM)
        dist.all_reduce(total_bytes, op=dist.ReduceOp.SUM)
    nbytes_total = total_bytes.item()
    if nbytes_total == 0:
        return float("inf")
    return total_nats.item() / (math.log(2) * nbytes_total)
