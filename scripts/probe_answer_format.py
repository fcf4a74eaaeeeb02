"""Probe: which rationale ending lets a tiny model name the right letter? Minutes, not a pipeline.

Fine-tunes the base checkpoint on easy synthetic AQuA problems whose rationales end one of two
ways, and prints every --eval-every steps the greedy generative accuracy on held-out (validation)
problems, graded as chat_eval grades them (chance 0.2), and how often the first rationale line is
exactly the gold one:
    checks  "8 + 4 = 12." then the options in order up to the right one ("A) 4 no",
            "B) 12 yes"), then "Answer: B" -- the default of tasks/synthetic_aqua.py;
    value   "8 + 4 = 12." then "Answer: B": the letter must be found from the value, a backward
            lookup.
The two differ only in that ending, so the gap between them is what the ending is worth
(docs/experiments.md, "The answer format"). Nothing is saved.

    uv run python -m scripts.probe_answer_format --ending checks --steps 750
    uv run python -m scripts.probe_answer_format --ending value --steps 750
"""

from __future__ import annotations

import argparse
import time

import torch

from nanochat.chat_loader import collate
from nanochat.checkpoint import load_model
from nanochat.common import print0, seed_everything
from nanochat.engine import Engine
from nanochat.training import set_lr, warmdown_multiplier
from tasks.synthetic_aqua import SyntheticAqua


@torch.no_grad()
def generative_accuracy(model, tokenizer, problems, max_tokens: int) -> tuple[float, float]:
    """(greedy accuracy, fraction whose first rationale line is the gold one) over `problems`."""
    engine = Engine(model, tokenizer)
    correct = first_line_ok = 0
    for conv in problems:
        out = engine.generate_batch(
            tokenizer.render_for_completion(conv), 1, max_tokens=max_tokens, temperature=0.0
        ).sequences[0]
        text = tokenizer.decode([t for t in out if t not in engine.stop_tokens])
        correct += problems.evaluate(conv, text)
        first_line_ok += text.split("\n")[0] == conv["messages"][-1]["content"].split("\n")[0]
    return correct / len(problems), first_line_ok / len(problems)


def main(argv=None) -> list[tuple[int, float, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ending", choices=["checks", "value"], default="checks")
    parser.add_argument(
        "--model-tag", default=None, help="base checkpoint tag (default: the latest)"
    )
    parser.add_argument("--steps", type=int, default=750)
    parser.add_argument("--batch-size", type=int, default=32, help="problems per step")
    parser.add_argument(
        "--init-lr-frac",
        type=float,
        default=0.3,
        help="x the default learning rates (as mid_train)",
    )
    parser.add_argument("--warmdown-ratio", type=float, default=0.2)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument(
        "--eval-problems", type=int, default=100, help="held-out validation problems"
    )
    parser.add_argument("--max-tokens", type=int, default=96, help="generation budget per problem")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    model, tokenizer, meta = load_model("base", tag=args.model_tag, device="cpu", phase="train")
    checks = args.ending == "checks"
    train = SyntheticAqua(
        "train", num_examples=args.steps * args.batch_size, difficulty="easy", check_options=checks
    )
    held_out = SyntheticAqua(
        "validation", num_examples=args.eval_problems, difficulty="easy", check_options=checks
    )
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    optimizers = model.setup_optimizers()
    print0(
        f"probe_answer_format: ending {args.ending}, from base step {meta.get('step')}, "
        f"{model.num_params():,} params, {args.steps} steps x {args.batch_size} problems, "
        "chance 0.2"
    )
    curve, t0 = [], time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            acc, first_line = generative_accuracy(model, tokenizer, held_out, args.max_tokens)
            curve.append((step, acc, first_line))
            print0(
                f"step {step:05d} | generative acc {acc:.3f} | "
                f"first rationale line right {first_line:.3f} | "
                f"{time.time() - t0:.0f}s"
            )
        if step == args.steps:
            break
        batch = range(step * args.batch_size, (step + 1) * args.batch_size)
        x, y = collate([tokenizer.render_conversation(train[i]) for i in batch], pad_id)
        lrm = warmdown_multiplier(step, args.steps, args.warmdown_ratio)
        set_lr(optimizers, args.init_lr_frac * lrm)
        model(x, y).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return curve


if __name__ == "__main__":
    main()
