"""Evaluate a chat checkpoint on AQuA-RAT (and the synthetic AQuA set): generative and categorical accuracy.

    python -m scripts.chat_eval -i sft -a AQUA                         # AQuA-RAT test split
    python -m scripts.chat_eval -i sft -a SYNTH --max-problems 200     # synthetic AQuA (offline)
    python -m scripts.chat_eval -i rl -a AQUA,SYNTH --num-samples 8 --temperature 1.0   # + pass@8
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_eval -i sft -a AQUA

Two ways to score each multiple-choice problem:
- generative: sample a rationale from the prompt (Engine), then extract_letter(completion, options).
  Greedy accuracy always (temperature 0, one sample); with --num-samples k > 1 also pass@k over k samples
  at --temperature (a problem counts if ANY sample names the gold letter) and the mean per-sample accuracy.
- categorical: no rationale. The assistant turn is primed with "Answer:" right after the prompt and the
  five continuations " A" .. " E" are compared: when each is a single token (the usual case: it is how
  "Answer: C" tokenises in the SFT targets) that is one forward and an argmax over five logits; otherwise
  each continuation's summed log-probability. It measures what the model "believes" without reasoning,
  and it is the quantity whose letter distribution RL diagnostics track.

For both: per-letter confusion matrix (gold x predicted, "none" when no letter is found), the predicted
letter distribution, and two baselines of the split: chance (20%) and always answering the split's most
frequent gold letter. Each rank takes problems rank::world_size; counts are all-reduced.

Output: <base>/runs/<run>/chat_eval.jsonl, one line per (task, mode), e.g.
  {"source": "sft", "task": "aqua", "split": "test", "mode": "generative", "acc": 0.31, "n": 254, ...}
The generative line also lists the greedy result of every problem ("per_problem", 1 = right), which
scripts/compare_evals.py pairs across checkpoints (paired counts and an exact sign test).
(task "synthetic_aqua" for SYNTH) and the report section <base>/report/chat_eval_<source>.md.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.checkpoint import load_model
from nanochat.common import cleanup_distributed, get_base_dir, init_distributed, print0
from nanochat.engine import Engine
from nanochat.report import write_section
from nanochat.tracking import add_tracking_args, make_tracker

LETTERS = ("A", "B", "C", "D", "E")
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
        help="local AQuA-RAT directory (default: <base>/data/aqua_rat if prepared, else Hugging Face)",
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


class LetterScorer:
    """Categorical scoring: the five continuations of the primed prefix "Answer:" (see the docstring)."""

    def __init__(self, tokenizer, letters=LETTERS, prefix: str = "Answer:"):
        self.prefix_ids = tokenizer.encode(prefix)
        self.conts = []
        for letter in letters:
            full = tokenizer.encode(f"{prefix} {letter}")
            if full[: len(self.prefix_ids)] != self.prefix_ids:
                # the prefix tokenises differently with the letter attached: score the whole line instead
                self.prefix_ids = []
                break
            self.conts.append(full[len(self.prefix_ids) :])
        if not self.prefix_ids:
            self.conts = [tokenizer.encode(f"{prefix} {letter}") for letter in letters]
        self.single = all(len(c) == 1 for c in self.conts)
        self.letter_ids = [c[0] for c in self.conts] if self.single else None

    @torch.no_grad()
    def __call__(self, model, prompt_ids: list[int]) -> tuple[int, list[float]]:
        """-> (index of the chosen letter, per-letter scores: log-probs under the model)."""
        device = next(model.parameters()).device
        base = prompt_ids + self.prefix_ids
        if self.single:
            logits = model(torch.tensor([base], device=device))[0, -1].float()
            logp = F.log_softmax(logits, dim=-1)[self.letter_ids]
            scores = logp.tolist()
        else:
            rows = [base + c for c in self.conts]
            T = max(len(r) for r in rows)
            x = torch.tensor([r + [r[-1]] * (T - len(r)) for r in rows], device=device)
            logp = F.log_softmax(model(x).float(), dim=-1)
            scores = []
            for j, c in enumerate(self.conts):  # token t of the continuation sits at len(base) + t
                scores.append(
                    sum(float(logp[j, len(base) - 1 + t, tok]) for t, tok in enumerate(c))
                )
        return max(range(len(scores)), key=lambda i: scores[i]), scores


def letter_index(letter: str | None) -> int:
    return LETTERS.index(letter) if letter in LETTERS else len(LETTERS)  # "none"


def evaluate_task(
    name: str, task, model, tokenizer, args, rank: int, world_size: int, device
) -> list[dict]:
    engine = Engine(model, tokenizer)
    scorer = LetterScorer(tokenizer)
    from tasks.aqua import extract_letter

    n = len(task)
    # counters (summed over ranks): confusion matrices gold x predicted(+none) and scalar tallies
    conf = {
        m: torch.zeros(5, 6, dtype=torch.float64, device=device)
        for m in ("generative", "categorical")
    }
    gold_counts = torch.zeros(5, dtype=torch.float64, device=device)
    tallies = torch.zeros(
        4, dtype=torch.float64, device=device
    )  # pass@k hits, sample hits, samples, gen tokens
    greedy_right = torch.zeros(
        n, dtype=torch.float64, device=device
    )  # per problem, for paired comparisons
    shown = 0
    t0 = time.time()
    mine = list(range(rank, n, world_size))
    done_count = 0
    for start in range(0, len(mine), args.batch_prompts):
        chunk = mine[start : start + args.batch_prompts]
        convs = [task[i] for i in chunk]
        prompts = [tokenizer.render_for_completion(conv) for conv in convs]
        greedy, sampled = None, None
        if (
            "generative" in args.mode_list
        ):  # the chunk's prompts decode together (Engine.generate_multi)
            greedy = engine.generate_multi(prompts, 1, args.max_tokens, temperature=0.0)
            if args.num_samples > 1:
                sampled = engine.generate_multi(
                    prompts,
                    args.num_samples,
                    args.max_tokens,
                    temperature=args.temperature,
                    top_k=args.top_k,
                    seeds=[args.seed + i for i in chunk],
                )
        for k, (i, conv, prompt) in enumerate(zip(chunk, convs, prompts)):
            gold = conv["answer"]
            gold_counts[LETTERS.index(gold)] += 1
            if greedy is not None:
                text = tokenizer.decode(engine.without_stop(greedy[k].sequences[0]))
                pred = extract_letter(text, conv.get("options"))
                conf["generative"][LETTERS.index(gold), letter_index(pred)] += 1
                greedy_right[i] = float(pred == gold)
                tallies[3] += len(greedy[k].sequences[0])
                if rank == 0 and shown < args.show:
                    print0(f"--- {name} #{i} gold {gold} greedy-pred {pred}\n{text.strip()}\n")
                    shown += 1
            if sampled is not None:
                hits = [
                    extract_letter(tokenizer.decode(engine.without_stop(s)), conv.get("options"))
                    == gold
                    for s in sampled[k].sequences
                ]
                tallies[0] += float(any(hits))
                tallies[1] += sum(hits)
                tallies[2] += len(hits)
            if "categorical" in args.mode_list:
                choice, _ = scorer(model, prompt)
                conf["categorical"][LETTERS.index(gold), choice] += 1
        done_count += len(chunk)
        if rank == 0:
            print0(f"  {name}: {done_count * world_size}/{n} problems, {time.time() - t0:.0f}s")
    if dist.is_available() and dist.is_initialized():
        for t in list(conf.values()) + [gold_counts, tallies, greedy_right]:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)

    total = int(gold_counts.sum().item())
    golds = {l: int(c) for l, c in zip(LETTERS, gold_counts.tolist())}
    top_letter = max(LETTERS, key=lambda l: golds[l])
    baselines = {
        "chance": 0.2,
        "most_frequent_letter": top_letter,
        "most_frequent_acc": golds[top_letter] / max(total, 1),
    }
    rows = []
    for mode in args.mode_list:
        c = conf[mode]
        correct = int(c.diagonal().sum().item())
        row = {
            "source": args.source,
            "task": task.name,
            "split": args.split,
            "mode": mode,
            "acc": correct / max(total, 1),
            "n": total,
            "correct": correct,
            **baselines,
            "gold_counts": golds,
            "pred_counts": {lab: int(v) for lab, v in zip(PRED_LABELS, c.sum(0).tolist())},
            "confusion": {
                g: {lab: int(v) for lab, v in zip(PRED_LABELS, c[j].tolist())}
                for j, g in enumerate(LETTERS)
            },
        }
        if mode == "generative":
            row["greedy"] = True
            row["per_problem"] = [
                int(v) for v in greedy_right.tolist()
            ]  # 1 = problem i answered right
            row["mean_completion_tokens"] = tallies[3].item() / max(total, 1)
            if args.num_samples > 1:
                row.update(
                    {
                        "k": args.num_samples,
                        "temperature": args.temperature,
                        f"pass@{args.num_samples}": tallies[0].item() / max(total, 1),
                        "sample_acc": tallies[1].item() / max(tallies[2].item(), 1),
                    }
                )
        else:
            row["scoring"] = (
                "single-token logits" if scorer.single else "summed continuation log-probs"
            )
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


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    info = init_distributed()
    device, rank, world_size = info.device, info.rank, info.world_size
    model, tokenizer, meta = load_model(
        args.source, tag=args.model_tag, step=args.step, device=device, phase="eval"
    )
    tag = meta.get("tag") or args.model_tag or "?"
    print0(
        f"chat_eval: {args.source}/{tag} step {meta.get('step')}, tasks {args.task_list}, split {args.split}, "
        f"modes {args.mode_list}, {world_size} process(es) on {device.type}"
    )
    tracker = make_tracker(
        args, f"chat_eval_{args.source}", {**vars(args), "tag": tag, "step": meta.get("step")}
    )
    all_rows = []
    for name in args.task_list:
        task = load_task(name, args)
        t0 = time.time()
        rows = evaluate_task(name, task, model, tokenizer, args, rank, world_size, device)
        for row in rows:
            row.update(
                {
                    "tag": tag,
                    "step": meta.get("step"),
                    "time": time.time(),
                    "seconds": time.time() - t0,
                }
            )
            pk_key = f"pass@{row['k']}" if "k" in row else None
            extra = f", {pk_key} {row[pk_key]:.3f}" if pk_key else ""
            print0(
                f"{row['task']} {row['split']} {row['mode']}: acc {row['acc']:.3f} ({row['correct']}/{row['n']})"
                f"{extra} | chance 0.200 | always-{row['most_frequent_letter']} {row['most_frequent_acc']:.3f} | "
                f"predicted {row['pred_counts']}"
            )
            metrics = {f"{row['task']}/{row['mode']}/acc": row["acc"]}
            if pk_key:
                metrics[f"{row['task']}/{pk_key}"] = row[pk_key]
            tracker.log(metrics, step=0)
        all_rows.extend(rows)
    tracker.finish()
    if rank == 0:
        run_dir = get_base_dir() / "runs" / args.run
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "chat_eval.jsonl", "a", encoding="utf-8") as fh:
            for row in all_rows:
                fh.write(json.dumps(row) + "\n")
        md = [
            f"## Chat evaluation of {args.source} ({tag}, step {meta.get('step')})",
            "",
            "| task | split | mode | acc | n | chance | always-most-frequent | pass@k |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in all_rows:
            pk = (
                f"{row['pass@' + str(row['k'])]:.3f} (k={row['k']}, T={row['temperature']})"
                if "k" in row
                else ""
            )
            md.append(
                f"| {row['task']} | {row['split']} | {row['mode']} | {row['acc']:.3f} | {row['n']} | 0.200 | "
                f"{row['most_frequent_acc']:.3f} ({row['most_frequent_letter']}) | {pk} |"
            )
        for row in all_rows:
            md += [
                "",
                f"Confusion ({row['task']}, {row['mode']}; rows gold, columns predicted):",
                "",
            ]
            md += confusion_markdown(row)
        write_section(get_base_dir(), args.run, f"chat_eval_{args.source}", "\n".join(md))
        print0(f"wrote {run_dir / 'chat_eval.jsonl'}")
    cleanup_distributed()
    return all_rows


if __name__ == "__main__":
    main()
