"""Bits per byte of a checkpoint on the train and val splits of the pretraining data, plus a few samples.

    python -m scripts.base_loss                                  # newest base checkpoint
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss --tag d20 --split-tokens 20971520
    python -m scripts.base_loss -i sft --source synthetic --split-tokens 65536

Bits per byte (nanochat/loss_eval.py) does not depend on the tokenizer's vocabulary, so numbers are
comparable across tokenizers and with other models' reported bpb. Logs loss/train_bpb and
loss/val_bpb (stage "<stage>_loss") and writes the report section <base>/report/<stage>_loss.md.
"""

from __future__ import annotations

import argparse

from nanochat.checkpoint import load_model
from nanochat.common import cleanup_distributed, get_base_dir, init_distributed, print0
from nanochat.dataloader import DataLoader
from nanochat.engine import Engine
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import write_section
from nanochat.tokenizer import get_token_bytes
from nanochat.tracking import add_tracking_args, make_tracker

PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If 3x + 2 = 11, then x =",
    "Question: A shop sells 3 pens for $6. How much do 5 pens cost?",
    "The planets of the solar system are",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train/val bits per byte and samples of a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "-i",
        "--stage",
        default="base",
        choices=["base", "mid", "sft", "rl"],
        help="checkpoint stage",
    )
    p.add_argument(
        "--tag", default=None, help="checkpoint tag (default: the most recently written one)"
    )
    p.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the newest complete one)"
    )
    p.add_argument(
        "--source",
        default="auto",
        choices=["auto", "fineweb", "dir", "synthetic"],
        help="pretraining text source",
    )
    p.add_argument("--data-dir", default=None, help="directory of parquet/text shards")
    p.add_argument("--device-batch-size", type=int, default=32, help="rows per forward per process")
    p.add_argument(
        "--max-seq-len", type=int, default=None, help="row length (default: the model's context)"
    )
    p.add_argument(
        "--split-tokens", type=int, default=20 * 524288, help="tokens to evaluate per split"
    )
    p.add_argument(
        "--sample-tokens", type=int, default=32, help="tokens per greedy sample (0: no samples)"
    )
    add_tracking_args(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    info = init_distributed()
    model, tokenizer, meta = load_model(
        args.stage, tag=args.tag, step=args.step, device=info.device
    )
    tag, step = meta.get("tag", args.tag), meta.get("step")
    seq_len = args.max_seq_len or model.config.sequence_len
    tokens_per_step = args.device_batch_size * seq_len * info.world_size
    steps = max(1, args.split_tokens // tokens_per_step)
    token_bytes = get_token_bytes(info.device, tokenizer.directory)
    print0(
        f"{args.stage} checkpoint {tag or ''} step {step}: {steps} x {tokens_per_step:,} tokens per split"
    )

    bpb = {}
    for split in ("train", "val"):
        loader = DataLoader(
            tokenizer,
            args.device_batch_size,
            seq_len,
            split,
            rank=info.rank,
            world_size=info.world_size,
            source=args.source,
            data_dir=args.data_dir,
            device=info.device,
        )
        bpb[split] = evaluate_bpb(model, loader, steps, token_bytes)
        print0(f"{split} bpb: {bpb[split]:.4f}")

    samples = []
    if info.is_main and args.sample_tokens > 0:
        engine = Engine(model, tokenizer)
        for prompt in PROMPTS:
            tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
            out = engine.generate_batch(tokens, max_tokens=args.sample_tokens, temperature=0.0)
            samples.append(prompt + tokenizer.decode(out.sequences[0]))
            print0(f"  {samples[-1]!r}")

    stage_name = f"{args.stage}_loss"
    tracker = make_tracker(
        args, stage_name, {**vars(args), "checkpoint_step": step, "checkpoint_tag": tag}
    )
    metrics = {"loss/train_bpb": bpb["train"], "loss/val_bpb": bpb["val"]}
    tracker.log({**metrics, **{f"samples/{i}": s for i, s in enumerate(samples)}}, step=step or 0)
    tracker.summary(metrics)
    tracker.finish()
    if info.is_main:
        lines = [
            f"## Bits per byte ({stage_name})",
            "",
            f"- checkpoint: {args.stage} / {tag} / step {step}",
            f"- train bpb: {bpb['train']:.4f}",
            f"- val bpb: {bpb['val']:.4f}",
            f"- evaluated: {steps * tokens_per_step:,} tokens per split (source `{args.source}`)",
        ]
        if samples:
            lines += ["", "Greedy samples:", ""] + [f"    {s!r}" for s in samples]
        write_section(get_base_dir(), args.run, stage_name, "\n".join(lines))
    cleanup_distributed()


if __name__ == "__main__":
    main()
