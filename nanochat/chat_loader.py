"""Training batches of conversations for mid-training and SFT.

A row is a rendered conversation (tokenizer.render_conversation), shifted by one token:
    inputs  = ids[:-1]   padded with <|assistant_end|>
    targets = ids[1:]    -1 (ignored by the loss) wherever the mask is 0 and on the padding
so the loss falls only on what the assistant says, and on its closing <|assistant_end|>.

Order and sharding: each epoch is one deterministic permutation of the mixture (seed + epoch). An
optimizer step takes the next world_size * grad_accum * batch_size conversations of that stream, and
slot s = rank * grad_accum + micro takes the s-th block of batch_size of them. A step thus trains on
the same rows however many processes run it, and the loader's whole state is one cursor, the same on
every rank: a resume continues exactly.
"""

from __future__ import annotations

import torch


def collate(
    rows: list[tuple[list[int], list[int]]], pad_id: int, device="cpu", pad_to: int | None = None
):
    """[(ids, mask)] -> (inputs, targets), two (B, T) LongTensors, targets -1 where nothing is
    learned. T is the longest row minus one, or pad_to (fixed shapes for torch.compile)."""
    if not rows:
        raise ValueError("collate: no rows")
    T = max(len(ids) for ids, _ in rows) - 1
    if pad_to is not None:
        if T > pad_to:
            raise ValueError(f"collate: a row of {T + 1} tokens does not fit pad_to={pad_to}")
        T = pad_to
    T = max(T, 1)
    inputs = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        if n <= 0:
            continue  # a one-token row trains nothing
        ids_t = torch.tensor(ids, dtype=torch.long)
        # token t predicts token t+1, so the mask that decides a target is the one of t+1
        learned = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[r, :n] = ids_t[:-1]
        targets[r, :n] = torch.where(learned, ids_t[1:], torch.full_like(ids_t[1:], -1))
    if torch.device(device).type == "cuda":  # pinned memory lets the copy overlap the compute
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def bucket_lengths(seq_len: int, count: int = 4) -> list[int]:
    """The few lengths a compiled model is shown (one graph each, compiled once): seq_len and its
    halvings down to seq_len / 2**(count-1), rounded up to a multiple of 64 (kernel-friendly)."""
    buckets = {seq_len}
    for k in range(1, count):
        buckets.add(min(seq_len, -(-max(1, seq_len >> k) // 64) * 64))
    return sorted(buckets)


class ConversationLoader:
    """next_step() -> the grad_accum (inputs, targets) micro-batches of this rank's slots (see the
    module docstring); state_dict() is the global cursor. padded_tokens and real_tokens count what
    this rank's micro-batches held.

    With fixed_shapes (torch.compile) a micro-batch is padded to the smallest bucket length that
    holds its longest row, not to seq_len: AQuA conversations are a few hundred tokens, and a 2048
    context would be mostly padding.
    """

    def __init__(
        self,
        task,
        tokenizer,
        batch_size: int,
        seq_len: int,
        grad_accum: int = 1,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device="cpu",
        state: dict | None = None,
        fixed_shapes: bool = False,
    ):
        if len(task) == 0:
            raise ValueError("ConversationLoader: the task has no examples")
        self.task, self.tokenizer = task, tokenizer
        self.batch_size, self.seq_len, self.grad_accum = batch_size, seq_len, grad_accum
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.buckets = bucket_lengths(seq_len) if fixed_shapes else None
        self.padded_tokens = self.real_tokens = 0
        self.pad_id = tokenizer.encode_special("<|assistant_end|>")
        self.per_step = world_size * grad_accum * batch_size
        self.cursor = int((state or {}).get("cursor", 0))
        self._perm_epoch, self._perm = None, None
        self.truncated = 0  # conversations cut at seq_len (this rank)

    @property
    def epoch(self) -> float:
        return self.cursor / len(self.task)

    def _index(self, g: int) -> int:
        # conversation number g of the endless stream: epoch g // n, in that epoch's permutation,
        # which every rank (and every resume) draws alike from the seed
        n = len(self.task)
        epoch, pos = divmod(g, n)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(n, generator=gen).tolist(), epoch
        return self._perm[pos]

    def render(self, conv) -> tuple[list[int], list[int]]:
        ids, mask = self.tokenizer.render_conversation(conv, max_tokens=None)
        if len(ids) > self.seq_len + 1:
            self.truncated += 1
            ids, mask = ids[: self.seq_len + 1], mask[: self.seq_len + 1]
        return ids, mask

    def next_step(self):
        batches = []
        for micro in range(self.grad_accum):
            # this rank's micro-batches are consecutive slots of the step's global batch
            slot = self.rank * self.grad_accum + micro
            start = self.cursor + slot * self.batch_size
            rows = [
                self.render(self.task[self._index(g)])
                for g in range(start, start + self.batch_size)
            ]
            longest = max(len(ids) for ids, _ in rows) - 1
            pad_to = None if self.buckets is None else next(b for b in self.buckets if b >= longest)
            batch = collate(rows, self.pad_id, self.device, pad_to)
            self.padded_tokens += batch[0].numel()
            self.real_tokens += sum(max(0, len(ids) - 1) for ids, _ in rows)
            batches.append(batch)
        self.cursor += self.per_step
        return batches

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}
