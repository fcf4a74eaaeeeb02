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
import random
import re

import torch

from tasks.common import Task



# ------------------------------------------------------------------------------------------------
# flags and the task mixture


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_data_args(parser: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """Data flags shared by mid_train and chat_sft (defaults overridable per stage)."""
    d = {"aqua_train_examples": -1, "aqua_val_examples": 254, "synthetic_examples": 5000,
         "synthetic_val_examples": 200, "synthetic_difficulty": "easy", **(defaults or {})}
    g = parser.add_argument_group("data (task mixture)")
    g.add_argument("--aqua-source", default="auto", choices=["auto", "hf", "dir", "synthetic", "none"],
                   help="AQuA-RAT source: hf (Hugging Face deepmind/aqua_rat), dir (--aqua-data-dir or "
                        "<base>/data/aqua_rat), synthetic (our offline generator instead of AQuA-RAT), none; "
                        "auto = dir if --aqua-data-dir is given, hf on CUDA, synthetic on CPU")
    g.add_argument("--aqua-data-dir", default=None,
                   help="local AQuA-RAT directory (prepared *.jsonl or the original train.json/dev.json/test.json)")
    # both spellings on one option: the seed's scripts used underscores
    g.add_argument("--aqua-train-examples", "--aqua_train_examples", dest="aqua_train_examples", type=int,
                   default=d["aqua_train_examples"], help="AQuA-RAT train rationales to use (-1: all)")
    g.add_argument("--aqua-val-examples", "--aqua_val_examples", dest="aqua_val_examples", type=int,
                   default=d["aqua_val_examples"], help="AQuA-RAT validation problems for the eval loss (-1: all)")
    g.add_argument("--synthetic-examples", type=int, default=d["synthetic_examples"],
                   help="synthetic AQuA training problems (0: none; used whenever the AQuA source is synthetic, "
                        "and added to real AQuA-RAT when --mix-synthetic is set)")
    g.add_argument("--synthetic-val-examples", type=int, default=d["synthetic_val_examples"],
                   help="synthetic validation problems for the eval loss")
    g.add_argument("--synthetic-difficulty", default=d["synthetic_difficulty"],
                   choices=["easy", "medium", "hard", "mixed"], help="synthetic problem difficulty")
    g.add_argument("--mix-synthetic", action="store_true",
                   help="also train on synthetic problems when the AQuA source is hf/dir")
    g.add_argument("--lookup-examples", type=int, default=d.get("lookup_examples", 0),
                   help="option-lookup drills (find the option holding a given value, answer 'Answer: X') built "
                        "from the AQuA/synthetic training options; teaches the answer line's lookup (0: off)")
    g.add_argument("--lookup-turns", type=_at_least_one, default=d.get("lookup_turns", 1),
                   help="lookups per drill conversation: follow-up questions about the same options block "
                        "(more lookup targets per token)")
    g.add_argument("--lookup-style", choices=LOOKUP_STYLES, nargs="+", default=["value-first"],
                   help="how a drill names its value: value-first (the question, then the options block), "
                        "options-first (the block, then the question), model-picks (the block only; the "
                        "assistant states a value of its choice, then its letter, as a problem's answer line); "
                        "several styles share --lookup-examples evenly")
    g.add_argument("--smoltalk-examples", type=int, default=0, help="SmolTalk conversations (Hugging Face; 0: off)")
    g.add_argument("--gsm8k-examples", type=int, default=0, help="GSM8K problems (Hugging Face; 0: off)")
    g.add_argument("--mmlu-examples", type=int, default=0, help="MMLU auxiliary-train problems (Hugging Face; 0: off)")
    g.add_argument("--arc-examples", type=int, default=0, help="ARC-Easy+Challenge train problems (Hugging Face; 0: off)")
    g.add_argument("--custom-json", action="append", default=[], metavar="PATH",
                   help="a JSONL file of conversations to add (repeatable)")
    g.add_argument("--val-fraction-custom", type=float, default=0.05,
                   help="fraction of each --custom-json file held out for the eval loss")


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
        raise SystemExit(f"{flag} was requested but {what} could not be loaded ({type(exc).__name__}: {exc}). "
                         f"Check the network / Hugging Face access, or set {flag} 0.") from exc


def build_tasks(args, split: str, device: torch.device) -> list:
    """The list of tasks for `split` ("train" or "val") from the data flags. Each task is sized and
    ready; returns [(task, label)]. Raises SystemExit with a clear message when a source fails."""
    tasks: list[tuple[Task, str]] = []
    source = resolve_aqua_source(args, device)
    aqua_split = "train" if split == "train" else "validation"
    drill_source = None  # an MC task whose options feed the option-lookup drills (same split)
    if source in ("hf", "dir"):
        from tasks.aqua import AquaRat
        n = _cap(args.aqua_train_examples if split == "train" else args.aqua_val_examples)
        if n != 0 or args.lookup_examples > 0:
            data_dir = args.aqua_data_dir if source == "dir" else None
            try:
                task = AquaRat(aqua_split, data_dir=data_dir, max_examples=n if n != 0 else DRILL_SOURCE_SIZE)
            except Exception as exc:
                where = f"--aqua-data-dir {data_dir}" if data_dir else "Hugging Face deepmind/aqua_rat"
                raise SystemExit(f"AQuA-RAT {aqua_split} split could not be loaded from {where} "
                                 f"({type(exc).__name__}: {exc}). Use --aqua-source synthetic offline.") from exc
            drill_source = task
            if n != 0:
                tasks.append((task, f"aqua/{aqua_split} ({len(task)})"))
    if source == "synthetic" or args.mix_synthetic:
        from tasks.synthetic_aqua import SyntheticAqua
        n = args.synthetic_examples if split == "train" else args.synthetic_val_examples
        if n > 0:
            task = SyntheticAqua(aqua_split, num_examples=n, difficulty=args.synthetic_difficulty)
            tasks.append((task, f"synthetic_aqua/{aqua_split}/{args.synthetic_difficulty} ({len(task)})"))
        if drill_source is None and args.lookup_examples > 0:
            drill_source = SyntheticAqua(aqua_split, num_examples=max(n, DRILL_SOURCE_SIZE),
                                         difficulty=args.synthetic_difficulty)
    if args.lookup_examples > 0:
        if drill_source is None:
            raise SystemExit("--lookup-examples needs multiple-choice problems to draw options from: "
                             "use --aqua-source hf|dir|synthetic (not none)")
        # drills over options of the same split: no test options leak into training
        total = args.lookup_examples if split == "train" else min(200, max(1, args.lookup_examples // 20))
        for k, style in enumerate(args.lookup_style):
            n = total // len(args.lookup_style) + (k < total % len(args.lookup_style))
            task = OptionLookup(drill_source, num_examples=n, seed=10 * k + (0 if split == "train" else 1),
                                turns=args.lookup_turns, style=style)
            tasks.append((task, f"option_lookup/{style} ({len(task)})"))
    # Hugging Face chat tasks: off by default, and only their train splits are used for training;
    # for the eval loss a small slice of their test/val split.
    val_n = lambda n: max(1, n // 20)  # noqa: E731
    if args.smoltalk_examples > 0:
        from tasks.smoltalk import SmolTalk
        n = args.smoltalk_examples if split == "train" else val_n(args.smoltalk_examples)
        t = _hf_task("SmolTalk", "--smoltalk-examples",
                     lambda: SmolTalk(split="train" if split == "train" else "test", stop=n))
        tasks.append((t, f"smoltalk ({len(t)})"))
    if args.gsm8k_examples > 0:
        from tasks.gsm8k import GSM8K
        n = args.gsm8k_examples if split == "train" else val_n(args.gsm8k_examples)
        t = _hf_task("GSM8K", "--gsm8k-examples",
                     lambda: GSM8K(subset="main", split="train" if split == "train" else "test", stop=n))
        tasks.append((t, f"gsm8k ({len(t)})"))
    if args.mmlu_examples > 0:
        from tasks.mmlu import MMLU
        n = args.mmlu_examples if split == "train" else val_n(args.mmlu_examples)
        t = _hf_task("MMLU", "--mmlu-examples",
                     lambda: MMLU(subset="auxiliary_train" if split == "train" else "all",
                                  split="train" if split == "train" else "validation", stop=n))
        tasks.append((t, f"mmlu ({len(t)})"))
    if args.arc_examples > 0:
        from tasks.arc import ARC
        n = args.arc_examples if split == "train" else val_n(args.arc_examples)
        arc_split = "train" if split == "train" else "validation"
        for sub in ("ARC-Easy", "ARC-Challenge"):
            t = _hf_task(f"ARC {sub}", "--arc-examples", lambda sub=sub: ARC(subset=sub, split=arc_split, stop=n // 2 or 1))
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
        t = full.subset(0, len(full) - n_val) if split == "train" else full.subset(len(full) - n_val)
        if len(t):
            tasks.append((t, f"custom:{os.path.basename(path)} ({len(t)})"))
    if not tasks and split == "train":
        raise SystemExit("the training mixture is empty: enable a data source (e.g. --aqua-source synthetic "
                         "--synthetic-examples 5000)")
    return tasks


LOOKUP_STYLES = ("value-first", "options-first", "model-picks")
DRILL_SOURCE_SIZE = 2000  # problems whose options feed the drills when the problems themselves are not trained on
_NUMBER = re.compile(r"\d+(?:\.\d+)?(?:/\d+)?")


class OptionLookup(Task):
    """Drill for the last step of a multiple-choice answer: name the letter of the option holding a value.

    Built from the options of a source MC task (AquaRat or SyntheticAqua items, their own split), with
    the options block formatted exactly as in the AQuA prompt. Three styles:
        value-first    user: "Which option is 90?" then the block;  assistant: "The value is 90.\nAnswer: C"
        options-first  user: the block, then "Which option is 90?"; assistant: the same
        model-picks    user: the block, then "Pick one of the options: give its value, then its letter.";
                       assistant: the same, for an option drawn at random
    Like nanochat's spelling drills, it isolates one skill the full task needs, with one lookup target in
    every ~40 tokens instead of one per whole problem: a tiny model learns the arithmetic of the
    rationales long before it finds the option holding its result. Only model-picks teaches the lookup a
    problem needs: in a problem the value exists only in the assistant's own text, after the options.
    When the user names the value, the model can do the lookup at the user's words (or, value-first,
    mark the option while reading the block) -- drills learned to 0.98 that way left the letter after a
    worked rationale at chance (README, "What the CPU profile shows"). With turns > 1 the user follows up
    about the same block, so one conversation carries several lookups (the last one is the item's
    "answer"). Options whose number is ambiguous (two options with the same number) are never used.
    """

    name = "option_lookup"
    eval_type = "generative"

    def __init__(self, source: Task, num_examples: int, seed: int = 0, turns: int = 1,
                 style: str = "value-first", min_options: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if len(source) == 0:
            raise ValueError("OptionLookup: the source task is empty")
        if turns < 1:
            raise ValueError(f"OptionLookup: turns must be >= 1, got {turns}")
        if style not in LOOKUP_STYLES:
            raise ValueError(f"OptionLookup: style must be one of {LOOKUP_STYLES}, got {style!r}")
        if min_options is not None and min_options < 2:
            raise ValueError(f"OptionLookup: min_options must be >= 2, got {min_options}")
        self.source, self.n, self.seed, self.turns, self.style = source, int(num_examples), seed, int(turns), style
        self.min_options = min_options  # show a random min_options..all of them (an easier curriculum)

    def num_examples(self) -> int:
        return self.n

    def get_example(self, index: int) -> dict:
        rng = random.Random(f"option_lookup/{self.seed}/{index}")
        for _ in range(100):
            item = self.source[rng.randrange(len(self.source))]
            options, letters = item.get("options"), item.get("letters")
            if not options or not letters:
                raise ValueError(f"OptionLookup: an item of {self.source.name} has no 'options'/'letters'")
            values = [o.split(")", 1)[1].strip() for o in options]
            numbers = [(m.group(0) if (m := _NUMBER.search(v)) else v) for v in values]
            unique = [k for k in range(len(values)) if numbers.count(numbers[k]) == 1]
            if unique:
                break
        # drawn WITH replacement: asking each option once would let the last answer be found by elimination
        asked = [rng.choice(unique) for _ in range(self.turns)]
        if self.min_options is not None and self.min_options < len(values):
            shown = set(asked)
            others = [k for k in range(len(values)) if k not in shown]
            count = max(len(shown), rng.randint(self.min_options, len(values)))
            shown |= set(rng.sample(others, count - len(shown)))
            keep = sorted(shown)  # in their original order, relettered A, B, ...
            asked = [keep.index(k) for k in asked]
            values, numbers = [values[k] for k in keep], [numbers[k] for k in keep]
            options = [f"{l}) {v}" for l, v in zip(letters, values)]
            letters = letters[:len(keep)]
        opts = "\n".join(f"{l}) {v}" for l, v in zip(letters, values))
        messages = []
        for t, k in enumerate(asked):
            if self.style == "model-picks":
                question = "Pick one of the options: give its value, then its letter." if t == 0 else "Pick one again."
            else:
                question = f"Which option is {numbers[k]}?"
            content = question
            if t == 0:
                content = f"{question}\n\n{opts}" if self.style == "value-first" else f"{opts}\n\n{question}"
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": f"The value is {numbers[k]}.\nAnswer: {letters[k]}"})
        return {"messages": messages, "letters": list(letters), "answer": letters[asked[-1]],
                "options": list(options), "task": self.name}

    def evaluate(self, conversation: dict, completion: str) -> int:
        from tasks.aqua import extract_letter
        return int(extract_letter(completion) == conversation["answer"])


def build_mixture(args, split: str, device: torch.device, seed: int = 42):
    """(TaskMixture or None, description) for `split`."""
    from tasks.common import TaskMixture

    tasks = build_tasks(args, split, device)
    if not tasks:
        return None, "none"
    return TaskMixture([t for t, _ in tasks], seed=seed), ", ".join(label for _, label in tasks)


# ------------------------------------------------------------------------------------------------
# collation and the loader


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int, device="cpu", pad_to: int | None = None):
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
        return inputs.pin_memory().to(device, non_blocking=True), targets.pin_memory().to(device, non_blocking=True)
    return inputs.to(device), targets.to(device)


class ConversationLoader:
    """Micro-batches of rendered conversations for one slot layout (see the module docstring).

    next_step() -> list of grad_accum (inputs, targets) micro-batches for THIS rank's slots; the state
    is {"cursor": conversations consumed globally, "epoch": ...}.
    """

    def __init__(self, task, tokenizer, batch_size: int, seq_len: int, grad_accum: int = 1, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device="cpu", state: dict | None = None,
                 pad_to_seq_len: bool = False):
        if len(task) == 0:
            raise ValueError("ConversationLoader: the task has no examples")
        self.task, self.tokenizer = task, tokenizer
        self.batch_size, self.seq_len, self.grad_accum = batch_size, seq_len, grad_accum
        self.rank, self.world_size, self.seed, self.device = rank, world_size, seed, device
        self.pad_to = seq_len if pad_to_seq_len else None
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
            ids, mask = ids[:self.seq_len + 1], mask[:self.seq_len + 1]
        return ids, mask

    def next_step(self):
        batches = []
        for micro in range(self.grad_accum):
            slot = self.rank * self.grad_accum + micro
            start = self.cursor + slot * self.batch_size
            rows = [self.render(self.task[self._index(g)]) for g in range(start, start + self.batch_size)]
            batches.append(collate(rows, self.pad_id, self.device, self.pad_to))
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


def letter_hits(logits: torch.Tensor, targets: torch.Tensor, letter_pos, letter_vocab: torch.Tensor) -> torch.Tensor:
    """For each (row, t, _) of letter_pos (from iter_eval_batches): is the gold letter targets[row, t] the
    most likely of the letter tokens letter_vocab at logits[row, t]? (the teacher-forced letter accuracy)"""
    rows = torch.tensor([r for r, _, _ in letter_pos], dtype=torch.long, device=logits.device)
    cols = torch.tensor([t for _, t, _ in letter_pos], dtype=torch.long, device=logits.device)
    return letter_vocab[logits[rows, cols][:, letter_vocab].argmax(-1)] == targets[rows, cols]


def iter_eval_batches(task, tokenizer, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                      max_examples: int | None = None, device="cpu"):
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
        for j in mine[i:i + batch_size]:
            conv = task[j]
            ids, mask = tokenizer.render_conversation(conv, max_tokens=seq_len + 1)
            if (letter_ids and conv.get("answer") and len(ids) >= 3 and ids[-1] == pad_id
                    and letter_ids.get(ids[-2]) == conv["answer"]):
                letter_pos.append((len(rows), len(ids) - 3, conv.get("task", task.name)))  # targets shift by one
            rows.append((ids, mask))
        x, y = collate(rows, pad_id, device)
        yield x, y, letter_pos
