"""Probe: how fast does a model learn the option lookup ("which option holds 120?" -> its letter)?

Trains on option-lookup drills only (nanochat.chat_data.OptionLookup over easy synthetic problems) and
prints, every --eval-every steps, the teacher-forced letter accuracy on held-out drills and on held-out
easy synthetic problems (the letter after the gold worked rationale; chance 0.2 for both). The second
says whether the drill skill carries over to problems, which the probe never trains on. It isolates the
step the CPU profile's tiny model found hardest, in minutes instead of a whole pipeline run, so set-ups
can be compared: drill styles, the pretrained base checkpoint vs the same architecture from random
weights, the loss on the letter only, a curriculum of fewer options, re-initialised weights. Nothing
is saved.

    python -m scripts.probe_lookup                          # from the latest base checkpoint
    python -m scripts.probe_lookup --style model-picks --steps 3000
"""

from __future__ import annotations

import argparse
import time

import torch

from nanochat.chat_data import (LOOKUP_STYLES, OptionLookup, answer_letter_ids, collate, iter_eval_batches,
                                letter_hits)
from nanochat.checkpoint import load_model
from nanochat.common import print0, seed_everything
from nanochat.gpt import GPT
from scripts.chat_sft import lr_multiplier
from tasks.common import TaskMixture
from tasks.synthetic_aqua import SyntheticAqua


def reinitialise(model: GPT, tokenizer, what: str) -> None:
    """Undo part of the pretraining, to test which part makes the lookup hard to learn."""
    with torch.no_grad():
        if what == "number-embeddings":
            for i in range(tokenizer.get_vocab_size()):
                if tokenizer.decode([i]).strip().isdigit():
                    model.transformer.wte.weight[i].normal_(0.0, 1.0)  # as GPT.init_weights
        elif what == "attention-qk":
            for block in model.transformer.h:
                for lin in (block.attn.c_q, block.attn.c_k):
                    lin.weight.normal_(0.0, model.config.n_embd ** -0.5)


@torch.no_grad()
def letter_accuracy(model: GPT, val_task, tokenizer, letter_vocab: torch.Tensor, batch_size: int) -> float:
    model.eval()
    hits = total = 0
    for x, y, letter_pos in iter_eval_batches(val_task, tokenizer, batch_size, model.config.sequence_len):
        hits += letter_hits(model(x), y, letter_pos, letter_vocab).sum().item()
        total += len(letter_pos)
    model.train()
    return hits / max(1, total)


def main(argv=None) -> list[tuple[int, float, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", choices=["base", "random"], default="base",
                        help="start from the base checkpoint, or from random weights of the same architecture")
    parser.add_argument("--model-tag", default=None, help="base checkpoint tag (default: the latest)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="drills per step")
    parser.add_argument("--init-lr-frac", type=float, default=0.3, help="x the default learning rates (as mid_train)")
    parser.add_argument("--warmdown-ratio", type=float, default=0.2)
    parser.add_argument("--letter-only", action="store_true", help="loss on the answer letter only")
    parser.add_argument("--style", choices=LOOKUP_STYLES, nargs="+", default=["value-first"],
                        help="drill style(s) (nanochat.chat_data.OptionLookup); several are mixed evenly, and "
                             "the held-out drills are of the last one")
    parser.add_argument("--curriculum", action="store_true",
                        help="for the first 60%% of the steps, drills show a random 2 to 5 of the options")
    parser.add_argument("--reinit", choices=["none", "number-embeddings", "attention-qk"], default="none")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-drills", type=int, default=256,
                        help="held-out drills, and as many held-out problems (validation split)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    seed_everything(args.seed)
    model, tokenizer, meta = load_model("base", tag=args.model_tag, device="cpu", phase="train")
    if args.init == "random":
        model = GPT(model.config)
        model.init_weights()
        model.train()
    reinitialise(model, tokenizer, args.reinit)
    letter_ids = answer_letter_ids(tokenizer)
    if not letter_ids:
        raise SystemExit("probe_lookup: the tokenizer does not hold ' A'..' E' as single tokens")
    letter_vocab = torch.tensor(sorted(letter_ids))

    source = SyntheticAqua("train", num_examples=20_000, difficulty="easy")
    n = args.steps * args.batch_size
    drills = TaskMixture([OptionLookup(source, n, seed=args.seed, style=s) for s in args.style], seed=args.seed)
    easy = TaskMixture([OptionLookup(source, n, seed=args.seed, style=s, min_options=2) for s in args.style],
                       seed=args.seed)
    val_problems = SyntheticAqua("validation", num_examples=max(2000, args.eval_drills), difficulty="easy")
    val = OptionLookup(val_problems, args.eval_drills, seed=99, style=args.style[-1])
    held_out_problems = val_problems.subset(0, args.eval_drills)
    pad_id = tokenizer.encode_special("<|assistant_end|>")

    optimizers = model.setup_optimizers()
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    start = f"base step {meta.get('step')}" if args.init == "base" else "random weights"
    print0(f"probe_lookup: from {start}, reinit {args.reinit}, {model.num_params():,} params, "
           f"{args.steps} steps x {args.batch_size} drills, chance 0.2")
    curve, t0 = [], time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            acc = letter_accuracy(model, val, tokenizer, letter_vocab, args.batch_size)
            transfer = letter_accuracy(model, held_out_problems, tokenizer, letter_vocab, args.batch_size)
            curve.append((step, acc, transfer))
            print0(f"step {step:05d} | drill letter acc {acc:.3f} | problem letter acc {transfer:.3f} | "
                   f"{time.time() - t0:.0f}s")
        if step == args.steps:
            break
        task = easy if args.curriculum and step < 0.6 * args.steps else drills
        batch = range(step * args.batch_size, (step + 1) * args.batch_size)
        x, y = collate([tokenizer.render_conversation(task[i]) for i in batch], pad_id)
        if args.letter_only:  # keep only the " A".." E" targets
            y = torch.where(torch.isin(y, letter_vocab), y, torch.full_like(y, -1))
        lrm = lr_multiplier(step, args.steps, args.warmdown_ratio)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * args.init_lr_frac * lrm
        model(x, y).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    return curve


if __name__ == "__main__":
    main()
