"""The task mixture of mid-training and SFT: its command-line flags, and the tasks they select."""

from __future__ import annotations

import argparse
import os

import torch

from tasks.common import Task, TaskMixture


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
        help="local AQuA-RAT directory (prepared *.jsonl, or the original "
        "train.json/dev.json/test.json)",
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
        help="synthetic AQuA training problems (0: none; used whenever the AQuA source is "
        "synthetic, and added to real AQuA-RAT when --mix-synthetic is set)",
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


def _aqua_task(args, split: str, source: str) -> list[tuple[Task, str]]:
    from tasks.aqua import AquaRat, find_local_file

    aqua_split = "train" if split == "train" else "validation"
    wanted = args.aqua_train_examples if split == "train" else args.aqua_val_examples
    if wanted == 0:
        return []
    data_dir = args.aqua_data_dir if source == "dir" else None
    where = f"--aqua-data-dir {data_dir}" if data_dir else "Hugging Face deepmind/aqua_rat"
    try:
        task = AquaRat(aqua_split, data_dir=data_dir, max_examples=None if wanted < 0 else wanted)
    except Exception as exc:
        raise SystemExit(
            f"AQuA-RAT {aqua_split} split could not be loaded from {where} "
            f"({type(exc).__name__}: {exc}). Use --aqua-source synthetic offline."
        ) from exc
    if len(task) == 0:  # every row malformed (AquaRat named each one), or an empty file
        flag = "--aqua-train-examples" if split == "train" else "--aqua-val-examples"
        where = find_local_file(data_dir, aqua_split) if data_dir else where
        raise SystemExit(
            f"AQuA-RAT {aqua_split} split in {where} has no usable rows (empty, or every "
            f"row malformed: see the skipped rows above). Fix the file, or pass {flag} 0 "
            f"to leave AQuA-RAT out of the {split} mixture."
        )
    return [(task, f"aqua/{aqua_split} ({len(task)})")]


def _synthetic_task(args, split: str) -> list[tuple[Task, str]]:
    from tasks.synthetic_aqua import SyntheticAqua

    n = args.synthetic_examples if split == "train" else args.synthetic_val_examples
    if n <= 0:
        return []
    aqua_split = "train" if split == "train" else "validation"
    task = SyntheticAqua(
        aqua_split,
        num_examples=n,
        difficulty=args.synthetic_difficulty,
        check_options=args.synthetic_option_checks,
    )
    return [(task, f"synthetic_aqua/{aqua_split}/{args.synthetic_difficulty} ({len(task)})")]


HUB_NAMES = {"smoltalk": "SmolTalk", "gsm8k": "GSM8K", "mmlu": "MMLU", "arc": "ARC"}


def _hub_tasks(args, split: str) -> list[tuple[Task, str]]:
    """SmolTalk, GSM8K, MMLU and ARC: off by default. Training uses their train splits; the eval
    loss a twentieth as many problems of a held-out split."""
    train = split == "train"
    wanted = {
        "smoltalk": args.smoltalk_examples,
        "gsm8k": args.gsm8k_examples,
        "mmlu": args.mmlu_examples,
        "arc": args.arc_examples,
    }
    tasks = []
    for name, n in wanted.items():
        if n <= 0:
            continue
        n = n if train else max(1, n // 20)
        flag = f"--{name}-examples"
        try:  # one clear line for any failure: these come from the network
            tasks += _load_hub_task(name, train, n)
        except Exception as exc:
            raise SystemExit(
                f"{flag} was requested but {HUB_NAMES[name]} could not be loaded "
                f"({type(exc).__name__}: "
                f"{exc}). Check the network / Hugging Face access, or set {flag} 0."
            ) from exc
    return tasks


def _load_hub_task(name: str, train: bool, n: int) -> list[tuple[Task, str]]:
    if name == "smoltalk":
        from tasks.smoltalk import SmolTalk

        task = SmolTalk(split="train" if train else "test", stop=n)
        return [(task, f"smoltalk ({len(task)})")]
    if name == "gsm8k":
        from tasks.gsm8k import GSM8K

        task = GSM8K(subset="main", split="train" if train else "test", stop=n)
        return [(task, f"gsm8k ({len(task)})")]
    if name == "mmlu":
        from tasks.mmlu import MMLU

        subset, split = ("auxiliary_train", "train") if train else ("all", "validation")
        task = MMLU(subset=subset, split=split, stop=n)
        return [(task, f"mmlu ({len(task)})")]
    from tasks.arc import ARC

    subsets = ("ARC-Easy", "ARC-Challenge")  # half of the problems from each
    arc = [
        ARC(subset=s, split="train" if train else "validation", stop=n // 2 or 1) for s in subsets
    ]
    return [(task, f"arc/{s} ({len(task)})") for s, task in zip(subsets, arc)]


def _custom_tasks(args, split: str) -> list[tuple[Task, str]]:
    """Each --custom-json file: its last --val-fraction-custom of conversations are held out."""
    from tasks.customjson import CustomJSON

    tasks = []
    for path in args.custom_json:
        if not os.path.isfile(path):
            raise SystemExit(f"--custom-json {path}: no such file")
        try:
            full = CustomJSON(path)
        except ValueError as exc:  # names file:line and the problem
            raise SystemExit(f"--custom-json {path}: {exc}") from exc
        n_val = int(len(full) * args.val_fraction_custom) if len(full) > 1 else 0
        cut = len(full) - n_val
        task = full.subset(0, cut) if split == "train" else full.subset(cut)
        if len(task):
            tasks.append((task, f"custom:{os.path.basename(path)} ({len(task)})"))
    return tasks


def build_tasks(args, split: str, device: torch.device) -> list[tuple[Task, str]]:
    """[(task, label)] for `split` ("train" or "val") from the data flags. A source that fails, or
    an empty training mixture, stops the stage with one line that says what to change."""
    source = resolve_aqua_source(args, device)
    tasks = _aqua_task(args, split, source) if source in ("hf", "dir") else []
    if source == "synthetic" or args.mix_synthetic:
        tasks += _synthetic_task(args, split)
    tasks += _hub_tasks(args, split) + _custom_tasks(args, split)
    if not tasks and split == "train":
        raise SystemExit(
            "the training mixture is empty: enable a data source (e.g. --aqua-source synthetic "
            "--synthetic-examples 5000)"
        )
    return tasks


def build_mixture(args, split: str, device: torch.device, seed: int = 42):
    """(TaskMixture or None, description) for `split`."""
    tasks = build_tasks(args, split, device)
    if not tasks:
        return None, "none"
    return TaskMixture([t for t, _ in tasks], seed=seed), ", ".join(label for _, label in tasks)
