"""Bits per byte of a checkpoint on the pretraining data's train and val splits, and a few samples.

    uv run python -m scripts.base_loss                                  # newest base checkpoint
    uv run torchrun --standalone --nproc_per_node=8 -m scripts.base_loss --tag d20 \\
        --split-tokens 20971520
    uv run python -m scripts.base_loss -i sft --source synthetic --split-tokens 65536

Logs loss/train_bpb and loss/val_bpb (stage "<stage>_loss") and writes that report section.
"""

from __future__ import annotations

import argparse

from nanochat.checkpoint import add_load_args, load_model
from nanochat.common import cleanup_distributed, init_distributed, print0
from nanochat.dataloader import DataLoader
from nanochat.engine import Engine
from nanochat.files import get_base_dir
from nanochat.loss_eval import evaluate_bpb
from nanochat.report import write_section
from nanochat.tokenizer import get_token_bytes
from nanochat.tracking import add_tracking_args, log_results

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
    add_load_args(p)
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


def greedy_samples(model, tokenizer, max_tokens: int) -> list[str]:
    """Each of PROMPTS continued greedily: a glance at what the model has learned."""
    engine = Engine(model, tokenizer)
    samples = []
    for prompt in PROMPTS:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        out = engine.generate_batch(tokens, max_tokens=max_tokens, temperature=0.0)
        samples.append(prompt + tokenizer.decode(out.sequences[0]))
        print0(f"  {samples[-1]!r}")
    return samples


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
    # bits per byte rather than loss per token: it does not depend on the vocabulary, so numbers
    # compare across tokenizers and with other models' reported bpb
    token_bytes = get_token_bytes(info.device, tokenizer.directory)
    print0(
        f"{args.stage} checkpoint {tag or ''} step {step}: "
        f"{steps} x {tokens_per_step:,} tokens per split"
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
        samples = greedy_samples(model, tokenizer, args.sample_tokens)

    stage_name = f"{args.stage}_loss"
    metrics = {"loss/train_bpb": bpb["train"], "loss/val_bpb": bpb["val"]}
    config = {**vars(args), "checkpoint_step": step, "checkpoint_tag": tag}
    extra = {f"samples/{i}": s for i, s in enumerate(samples)}
    log_results(args, stage_name, metrics, step=step or 0, config=config, extra=extra)
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
