"""Distributed, resumable pretraining data loader: documents -> tokens -> rows -> (inputs, targets).

Rows are packed "BOS-aligned best fit": every row starts at the start of a document, and is filled
from a look-ahead buffer of whole documents (see DataLoader._next_row). Rank r reads every
world_size-th unit (parquet row group, text block or synthetic seed: dataset.shard_units); a small
corpus is looped over, one pass over this rank's units per epoch. state_dict() between batches,
then DataLoader(..., state=s), continues with the exact next batch.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from nanochat import dataset as ds

STATE_VERSION = 1


class DataLoader:
    def __init__(
        self,
        tokenizer,
        batch_size: int,
        seq_len: int,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        source: str = "auto",
        data_dir=None,
        device="cpu",
        state: dict | None = None,
        buffer_size: int = 32,
        tokenizer_batch_size: int = 128,
    ):
        if batch_size < 1 or seq_len < 1 or buffer_size < 1:
            raise ValueError(
                f"batch_size ({batch_size}), seq_len ({seq_len}) and buffer_size ({buffer_size}) "
                f"must be >= 1"
            )
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.batch_size, self.seq_len, self.split = batch_size, seq_len, split
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.buffer_size, self.tokenizer_batch_size = buffer_size, tokenizer_batch_size
        self.source, all_units = ds.list_units(split, source, data_dir)
        self.units = ds.shard_units(all_units, rank, world_size)
        self.fingerprint = self._fingerprint(all_units)

        # where reading stands: passes completed over this rank's units, the index (in this rank's
        # unit list) of the unit the next document comes from, that document's index in it, and
        # the batches produced so far
        self.epoch, self.unit, self.doc, self.batches = 0, 0, 0, 0
        # the look-ahead: ((unit, doc), tokens), oldest first; a saved state lists only the refs and
        # the documents are re-read and re-tokenised on resume
        self.buffer: list[tuple[tuple[int, int], list[int]]] = []
        self._docs: list[str] | None = None  # documents of self.unit, loaded lazily
        self._tok_start, self._toks = 0, []  # tokenised slice of self._docs starting at _tok_start
        if state is not None:
            self._restore(state)

    @property
    def passes(self) -> float:
        """How far through this rank's data: 1.0 = every unit read once; past 1 documents repeat."""
        return self.epoch + self.unit / max(1, len(self.units))

    # ---------------------------------------------------------------- state
    def _fingerprint(self, units) -> str:
        # Enough to notice a changed corpus (more shards downloaded, different dir) on resume.
        first, last = units[0], units[-1]

        def name(u):
            return f"{u.kind}:{os.path.basename(u.path) if u.path else ''}:{u.index}"

        return f"{self.source}|{len(units)}|{name(first)}|{name(last)}"

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "source": self.source,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "buffer_size": self.buffer_size,
            "fingerprint": self.fingerprint,
            "epoch": self.epoch,
            "unit": self.unit,
            "doc": self.doc,
            "buffer": [list(ref) for ref, _ in self.buffer],
            "batches": self.batches,
        }

    def _restore(self, state: dict) -> None:
        expect = {
            "version": STATE_VERSION,
            "split": self.split,
            "source": self.source,
            "rank": self.rank,
            "world_size": self.world_size,
            "buffer_size": self.buffer_size,
            "fingerprint": self.fingerprint,
        }
        for key, value in expect.items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume the data loader: saved {key}={state.get(key)!r} but now "
                    f"{value!r}. Resume with the same data, split and number of processes "
                    f"(or start the data from scratch)."
                )
        self.epoch = state["epoch"]
        self.unit = state["unit"]
        self.doc = state["doc"]
        self.batches = state["batches"]
        # Re-read the buffered documents: group by unit so each unit is loaded once.
        refs = [tuple(r) for r in state["buffer"]]
        tokens = {}
        for u in sorted({u for u, _ in refs}):
            docs = ds.load_unit(self.units[u])
            wanted = [d for uu, d in refs if uu == u]
            for d, toks in zip(wanted, self._encode([docs[d] for d in wanted])):
                tokens[(u, d)] = toks
        self.buffer = [(ref, tokens[ref]) for ref in refs]

    # ---------------------------------------------------------------- reading documents
    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode(texts, prepend=self.bos) if texts else []

    def _next_doc(self) -> tuple[tuple[int, int], list[int]]:
        empty_units = 0
        while True:
            if self._docs is None:
                self._docs = ds.load_unit(self.units[self.unit])
                self._tok_start, self._toks = 0, []
            if self.doc < len(self._docs):
                i = self.doc - self._tok_start
                if not 0 <= i < len(self._toks):  # tokenise the next slice in one batched call
                    self._tok_start = self.doc
                    self._toks = self._encode(
                        self._docs[self.doc : self.doc + self.tokenizer_batch_size]
                    )
                    i = 0
                ref = (self.unit, self.doc)
                self.doc += 1
                return ref, self._toks[i]
            empty_units = empty_units + 1 if not self._docs else 0
            if empty_units > len(self.units):
                raise RuntimeError(
                    f"data loader rank {self.rank}: the {self.split!r} split has no documents"
                )
            self.unit, self.doc, self._docs = self.unit + 1, 0, None
            if self.unit == len(self.units):
                self.unit, self.epoch = 0, self.epoch + 1

    def _fill_buffer(self) -> None:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._next_doc())

    # ---------------------------------------------------------------- packing
    def _next_row(self, out: list[int]) -> None:
        """Append seq_len + 1 tokens to `out`: one row, starting with a document's BOS.

        Each document is tokenised with <|bos|> in front, so a row that starts at a document start
        starts with BOS, and attention needs no mask at document boundaries. Every token position
        is used; the price is the cropped tails."""
        row_len = self.seq_len + 1
        used = 0
        while used < row_len:
            self._fill_buffer()
            space = row_len - used
            # the largest buffered document that still fits (ties: the older one) ...
            best, best_len = -1, 0
            for i, (_, toks) in enumerate(self.buffer):
                if best_len < len(toks) <= space:
                    best, best_len = i, len(toks)
            if best >= 0:
                toks = self.buffer.pop(best)[1]
            else:
                # ... or, when none fits, the oldest one cropped to the space left: taking the
                # oldest bounds how long a long document can wait in the buffer
                toks = self.buffer.pop(0)[1][:space]
            out.extend(toks)
            used += len(toks)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (inputs, targets): LongTensors [batch_size, seq_len] on the loader's device; targets
        are the inputs shifted by one."""
        flat: list[int] = []
        for _ in range(self.batch_size):
            self._next_row(flat)
        rows = np.array(flat, dtype=np.int64).reshape(self.batch_size, self.seq_len + 1)
        inputs = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        self.batches += 1
        if self.device.type == "cuda":
            # pinned host memory lets the copy overlap with compute
            inputs = inputs.pin_memory().to(self.device, non_blocking=True)
            targets = targets.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            inputs, targets = inputs.to(self.device), targets.to(self.device)
        return inputs, targets

    def __iter__(self):
        while True:
            yield self.next_batch()
