"""Conversation data for mid-training and SFT: task mixtures from flags, rendering, batching.

Batches are built from rendered conversations (tokenizer.render_conversation) padded to the longest
row of the micro-batch:
    inputs  = ids[:-1]                       (padding: <|assistant_end|>, never a target)
    targets = ids[1:] where mask[1:] == 1, else -1  (-1 = ignored by the loss)
so the loss falls only on what the assistant says (and on its <|assistant_end|>).

Order and sharding (why a "slot" layout, as in base_train): each epoch is one deterministic permutation
of the mixture (seed + epoch). An optimizer step consumes world_size * grad_accum * batch_size
consecutive conversations of that stream; slot s = rank * grad_accum + micro takes the s-th block of
batch_size of them. So the rows a step trains on do not depend on how many processes run it, and the
loader's whole state is one integer cursor (identical on every rank): resuming is exact.
"""

from __future__ import annotations

import argparse
import os

import torch

from tasks.common import Task

# ------------------------------------------------------------------------------------------------
# flags and the task mixture


def add_data_args(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Data flags shared by mid_train and chat_sft (defaults overridable per stage)."""
    d = {
        "aqua_train_examples": -1,
        "aqua_val_examples": 254,
        "synthetic_examples": 5000,
        "synthetic_val_examples": 200,
        "synthetic_difficulty": "easy",
        **(defaults or {}),
    }
    g = parser.add_argument_group("data (task mixture)")
    g.add_argument(
        "--aqua-source",
        default="auto",
        choices=["auto", "hf", "dir", "synthetic", "none"],
        help="AQuA-RAT source: hf (Hugging Face deepmind/aqua_rat), dir (--aqua-data-dir or "
        "<base>/data/aqua_rat), synthetic (our offline generator instead of AQuA-RAT), none; "
        "auto = dir if --aqua-data-dir is given, hf on CUDA, synthetic on CPU",
    )
    g.add_argument(
        "--aqua-data-dir",
        default=None,
        help="local AQuA-RAT directory (prepared *.jsonl or the original train.json/dev.json/test.json)",
    )
    # both spellings on one option: the seed's scripts used underscores
    g.add_argument(
        "--aqua-train-examples",
        "--aqua_train_examples",
        dest="aqua_train_examples",
        type=int,
        default=d["aqua_train_examples"],
        help="AQuA-RAT train rationales to use (-1: all)",
    )
    g.add_argument(
        "--aqua-val-examples",
        "--aqua_val_examples",
        dest="aqua_val_examples",
        type=int,
        default=d["aqua_val_examples"],
        help="AQuA-RAT validation problems for the eval loss (-1: all)",
    )
    g.add_argument(
        "--synthetic-examples",
        type=int,
        default=d["synthetic_examples"],
        help="synthetic AQuA training problems (0: none; used whenever the AQuA source is synthetic, "
        "and added to real AQuA-RAT when --mix-synthetic is set)",
    )
    g.add_argument(
        "--synthetic-val-examples",
        type=int,
        default=d["synthetic_val_examples"],
        help="synthetic validation problems for the eval loss",
    )
    g.add_argument(
        "--synthetic-difficulty",
        default=d["synthetic_difficulty"],
        choices=["easy", "medium", "hard", "mixed"],
        help="synthetic problem difficulty",
    )
    g.add_argument(
        "--synthetic-option-checks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="synthetic rationales end by checking the options in order ('A) 4 no', 'B) 12 yes'); "
        "without, they end at the computed value and the letter must be looked up "
        "(tasks/synthetic_aqua.py)",
    )
    g.add_argument(
        "--mix-synthetic",
        action="store_true",
        help="also train on synthetic problems when the AQuA source is hf/dir",
    )
    g.add_argument(
        "--smoltalk-examples",
        type=int,
        default=0,
        help="SmolTalk conversations (Hugging Face; 0: off)",
    )
    g.add_argument(
        "--gsm8k-examples", type=int, default=0, help="GSM8K problems (Hugging Face; 0: off)"
    )
    g.add_argument(
        "--mmlu-examples",
        type=int,
        default=0,
        help="MMLU auxiliary-train problems (Hugging Face; 0: off)",
    )
    g.add_argument(
        "--arc-examples",
        type=int,
        default=0,
        help="ARC-Easy+Challenge train problems (Hugging Face; 0: off)",
    )
    g.add_argument(
        "--custom-json",
        action="append",
        default=[],
        metavar="PATH",
        help="a JSONL file of conversations to add (repeatable)",
    )
    g.add_argument(
        "--val-fraction-custom",
        type=float,
        default=0.05,
        help="fraction of each --custom-json file held out for the eval loss",
    )


def resolve_aqua_source(args, device: torch.device) -> str:
    if args.aqua_source != "auto":
        return args.aqua_source
    if args.aqua_data_dir:
        return "dir"
    if device.type == "cuda" and os.environ.get("HF_HUB_OFFLINE") != "1":
        return "hf"
    return "synthetic"


def _cap(n: int) -> int | None:
    return None if n is None or n < 0 else n


def _hf_task(what: str, flag: str, build):
    """Build an HF-backed task, turning any failure into one clear error naming the flag."""
    try:
        return build()
    except Exception as exc:
        raise SystemExit(
            f"{flag} was requested but {what} could not be loaded ({type(exc).__name__}: {exc}). "
            f"Check the network / Hugging Face access, or set {flag} 0."
        ) from exc


def build_tasks(args, split: str, device: torch.device) -> list:
    """The list of tasks for `split` ("train" or "val") from the data flags. Each task is sized and
    ready; returns [(task, label)]. Raises SystemExit with a clear message when a source fails."""
    tasks: list[tuple[Task, str]] = []
    source = resolve_aqua_source(args, device)
    aqua_split = "train" if split == "train" else "validation"
    if source in ("hf", "dir"):
        from tasks.aqua import AquaRat

        n = _cap(args.aqua_train_examples if split == "train" else args.aqua_val_examples)
        if n != 0:
            data_dir = args.aqua_data_dir if source == "dir" else None
            try:
                task = AquaRat(aqua_split, data_dir=data_dir, max_examples=n)
            except Exception as exc:
                where = (
                    f"--aqua-data-dir {data_dir}" if data_dir else "Hugging Face deepmind/aqua_rat"
                )
                raise SystemExit(
                    f"AQuA-RAT {aqua_split} split could not be loaded from {where} "
                    f"({type(exc).__name__}: {exc}). Use --aqua-source synthetic offline."
                ) from exc
            if len(task) == 0:  # every row malformed (each was named above), or an empty file
                from tasks.aqua import find_local_file

                where = (
                    find_local_file(data_dir, aqua_split)
                    if data_dir
                    else "Hugging Face deepmind/aqua_rat"
                )
                flag = "--aqua-train-examples" if split == "train" else "--aqua-val-examples"
                raise SystemExit(
                    f"AQuA-RAT {aqua_split} split in {where} has no usable rows (empty, or every "
                    f"row malformed: see the skipped rows above). Fix the file, or pass {flag} 0 "
                    f"to leave AQuA-RAT out of the {split} mixture."
                )
            tasks.append((task, f"aqua/{aqua_split} ({len(task)})"))
    if source == "synthetic" or args.mix_synthetic:
        from tasks.synthetic_aqua import SyntheticAqua

        n = args.synthetic_examples if split == "train" else args.synthetic_val_examples
        if n > 0:
            task = SyntheticAqua(
                aqua_split,
                num_examples=n,
                difficulty=args.synthetic_difficulty,
                check_options=args.synthetic_option_checks,
            )
            tasks.append(
                (task, f"synthetic_aqua/{aqua_split}/{args.synthetic_difficulty} ({len(task)})")
            )
    # Hugging Face chat tasks: off by default, and only their train splits are used for training;
    # for the eval loss a small slice of their test/val split.
    val_n = lambda n: max(1, n // 20)  # noqa: E731
    if args.smoltalk_examples > 0:
        from tasks.smoltalk import SmolTalk

        n = args.smoltalk_examples if split == "train" else val_n(args.smoltalk_examples)
        t = _hf_task(
            "SmolTalk",
            "--smoltalk-examples",
            lambda: SmolTalk(split="train" if split == "train" else "test", stop=n),
        )
        tasks.append((t, f"smoltalk ({len(t)})"))
    if args.gsm8k_examples > 0:
        from tasks.gsm8k import GSM8K

        n = args.gsm8k_examples if split == "train" else val_n(args.gsm8k_examples)
        t = _hf_task(
            "GSM8K",
            "--gsm8k-examples",
            lambda: GSM8K(subset="main", split="train" if split == "train" else "test", stop=n),
        )
        tasks.append((t, f"gsm8k ({len(t)})"))
    if args.mmlu_examples > 0:
        from tasks.mmlu import MMLU

        n = args.mmlu_examples if split == "train" else val_n(args.mmlu_examples)
        t = _hf_task(
            "MMLU",
            "--mmlu-examples",
            lambda: MMLU(
                subset="auxiliary_train" if split == "train" else "all",
                split="train" if split == "train" else "validation",
                stop=n,
            ),
        )
        tasks.append((t, f"mmlu ({len(t)})"))
    if args.arc_examples > 0:
        from tasks.arc import ARC

        n = args.arc_examples if split == "train" else val_n(args.arc_examples)
        arc_split = "train" if split == "train" else "validation"
        for sub in ("ARC-Easy", "ARC-Challenge"):
            t = _hf_task(
                f"ARC {sub}",
                "--arc-examples",
                lambda sub=sub: ARC(subset=sub, split=arc_split, stop=n // 2 or 1),
            )
            tasks.append((t, f"arc/{sub} ({len(t)})"))
    for path in args.custom_json:
        from tasks.customjson import CustomJSON

        if not os.path.isfile(path):
            raise SystemExit(f"--custom-json {path}: no such file")
        try:
            full = CustomJSON(path)
        except ValueError as exc:  # names file:line and the problem
            raise SystemExit(f"--custom-json {path}: {exc}") from exc
        n_val = int(len(full) * args.val_fraction_custom) if len(full) > 1 else 0
        t = (
            full.subset(0, len(full) - n_val)
            if split == "train"
            else full.subset(len(full) - n_val)
        )
        if len(t):
            tasks.append((t, f"custom:{os.path.basename(path)} ({len(t)})"))
    if not tasks and split == "train":
        raise SystemExit(
            "the training mixture is empty: enable a data source (e.g. --aqua-source synthetic "
            "--synthetic-examples 5000)"
        )
    return tasks


def build_mixture(args, split: str, device: torch.device, seed: int = 42):
    """(TaskMixture or None, description) for `split`."""
    from tasks.common import TaskMixture

    tasks = build_tasks(args, split, device)
    if not tasks:
        return None, "none"
    return TaskMixture([t for t, _ in tasks], seed=seed), ", ".join(label for _, label in tasks)


# ------------------------------------------------------------------------------------------------
# collation and the loader


def collate(
    rows: list[tuple[list[int], list[int]]], pad_id: int, device="cpu", pad_to: int | None = None
):
    """[(ids, mask)] -> (inputs LongTensor (B, T), targets LongTensor (B, T)) with -1 on masked/padded targets.
    T = longest row - 1, or pad_to when given (fixed shapes for torch.compile)."""
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
        mask_t = torch.tensor(mask[1:], dtype=torch.bool)
        inputs[r, :n] = ids_t[:-1]
        targets[r, :n] = torch.where(mask_t, ids_t[1:], torch.full_like(ids_t[1:], -1))
    if torch.device(device).type == "cuda":
        return inputs.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(
            device, non_blocking=True
        )
    return inputs.to(device), targets.to(device)


def bucket_lengths(seq_len: int, count: int = 4) -> list[int]:
    """The few fixed lengths a compiled model is shown (one graph each, compiled once): seq_len, and
    halvings of it down to seq_len / 2**(count-1), rounded up to a multiple of 64 (kernel-friendly)."""
    buckets = {seq_len}
    for k in range(1, count):
        buckets.add(min(seq_len, -(-max(1, seq_len >> k) // 64) * 64))
    return sorted(buckets)


class ConversationLoader:
    """Micro-batches of rendered conversations for one slot layout (see the module docstring).

    next_step() -> list of grad_accum (inputs, targets) micro-batches for THIS rank's slots; the state
    is {"cursor": conversations consumed globally, "epoch": ...}. With fixed_shapes (torch.compile)
    every micro-batch is padded to the smallest of bucket_lengths(seq_len) that holds its longest row,
    not to seq_len: AQuA conversations are a few hundred tokens, a 2048 context would be mostly padding.
    padded_tokens / real_tokens count what this rank's micro-batches held.
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


def answer_letter_ids(tokenizer, letters="ABCDE") -> dict[int, str] | None:
    """{token id: letter} for " A".." E" when each is one token (how "Answer: C" ends), else None."""
    ids = {}
    for letter in letters:
        enc = tokenizer.encode(" " + letter)
        if len(enc) != 1:
            return None
        ids[enc[0]] = letter
    return ids


def letter_hits(
    logits: torch.Tensor, targets: torch.Tensor, letter_pos, letter_vocab: torch.Tensor
) -> torch.Tensor:
    """For each (row, t, _) of letter_pos (from iter_eval_batches): is the gold letter targets[row, t] the
    most likely of the letter tokens letter_vocab at logits[row, t]? (the teacher-forced letter accuracy)"""
    rows = torch.tensor([r for r, _, _ in letter_pos], dtype=torch.long, device=logits.device)
    cols = torch.tensor([t for _, t, _ in letter_pos], dtype=torch.long, device=logits.device)
    return letter_vocab[logits[rows, cols][:, letter_vocab].argmax(-1)] == targets[rows, cols]


def iter_eval_batches(
    task,
    tokenizer,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    max_examples: int | None = None,
    device="cpu",
):
    """(inputs, targets, letter_positions) micro-batches over the first max_examples conversations of
    `task`, this rank's share (rank::world). letter_positions: [(row, t, task name)] where targets[row, t]
    is the answer letter of a multiple-choice conversation (its last token before <|assistant_end|>),
    used for the teacher-forced letter accuracy."""
    n = len(task) if max_examples is None or max_examples < 0 else min(len(task), max_examples)
    mine = list(range(rank, n, world_size))
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    letter_ids = answer_letter_ids(tokenizer)
    for i in range(0, len(mine), batch_size):
        rows, letter_pos = [], []
        for j in mine[i : i + batch_size]:
            conv = task[j]
            ids, mask = tokenizer.render_conversation(conv, max_tokens=seq_len + 1)
            if (
                letter_ids
                and conv.get("answer")
                and len(ids) >= 3
                and ids[-1] == pad_id
                and letter_ids.get(ids[-2]) == conv["answer"]
            ):
                letter_pos.append(
                    (len(rows), len(ids) - 3, conv.get("task", task.name))
                )  # targets shift by one
            rows.append((ids, mask))
        x, y = collate(rows, pad_id, device)
        yield x, y, letter_pos
