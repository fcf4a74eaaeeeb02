"""Distributed, resumable pretraining data loader: documents -> tokens -> rows -> (inputs, targets).

Rows are packed "BOS-aligned best fit" from a look-ahead buffer of tokenised documents (see
DataLoader._next_row): every row starts with <|bos|>, and no token position is padding. Two
packings:

- "continue" (this class's default): when no buffered document fits the space left in a row, the
  longest one fills it and its remainder goes back into the look-ahead as a continuation (with a
  <|bos|> in front, so the row it later starts is still BOS-aligned). No text is thrown away.
- "legacy" (the packing before issue 24; base_train's default, PRETRAINING_PACKING): the oldest
  document is cropped to the space left and its tail is dropped. On documents of web-text lengths
  at 2048-token rows that discards 45% of the tokenised text (scripts/bench_dataloader.py), but at
  equal FLOPs it trained to a 0.08-0.10 nats/token lower loss than "continue" in the CPU benchmark
  (docs/performance.md, "Pretraining data loader"): the text it drops costs download and CPU,
  not GPU time.

Rank r reads every world_size-th unit (parquet row group, text block or synthetic seed:
dataset.shard_units); a small corpus is looped over, one pass over this rank's units per epoch.

With prefetch > 0 a background thread reads, tokenises and packs up to `prefetch` batches ahead
(pinned in host memory when the device is CUDA), so next_batch() in the training step is a queue
pop and an asynchronous copy. Each queued batch carries the loader state that follows it, so
state_dict() is always the position after the last batch the caller *consumed*, never the
producer's: DataLoader(..., state=s) continues with the exact next batch however far ahead the
producer had run when the state was taken (or the process was killed).
"""

from __future__ import annotations

import os
import queue
import threading
from bisect import bisect_right
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from nanochat import dataset as ds

STATE_VERSION = 2
PACKINGS = ("continue", "legacy")
# Look-ahead sizes (documents). "continue" wants many candidates so that a row's last gap is
# usually filled by a whole document rather than by cutting one; "legacy" keeps its old size.
DEFAULT_BUFFER = {"continue": 1024, "legacy": 32}
# The share of tokenised text each packing trains on, measured at 32 x 2048 on web-like document
# lengths (scripts/bench_dataloader.py): "continue" drops nothing (1.000, but for the look-ahead
# still buffered when a run stops), "legacy" 0.546. The shard count of run_aquarat_small.sh divides
# the token budget by the pretraining packing's (dataset.shards_needed).
KEPT_FRACTION = {"continue": 1.0, "legacy": 0.546}
# The packing pretraining uses unless --packing says otherwise: the one that reached the lower loss
# per FLOP in bench_pretrain_quality (two seeds, paired; docs/experiments.md, "Packing quality").
PRETRAINING_PACKING = "legacy"


def default_tokenizer_threads() -> int:
    """This process's share of the machine's cores: torchrun starts LOCAL_WORLD_SIZE processes per
    node (on Lambda's 8x H100, 208 vCPUs / 8 = 26 each)."""
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_procs))


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
        buffer_size: int | None = None,
        tokenizer_batch_size: int = 128,
        packing: str = "continue",
        prefetch: int = 0,
        tokenizer_threads: int | None = None,
    ):
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
        if buffer_size is None:
            buffer_size = DEFAULT_BUFFER[packing]
        if tokenizer_threads is None:
            tokenizer_threads = default_tokenizer_threads()
        if min(batch_size, seq_len, buffer_size, tokenizer_threads) < 1 or prefetch < 0:
            raise ValueError(
                f"batch_size ({batch_size}), seq_len ({seq_len}), buffer_size ({buffer_size}) and "
                f"tokenizer_threads ({tokenizer_threads}) must be >= 1 and prefetch ({prefetch}) "
                f">= 0"
            )
        self.tokenizer = tokenizer
        self.bos = tokenizer.get_bos_token_id()
        self.batch_size, self.seq_len, self.split = batch_size, seq_len, split
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.buffer_size, self.tokenizer_batch_size = buffer_size, tokenizer_batch_size
        self.packing, self.prefetch = packing, prefetch
        # Tokenising is most of a batch's CPU time and tiktoken releases the GIL while it works,
        # so a batch of documents is split over this many threads (created on first use).
        self.tokenizer_threads = tokenizer_threads
        self._pool: ThreadPoolExecutor | None = None
        self.source, all_units = ds.list_units(split, source, data_dir)
        self.units = ds.shard_units(all_units, rank, world_size)
        self.fingerprint = self._fingerprint(all_units)

        # The producer's position (read and written only by whoever produces batches: the caller
        # without prefetch, the background thread with it). Passes completed over this rank's
        # units, the index (in this rank's unit list) of the unit the next document comes from,
        # that document's index in it, and the batches produced so far.
        self._epoch, self._unit, self._doc, self._batches = 0, 0, 0, 0
        # Token accounting: read = tokenised, kept = placed in a row, dropped = cropped away (only
        # "legacy" drops). <|bos|> tokens put in front of continuations are not text: not counted.
        self._read, self._kept, self._dropped = 0, 0, 0
        # The look-ahead: entries (length, -seq, (unit, doc, start), tokens). `start` > 0 marks a
        # continuation: tokens = [bos] + the document's tokens[start:]. "continue" keeps the list
        # sorted (by length, then oldest first among equal lengths); "legacy" keeps arrival order.
        # A saved state lists only refs and seq numbers; documents are re-read on resume.
        self._buffer: list[tuple[int, int, tuple[int, int, int], np.ndarray]] = []
        self._keys: list[tuple[int, int]] = []  # (length, -seq) of _buffer, for bisect
        self._seq = 0  # arrival counter
        self._docs: list[str] | None = None  # documents of self._unit, loaded lazily
        self._tok_start, self._toks = 0, []  # tokenised slice of self._docs starting at _tok_start
        self._pending_refs = None  # a restored look-ahead, re-read by the first produce
        if state is not None:
            self._restore(state)
        # the state after the last batch the caller consumed (what a checkpoint must save)
        self._state = self._snapshot()

        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    # ---------------------------------------------------------------- the consumer's view
    @property
    def epoch(self) -> int:
        """Passes over this rank's units completed by the data consumed so far."""
        return self._state["epoch"]

    @property
    def passes(self) -> float:
        """How far through this rank's data: 1.0 = every unit read once; past 1 documents repeat."""
        return self._state["epoch"] + self._state["unit"] / max(1, len(self.units))

    @property
    def tokens_kept(self) -> int:
        """Tokenised text tokens placed in the rows consumed so far."""
        return self._state["tokens_kept"]

    @property
    def tokens_dropped(self) -> int:
        """Tokenised text tokens cropped away (never trained on) so far."""
        return self._state["tokens_dropped"]

    @property
    def kept_frac(self) -> float:
        """Tokens trained / tokens that left the look-ahead (trained or cropped away)."""
        kept, dropped = self.tokens_kept, self.tokens_dropped
        return kept / (kept + dropped) if kept + dropped else 1.0

    def state_dict(self) -> dict:
        state = dict(self._state)
        state["buffer"] = [list(entry) for entry in state["buffer"]]
        return state

    # ---------------------------------------------------------------- state
    def _fingerprint(self, units) -> str:
        # Enough to notice a changed corpus (more shards downloaded, different dir) on resume.
        first, last = units[0], units[-1]

        def name(u):
            return f"{u.kind}:{os.path.basename(u.path) if u.path else ''}:{u.index}"

        return f"{self.source}|{len(units)}|{name(first)}|{name(last)}"

    def _snapshot(self) -> dict:
        """The producer's position as a JSON-ready dict (made after every batch it produces)."""
        if self._pending_refs is not None:  # restored, not yet re-read: the refs as they were
            buffer = [tuple(r) for r in self._pending_refs]
        else:
            buffer = [(*ref, -neg_seq) for _, neg_seq, ref, _ in self._buffer]
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "source": self.source,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "buffer_size": self.buffer_size,
            "packing": self.packing,
            "fingerprint": self.fingerprint,
            "epoch": self._epoch,
            "unit": self._unit,
            "doc": self._doc,
            "seq": self._seq,
            "buffer": buffer,  # [unit, doc, start, seq] per entry, in buffer order
            "batches": self._batches,
            "tokens_read": self._read,
            "tokens_kept": self._kept,
            "tokens_dropped": self._dropped,
        }

    def _restore(self, state: dict) -> None:
        expect = {
            "version": STATE_VERSION,
            "split": self.split,
            "source": self.source,
            "rank": self.rank,
            "world_size": self.world_size,
            "buffer_size": self.buffer_size,
            "packing": self.packing,
            "fingerprint": self.fingerprint,
        }
        for key, value in expect.items():
            if state.get(key) != value:
                raise ValueError(
                    f"cannot resume the data loader: saved {key}={state.get(key)!r} but now "
                    f"{value!r}. Resume with the same data, split, packing and number of "
                    f"processes (or start the data from scratch)."
                )
        self._epoch, self._unit, self._doc = state["epoch"], state["unit"], state["doc"]
        self._seq, self._batches = state["seq"], state["batches"]
        self._read, self._kept = state["tokens_read"], state["tokens_kept"]
        self._dropped = state["tokens_dropped"]
        # Re-reading the buffered documents (up to buffer_size of them) is left to the first
        # produce, so that with prefetch it happens in the background thread.
        self._pending_refs = [tuple(r) for r in state["buffer"]]

    def _reread_buffer(self) -> None:
        refs, self._pending_refs = self._pending_refs, None
        tokens = {}
        for u in sorted({r[0] for r in refs}):  # each unit is loaded once
            docs = ds.load_unit(self.units[u])
            wanted = sorted({r[1] for r in refs if r[0] == u})
            for d, toks in zip(wanted, self._encode([docs[d] for d in wanted])):
                tokens[(u, d)] = toks
        for unit, doc, start, seq in refs:
            toks = tokens[(unit, doc)]
            if start:
                toks = np.concatenate(([self.bos], toks[start:])).astype(np.int32)
            self._buffer.append((len(toks), -seq, (unit, doc, start), toks))
            self._keys.append((len(toks), -seq))

    # ---------------------------------------------------------------- reading documents
    def _encode_serial(self, texts: list[str]) -> list[np.ndarray]:
        return [self.tokenizer.encode_array(t, prepend=self.bos) for t in texts]

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        n = min(self.tokenizer_threads, len(texts))
        if n <= 1:
            return self._encode_serial(texts)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.tokenizer_threads, "dataloader-tokenize")
        size = -(-len(texts) // n)  # contiguous chunks, one per thread, results kept in order
        chunks = [texts[i : i + size] for i in range(0, len(texts), size)]
        return [ids for part in self._pool.map(self._encode_serial, chunks) for ids in part]

    def _next_doc(self) -> tuple[tuple[int, int, int], np.ndarray]:
        empty_units = 0
        while True:
            if self._docs is None:
                self._docs = ds.load_unit(self.units[self._unit])
                self._tok_start, self._toks = 0, []
            if self._doc < len(self._docs):
                i = self._doc - self._tok_start
                if not 0 <= i < len(self._toks):  # tokenise the next slice in one batched call
                    self._tok_start = self._doc
                    self._toks = self._encode(
                        self._docs[self._doc : self._doc + self.tokenizer_batch_size]
                    )
                    i = 0
                ref = (self._unit, self._doc, 0)
                self._doc += 1
                return ref, self._toks[i]
            empty_units = empty_units + 1 if not self._docs else 0
            if empty_units > len(self.units):
                raise RuntimeError(
                    f"data loader rank {self.rank}: the {self.split!r} split has no documents"
                )
            self._unit, self._doc, self._docs = self._unit + 1, 0, None
            if self._unit == len(self.units):
                self._unit, self._epoch = 0, self._epoch + 1

    def _add(self, ref: tuple[int, int, int], toks: np.ndarray) -> None:
        self._seq += 1
        key = (len(toks), -self._seq)
        entry = (*key, ref, toks)
        if self.packing == "legacy":
            self._buffer.append(entry)
            self._keys.append(key)
        else:
            i = bisect_right(self._keys, key)
            self._buffer.insert(i, entry)
            self._keys.insert(i, key)

    def _fill_buffer(self) -> None:
        while len(self._buffer) < self.buffer_size:
            ref, toks = self._next_doc()
            self._read += len(toks)
            self._add(ref, toks)

    def _pop(self, i: int):
        del self._keys[i]
        return self._buffer.pop(i)

    # ---------------------------------------------------------------- packing
    def _next_piece(self, space: int) -> np.ndarray:
        """The next at most `space` tokens for a row, taken from the look-ahead."""
        self._fill_buffer()
        if self.packing == "legacy":
            # the largest buffered document that fits (ties: the older one), else the oldest one
            # cropped to the space and its tail dropped
            best, best_len = -1, 0
            for i, (length, *_) in enumerate(self._buffer):
                if best_len < length <= space:
                    best, best_len = i, length
            toks = self._pop(best if best >= 0 else 0)[3]
            self._dropped += max(0, len(toks) - space)
            self._kept += min(len(toks), space)
            return toks[:space]
        # "continue": the largest one that fits (ties: the oldest), found by bisection on the
        # sorted keys; (space, 0) sorts after every (space, -seq)
        i = bisect_right(self._keys, (space, 0)) - 1
        if i >= 0:
            length, _, (unit, doc, start), toks = self._pop(i)
            self._kept += length - (1 if start else 0)
            return toks
        # None fits: cut the longest. Long documents are cut into rows anyway, so cutting one of
        # them again splits fewer documents than cutting a short one would; the remainder goes
        # back into the look-ahead, to fill another row.
        _, _, (unit, doc, start), toks = self._pop(len(self._buffer) - 1)
        piece = toks[:space]
        self._kept += space - (1 if start else 0)
        # the remainder, toks[space:], in the document's own token coordinates (toks[0] of a
        # continuation is the <|bos|> put in front, not the document's)
        rest_start = start + space - (1 if start else 0)
        self._add(
            (unit, doc, rest_start), np.concatenate(([self.bos], toks[space:])).astype(np.int32)
        )
        return piece

    def _next_row(self, row: np.ndarray) -> None:
        """Fill `row` (seq_len + 1 tokens, the first a document's or continuation's <|bos|>).

        Each document is tokenised with <|bos|> in front, so a row that starts at a piece's start
        starts with BOS, and attention needs no mask at document boundaries."""
        used = 0
        while used < len(row):
            piece = self._next_piece(len(row) - used)
            row[used : used + len(piece)] = piece
            used += len(piece)

    def _produce(self):
        """One batch: (inputs, targets, the state after it), inputs and targets [batch_size,
        seq_len] int64 on the host (pinned for a CUDA device)."""
        if self._pending_refs is not None:
            self._reread_buffer()
        rows = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for r in range(self.batch_size):
            self._next_row(rows[r])
        inputs = torch.from_numpy(np.ascontiguousarray(rows[:, :-1]))
        targets = torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
        if self.device.type == "cuda":
            # pinned host memory lets the copy to the GPU run asynchronously
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        self._batches += 1
        return inputs, targets, self._snapshot()

    # ---------------------------------------------------------------- prefetching
    def _run_producer(self) -> None:
        try:
            while not self._stop.is_set():
                self._put(self._produce())
        except BaseException as exc:  # handed to the consumer, raised by its next_batch()
            self._put(exc)

    def _put(self, item) -> None:
        # Poll rather than block in put(): a producer blocked there is woken by the very get() that
        # frees a slot, and then takes the GIL from the caller before next_batch() has returned
        # (measured: waits of 4-9 ms instead of 0.2 on a loaded machine).
        while not self._stop.is_set():
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                self._stop.wait(0.002)

    def close(self) -> None:
        """Stop the background producer (if any). The batches it had prepared are discarded, so a
        closed loader gives no more batches: continue from state_dict() in a new one."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (inputs, targets): LongTensors [batch_size, seq_len] on the loader's device; targets
        are the inputs shifted by one."""
        if self._error is not None:
            raise self._error
        if self._stop.is_set():
            raise RuntimeError("this data loader is closed; resume from its state_dict()")
        if self.prefetch == 0:
            item = self._produce()
        else:
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.prefetch)
                self._thread = threading.Thread(
                    target=self._run_producer,
                    name=f"dataloader-{self.split}-{self.rank}",
                    daemon=True,
                )
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._error = item
                raise item
        inputs, targets, self._state = item
        if self.device.type != "cpu":
            inputs = inputs.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
        return inputs, targets

    def __iter__(self):
        while True:
            yield self.next_batch()
