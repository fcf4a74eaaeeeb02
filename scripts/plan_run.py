"""What the gpu profile will do and cost, stage by stage, before anything runs.

    uv run python -m scripts.plan_run --depth 8 --gpus 8 --hourly-price 23.92
    bash run_aquarat_small.sh --plan --depth 20        # the same table, for this machine's GPUs

For every stage of run_aquarat_small.sh's gpu profile: its steps, the tokens it processes, its
FLOPs (from the real model's parameter list, built on the meta device), and its time at a stated
utilisation of the GPUs' peak, then the cost at the hourly price. Set-up and downloads have no
FLOPs: their times come from stated throughputs. Every assumption is a flag and is printed under the
table; measured throughput (train/mfu, rl/rollout_tok_per_s) replaces them once a GPU has run it.
"""

from __future__ import annotations

import argparse
import math

import torch

from nanochat.dataloader import KEPT_FRACTION, PRETRAINING_PACKING
from nanochat.dataset import shards_needed
from nanochat.gpt import GPT, config_from_depth

# The gpu profile's settings (run_aquarat_small.sh): what each stage is asked to do.
VOCAB, TOTAL_BATCH_TOKENS, TOKENS_PER_PARAM = 65536, 524288, 20
TOKENIZER_CHARS, SHARD_MB = 2e9, 100
MID_CONVERSATIONS, SFT_CONVERSATIONS = 40_000, 20_000  # 20k AQuA (+ 20k synthetic in mid), 1 epoch
RL_STEPS, RL_QUESTIONS, RL_SAMPLES, RL_MAX_NEW = 300, 32, 8, 512
RL_EVAL_EVERY, RL_EVAL_PROBLEMS, RL_EVAL_SAMPLES = 50, 254, 4
EVAL_PROBLEMS, EVAL_SAMPLES, EVAL_MAX_TOKENS = 254 + 500, 4, 512  # AQuA test + synthetic test
CORE_EXAMPLES, CORE_TOKENS = 22 * 500, 4 * 200  # 22 tasks x --max-per-task 500, ~4 choices x 200
BASE_LOSS_TOKENS = 2 * 20 * 524288  # base_loss: train and val splits


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=8, help="model depth (default %(default)s)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs in the node (default %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=2048, help="pretraining context")
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="bf16 dense peak per GPU (H100 SXM: 989)"
    )
    p.add_argument(
        "--mfu", type=float, default=0.35, help="assumed utilisation of training/scoring"
    )
    p.add_argument(
        "--decode-step-ms",
        type=float,
        default=10.0,
        help="assumed time of one token-by-token sampling step of a batch (latency-bound: kernel "
        "launches and host syncs, not FLOPs)",
    )
    p.add_argument(
        "--stage-overhead-s",
        type=float,
        default=60.0,
        help="assumed start-up of a training or evaluation stage (loading, compiling, saving)",
    )
    p.add_argument("--eval-batch", type=int, default=64, help="rows sampled at once per GPU")
    p.add_argument("--hourly-price", type=float, default=0.0, help="$ per hour for the node")
    p.add_argument("--download-mb-per-s", type=float, default=100.0, help="assumed download speed")
    p.add_argument(
        "--tokenizer-mb-per-s", type=float, default=20.0, help="assumed rustbpe training speed"
    )
    p.add_argument("--chat-tokens", type=int, default=120, help="tokens per AQuA conversation")
    p.add_argument(
        "--completion-tokens", type=int, default=256, help="mean sampled tokens per completion"
    )
    p.add_argument("--shards", type=int, default=0, help="shards to download (0: from the budget)")
    return p.parse_args(argv)


def plan(args) -> tuple[list[dict], dict]:
    """The rows of the table (stage, steps, tokens, flops, seconds) and the model's sizes."""
    with torch.device("meta"):
        model = GPT(config_from_depth(args.depth, VOCAB, sequence_len=args.max_seq_len))
    budget = model.num_budget_params()
    train_flops = model.estimate_flops()  # per token, forward + backward
    fwd_flops = train_flops / 3
    tokens = TOKENS_PER_PARAM * budget
    steps = tokens // TOTAL_BATCH_TOKENS
    # the orchestrator's own count: the budget's text over what pretraining's packing keeps
    shards = args.shards or shards_needed(tokens, KEPT_FRACTION[PRETRAINING_PACKING])
    compute = args.gpus * args.peak_tflops * 1e12  # FLOP/s of the whole node at 100%

    def at(flops, mfu):
        return flops / (compute * mfu)

    def decode_seconds(rows, max_new):
        """Token-by-token sampling runs as long as its longest row: rounds of at most
        --eval-batch rows per GPU, max_new steps each."""
        rounds = math.ceil(rows / (args.gpus * args.eval_batch))
        return rounds * max_new * args.decode_step_ms / 1000

    rl_rollout = RL_STEPS * RL_QUESTIONS * RL_SAMPLES * args.completion_tokens
    rl_decode = RL_STEPS * decode_seconds(RL_QUESTIONS * RL_SAMPLES, RL_MAX_NEW)
    rl_decode += (
        RL_STEPS // RL_EVAL_EVERY * decode_seconds(RL_EVAL_PROBLEMS * RL_EVAL_SAMPLES, RL_MAX_NEW)
    )
    eval_rows = EVAL_PROBLEMS * EVAL_SAMPLES
    eval_tokens = eval_rows * args.completion_tokens
    eval_seconds = decode_seconds(eval_rows, EVAL_MAX_TOKENS)
    rows = [
        {"stage": "set-up (uv sync, rustbpe)", "seconds": 3e9 / 1e6 / args.download_mb_per_s + 120},
        {
            "stage": f"data ({shards} shards, AQuA-RAT, CORE)",
            "seconds": shards * SHARD_MB / args.download_mb_per_s + 30,
        },
        {"stage": "tokenizer", "seconds": TOKENIZER_CHARS / 1e6 / args.tokenizer_mb_per_s},
        {
            "stage": "base",
            "steps": steps,
            "tokens": steps * TOTAL_BATCH_TOKENS,
            "flops": steps * TOTAL_BATCH_TOKENS * train_flops,
        },
        {"stage": "base_loss", "tokens": BASE_LOSS_TOKENS, "flops": BASE_LOSS_TOKENS * fwd_flops},
        {
            "stage": "base_eval (CORE)",
            "tokens": CORE_EXAMPLES * CORE_TOKENS,
            "flops": CORE_EXAMPLES * CORE_TOKENS * fwd_flops,
        },
    ]
    for stage, conversations in (("mid", MID_CONVERSATIONS), ("sft", SFT_CONVERSATIONS)):
        n = conversations * args.chat_tokens
        rows.append(
            {"stage": stage, "steps": conversations // 32, "tokens": n, "flops": n * train_flops}
        )
        rows.append(eval_row(f"eval_{stage}", eval_tokens, eval_seconds, fwd_flops))
    # RL: sampling (latency-bound) + the policy's forward and backward on the sampled tokens, and
    # the reference's forward on 1 question in 8 (--kl-sample-frac)
    rl_train = rl_rollout * (train_flops + fwd_flops / 8)
    rows.append(
        {
            "stage": "rl",
            "steps": RL_STEPS,
            "tokens": rl_rollout,
            "flops": rl_train + rl_rollout * fwd_flops,
            "seconds": rl_decode + at(rl_train, args.mfu),
        }
    )
    rows.append(eval_row("eval_rl", eval_tokens, eval_seconds, fwd_flops))
    for row in rows:
        if "flops" in row:  # a stage that loads a model: its start-up on top
            row["seconds"] = row.get("seconds", at(row["flops"], args.mfu)) + args.stage_overhead_s
    sizes = {"params": model.num_params(), "budget": budget, "flops_per_token": train_flops}
    return rows, sizes


def eval_row(stage, tokens, seconds, fwd_flops) -> dict:
    return {"stage": stage, "tokens": tokens, "flops": tokens * fwd_flops, "seconds": seconds}


def human(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def table(rows, args) -> str:
    lines = [
        "| stage | steps | tokens | FLOPs | time | cost |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    total = {"stage": "**total**", "seconds": sum(r["seconds"] for r in rows)}
    for r in rows + [total]:
        steps = f"{r['steps']:,}" if "steps" in r else "-"
        tokens = f"{r['tokens'] / 1e9:.3g}B" if "tokens" in r else "-"
        flops = f"{r['flops']:.2e}" if "flops" in r else "-"
        cost = f"${r['seconds'] / 3600 * args.hourly_price:.2f}" if args.hourly_price else "-"
        lines.append(
            f"| {r['stage']} | {steps} | {tokens} | {flops} | {human(r['seconds'])} | {cost} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    rows, sizes = plan(args)
    print(
        f"gpu profile, depth {args.depth}: {sizes['params'] / 1e6:.0f}M parameters "
        f"({sizes['budget'] / 1e6:.0f}M without the value-embedding tables), "
        f"{sizes['flops_per_token'] / 1e9:.2f} GFLOP per trained token; {args.gpus} GPU(s) at "
        f"{args.peak_tflops:g} TFLOP/s peak"
    )
    print(table(rows, args))
    print(
        f"Assumed: training and scoring at {args.mfu:.0%} of peak; a sampling step "
        f"{args.decode_step_ms:g} ms for up to {args.eval_batch} rows per GPU; "
        f"{args.stage_overhead_s:g} s start-up per stage; {args.download_mb_per_s:g} MB/s "
        f"downloads (torch ~3 GB, shards ~{SHARD_MB} MB); tokenizer training at "
        f"{args.tokenizer_mb_per_s:g} MB/s; "
        f"{args.chat_tokens} tokens per AQuA conversation; {args.completion_tokens} sampled "
        f"tokens per completion (of at most {RL_MAX_NEW}). Estimates, not measurements: a GPU run "
        "logs the real train/mfu, tok/s and rl/rollout_tok_per_s."
    )


if __name__ == "__main__":
    main()
