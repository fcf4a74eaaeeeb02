"""Evaluate a chat checkpoint on AQuA-RAT (and the synthetic AQuA set): generative and categorical.

    uv run python -m scripts.chat_eval -i sft -a AQUA                         # AQuA-RAT test split
    uv run python -m scripts.chat_eval -i sft -a SYNTH --max-problems 200  # synthetic, offline
    uv run python -m scripts.chat_eval -i rl -a AQUA,SYNTH --num-samples 8 --temperature 1  # pass@8
    uv run torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i sft -a AQUA

Two ways to score each multiple-choice problem (nanochat/mc_eval.py, shared with chat_rl):
- generative: decode a rationale from the prompt, then extract_letter(completion, options). Greedy
  accuracy always; with --num-samples k > 1 also pass@k over k samples at --temperature (a problem
  counts if ANY sample names the gold letter) and the mean per-sample accuracy.
- categorical: no rationale. The assistant turn is primed with "Answer:" right after the prompt and
  the five continuations " A" .. " E" are compared (their logits when each is one token, else their
  summed log-probs), --batch-prompts problems per forward. It measures what the model "believes"
  without reasoning, the quantity whose letter distribution the RL diagnostics track.

For both: a confusion matrix (gold x predicted, "none" when no letter is found), the predicted
letter distribution, the recall of each gold letter (accuracy on the problems whose gold letter it
is) with the population std of those recalls, and two baselines of the split: chance (20%) and
always answering its most frequent gold letter. Each rank takes problems rank::world_size; counts
are summed over ranks.

Output: <base>/runs/<run>/chat_eval.jsonl, one line per (task, mode), e.g.
  {"source": "sft", "task": "aqua", "split": "test", "mode": "generative", "acc": 0.31, ...}
(task "synthetic_aqua" for SYNTH), and the report section chat_eval_<source>. The generative line
also lists the greedy result of every problem ("per_problem", 1 = right), which
scripts/compare_evals.py pairs across checkpoints (paired counts and an exact sign test).
"""

from __future__ import annotations

import argparse
import json
import time

from nanochat.checkpoint import load_model
from nanochat.common import cleanup_distributed, init_distributed, print0
from nanochat.engine import Engine
from nanochat.files import get_base_dir
from nanochat.mc_eval import (
    LetterScorer,
    categorical_eval,
    generative_eval,
    letter_recall,
    recall_std,
)
from nanochat.report import write_section
from nanochat.tracking import add_tracking_args, make_tracker
from tasks.aqua import AQUA_LETTERS

LETTERS = AQUA_LETTERS
PRED_LABELS = LETTERS + ("none",)
TASK_NAMES = {"AQUA": "aqua", "SYNTH": "synthetic_aqua"}
SPLIT_ALIASES = {"val": "validation", "dev": "validation"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate a chat checkpoint on AQuA-style multiple choice "
        "(see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "-i",
        "--source",
        required=True,
        choices=["base", "mid", "sft", "rl"],
        help="checkpoint stage",
    )
    p.add_argument("--model-tag", default=None, help="checkpoint tag (default: the stage's latest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument(
        "-a",
        "--tasks",
        default="AQUA",
        help="comma-separated: AQUA (AQuA-RAT), SYNTH (synthetic AQuA)",
    )
    p.add_argument("--split", default="test", choices=["train", "validation", "val", "dev", "test"])
    p.add_argument(
        "--max-problems", type=int, default=-1, help="evaluate the first N problems (-1: all)"
    )
    p.add_argument(
        "--modes", default="generative,categorical", help="comma-separated: generative, categorical"
    )
    p.add_argument(
        "--aqua-data-dir",
        default=None,
        help="local AQuA-RAT directory (default: <base>/data/aqua_rat if prepared, else "
        "Hugging Face)",
    )
    p.add_argument(
        "--synthetic-examples",
        type=int,
        default=500,
        help="size of the synthetic split to draw from",
    )
    p.add_argument(
        "--synthetic-difficulty", default="easy", choices=["easy", "medium", "hard", "mixed"]
    )
    p.add_argument("--num-samples", type=int, default=1, help="k for pass@k (1: greedy only)")
    p.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature for the k samples"
    )
    p.add_argument("--top-k", type=int, default=None, help="top-k for the k samples")
    p.add_argument(
        "--max-tokens", type=int, default=256, help="max tokens of each generated rationale"
    )
    p.add_argument(
        "--batch-prompts", type=int, default=32, help="problems whose completions decode together"
    )
    p.add_argument("--seed", type=int, default=0, help="sampling seed (problem i uses seed + i)")
    p.add_argument("--show", type=int, default=2, help="print this many greedy completions")
    add_tracking_args(p)
    args = p.parse_args(argv)
    args.split = SPLIT_ALIASES.get(args.split, args.split)
    args.task_list = [t.strip().upper() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in args.task_list if t not in TASK_NAMES]
    if bad or not args.task_list:
        p.error(f"-a: unknown task(s) {bad}; choose from {sorted(TASK_NAMES)}")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.mode_list) <= {"generative", "categorical"} or not args.mode_list:
        p.error(f"--modes: use generative and/or categorical, got {args.modes!r}")
    if args.num_samples < 1 or args.batch_prompts < 1:
        p.error("--num-samples and --batch-prompts must be >= 1")
    return args


def load_task(name: str, args):
    if name == "AQUA":
        from tasks.aqua import AquaRat

        n = None if args.max_problems < 0 else args.max_problems
        try:
            return AquaRat(args.split, data_dir=args.aqua_data_dir, max_examples=n)
        except Exception as exc:
            raise SystemExit(
                f"AQuA-RAT {args.split} could not be loaded ({type(exc).__name__}: {exc}). "
                f"Pass --aqua-data-dir, or evaluate the synthetic set with -a SYNTH."
            ) from exc
    from tasks.synthetic_aqua import SyntheticAqua

    n = (
        args.synthetic_examples
        if args.max_problems < 0
        else min(args.max_problems, args.synthetic_examples)
    )
    return SyntheticAqua(args.split, num_examples=n, difficulty=args.synthetic_difficulty)


def confusion(gold: list[int], pred: list[int]) -> list[list[int]]:
    """5 x 6 counts: gold letter (rows A-E) x predicted letter (columns A-E, none)."""
    counts = [[0] * len(PRED_LABELS) for _ in LETTERS]
    for g, p in zip(gold, pred):
        counts[g][p] += 1
    return counts


def result_row(args, task, mode: str, gold: list[int], pred: list[int]) -> dict:
    """The JSONL line of one (task, mode): accuracy, baselines, letter counts and confusion."""
    total = len(gold)
    counts = confusion(gold, pred)
    correct = sum(counts[j][j] for j in range(len(LETTERS)))
    golds = {letter: sum(row) for letter, row in zip(LETTERS, counts)}
    top_letter = max(LETTERS, key=lambda letter: golds[letter])
    recall = letter_recall(gold, pred)
    return {
        "source": args.source,
        "task": task.name,
        "split": args.split,
        "mode": mode,
        "acc": correct / max(total, 1),
        "n": total,
        "correct": correct,
        "chance": 0.2,
        "most_frequent_letter": top_letter,
        "most_frequent_acc": golds[top_letter] / max(total, 1),
        "gold_counts": golds,
        "pred_counts": {lab: sum(row[c] for row in counts) for c, lab in enumerate(PRED_LABELS)},
        "confusion": {
            g: {lab: v for lab, v in zip(PRED_LABELS, row)} for g, row in zip(LETTERS, counts)
        },
        # accuracy per gold letter (letters with no problem left out) and the population std of
        # those recalls: a model that favours some letters has a large one at any accuracy
        "letter_recall": recall,
        "letter_recall_std": recall_std(recall),
    }


def evaluate_task(name: str, task, model, tokenizer, args) -> list[dict]:
    """One row per mode in --modes (see the module docstring), over all ranks."""
    n = len(task)
    rows = []
    for mode in args.mode_list:
        if mode == "generative":
            res = generative_eval(
                Engine(model, tokenizer),
                tokenizer,
                task,
                n,
                args.max_tokens,
                args.batch_prompts,
                args.num_samples,
                args.temperature,
                args.top_k,
                args.seed,
                progress=f"{name} generative",
            )
            for i in sorted(res.texts)[: args.show]:
                pred = PRED_LABELS[res.greedy[i]]
                print0(f"--- {name} #{i} gold {LETTERS[res.gold[i]]} greedy-pred {pred}")
                print0(res.texts[i].strip() + "\n")
            row = result_row(args, task, mode, res.gold, res.greedy)
            row["greedy"] = True
            # 1 = problem i answered right: compare_evals pairs these across checkpoints
            row["per_problem"] = [int(g == p) for g, p in zip(res.gold, res.greedy)]
            row["mean_completion_tokens"] = sum(res.greedy_tokens) / max(n, 1)
            if args.num_samples > 1:
                row["k"] = args.num_samples
                row["temperature"] = args.temperature
                row[f"pass@{args.num_samples}"] = res.pass_at_k
                row["sample_acc"] = res.sample_acc
        else:
            gold, chosen = categorical_eval(
                model, tokenizer, task, n, args.batch_prompts, progress=f"{name} categorical"
            )
            row = result_row(args, task, mode, gold, chosen)
            single = LetterScorer(tokenizer).single
            row["scoring"] = "single-token logits" if single else "summed continuation log-probs"
        rows.append(row)
    return rows


def confusion_markdown(row: dict) -> list[str]:
    lines = [
        "| gold \\ pred | " + " | ".join(PRED_LABELS) + " |",
        "|---" * (len(PRED_LABELS) + 1) + "|",
    ]
    for g in LETTERS:
        lines.append(
            f"| {g} | " + " | ".join(str(row["confusion"][g][p]) for p in PRED_LABELS) + " |"
        )
    return lines


def pass_at_k(row: dict) -> float | None:
    """The generative row's pass@k, None on a greedy-only or categorical row."""
    return row[f"pass@{row['k']}"] if "k" in row else None


def print_row(row: dict) -> None:
    pass_k = f", pass@{row['k']} {pass_at_k(row):.3f}" if "k" in row else ""
    print0(
        f"{row['task']} {row['split']} {row['mode']}: acc {row['acc']:.3f} "
        f"({row['correct']}/{row['n']}){pass_k} | chance 0.200 | "
        f"always-{row['most_frequent_letter']} {row['most_frequent_acc']:.3f} | "
        f"predicted {row['pred_counts']}"
    )
    recall = " ".join(f"{letter} {r:.3f}" for letter, r in row["letter_recall"].items())
    print0(f"  recall per gold letter: {recall} (std {row['letter_recall_std']:.3f})")


def report_markdown(args, tag: str, step, rows: list[dict]) -> str:
    md = [
        f"## Chat evaluation of {args.source} ({tag}, step {step})",
        "",
        "| task | split | mode | acc | n | chance | always-most-frequent | pass@k |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        pass_k = ""
        if "k" in row:
            pass_k = f"{pass_at_k(row):.3f} (k={row['k']}, T={row['temperature']})"
        md.append(
            f"| {row['task']} | {row['split']} | {row['mode']} | {row['acc']:.3f} | {row['n']} | "
            f"0.200 | {row['most_frequent_acc']:.3f} ({row['most_frequent_letter']}) | {pass_k} |"
        )
    for row in rows:
        md += ["", f"Confusion ({row['task']}, {row['mode']}; rows gold, columns predicted):", ""]
        md += confusion_markdown(row)
    return "\n".join(md)


def main(argv=None) -> list[dict]:
    # ---- setup and model
    args = parse_args(argv)
    info = init_distributed()
    model, tokenizer, meta = load_model(
        args.source, tag=args.model_tag, step=args.step, device=info.device, phase="eval"
    )
    tag = meta.get("tag") or args.model_tag or "?"
    print0(
        f"chat_eval: {args.source}/{tag} step {meta.get('step')}, tasks {args.task_list}, "
        f"split {args.split}, modes {args.mode_list}, {info.world_size} process(es) "
        f"on {info.device.type}"
    )
    tracker = make_tracker(
        args, f"chat_eval_{args.source}", {**vars(args), "tag": tag, "step": meta.get("step")}
    )

    # ---- evaluate each task in each mode
    all_rows = []
    for name in args.task_list:
        task = load_task(name, args)
        t0 = time.time()
        rows = evaluate_task(name, task, model, tokenizer, args)
        for row in rows:
            row.update(tag=tag, step=meta.get("step"), time=time.time(), seconds=time.time() - t0)
            print_row(row)
            metrics = {f"{row['task']}/{row['mode']}/acc": row["acc"]}
            if "k" in row:
                metrics[f"{row['task']}/pass@{row['k']}"] = pass_at_k(row)
            tracker.log(metrics, step=0)
        all_rows.extend(rows)
    tracker.finish()

    # ---- write the JSONL lines and the report section
    if info.rank == 0:
        run_dir = get_base_dir() / "runs" / args.run
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "chat_eval.jsonl", "a", encoding="utf-8") as fh:
            for row in all_rows:
                fh.write(json.dumps(row) + "\n")
        markdown = report_markdown(args, tag, meta.get("step"), all_rows)
        write_section(get_base_dir(), args.run, f"chat_eval_{args.source}", markdown)
        print0(f"wrote {run_dir / 'chat_eval.jsonl'}")
    cleanup_distributed()
    return all_rows


if __name__ == "__main__":
    main()
