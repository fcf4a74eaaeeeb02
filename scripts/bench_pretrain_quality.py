"""Pretraining quality at equal compute: model configs trained side by side on identical batches.

Every config sees the same training batches (built once, before any model), is scored on the same
validation batches, and is trained with base_train's own optimizers, schedule and clipping, for
each seed. Printed: validation cross-entropy (nats/token) at every --eval-every step, the paired
difference to the first config per seed, parameters, matmul FLOPs per step and seconds per step.

The default is the cpu profile's pretraining shape (depth 4, n_embd 128, 2 heads of 64, context 256,
300 steps x 16 x 256 tokens, a 2,048-token BPE with 3-digit number chunks, on the synthetic corpus):

    uv run python -m scripts.bench_pretrain_quality                             # ~12 min, 2 cores
    uv run python -m scripts.bench_pretrain_quality --variants "none:value_embed_every=0" \\
        "every2:value_embed_every=2" "every1:value_embed_every=1" --seeds 42 1
    uv run python -m scripts.bench_pretrain_quality --source fineweb --depth 8 --aspect-ratio 64 \\
        --head-dim 128 --max-seq-len 2048 --batch-size 16 --steps 500 --vocab-size 65536   # a GPU
    uv run python -m scripts.bench_pretrain_quality --variants base: --packings legacy continue \\
        --source dir --data-dir CORPUS              # the data loader's packings (issue 24)

A variant is NAME:FIELD=VALUE[,FIELD=VALUE...] over GPTConfig (e.g. value_embed_every=0). With
several --packings every variant trains once per packing (NAME/PACKING), each on batches packed its
way from the same documents, and is scored on validation batches packed each of those ways (one
table per validation packing).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from nanochat.common import autodetect_device, seed_everything, synchronize
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import clip_grad_norm_
from nanochat.tokenizer import Tokenizer, get_tokenizer, split_pattern
from nanochat.training import set_lr
from scripts.base_train import lr_multiplier, muon_momentum
from scripts.base_train import parse_args as base_train_args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["none:value_embed_every=0", "every2:value_embed_every=2"],
        help="NAME:FIELD=VALUE,... over the depth config; the first one is the baseline",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 1])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--aspect-ratio", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16, help="rows per step (one micro-batch)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--val-batches", type=int, default=16)
    p.add_argument(
        "--packings",
        nargs="+",
        default=["continue"],
        choices=["continue", "legacy"],
        help="data loader packings to compare (nanochat.dataloader); the first is the baseline",
    )
    p.add_argument("--source", default="synthetic", choices=["synthetic", "fineweb", "dir"])
    p.add_argument("--data-dir", default=None)
    p.add_argument(
        "--tokenizer",
        default="train",
        choices=["train", "existing"],
        help="train: a BPE of --vocab-size on the source (the cpu profile's); existing: "
        "NANOCHAT_TOKENIZER_DIR / <base>/tokenizer",
    )
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument(
        "--tokenizer-chars", type=int, default=2_000_000, help="text the BPE is trained on"
    )
    return p.parse_args(argv)


def parse_variant(spec: str) -> tuple[str, dict]:
    name, _, fields = spec.partition(":")
    overrides = {}
    for item in filter(None, fields.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--variants {spec!r}: expected NAME:FIELD=VALUE,...")
        overrides[key.strip()] = value.strip()
    return name, overrides


def make_config(args, vocab_size: int, overrides: dict):
    config = config_from_depth(
        args.depth,
        vocab_size,
        sequence_len=args.max_seq_len,
        aspect_ratio=args.aspect_ratio,
        head_dim=args.head_dim,
    )
    fields = {f.name: f.type for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        if key not in fields:
            raise SystemExit(f"GPTConfig has no field {key!r} (fields: {', '.join(fields)})")
        current = getattr(config, key)
        setattr(config, key, type(current)(value))
    return config


def build_batches(
    tokenizer, args, split: str, count: int, packing: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = DataLoader(
        tokenizer,
        args.batch_size,
        args.max_seq_len,
        split,
        source=args.source,
        data_dir=args.data_dir,
        packing=packing,
    )
    batches = [loader.next_batch() for _ in range(count)]
    print(f"{split} batches packed {packing!r}: {loader.kept_frac:.3f} of the tokenised text kept")
    return batches


@torch.no_grad()
def val_loss(model, batches, device) -> float:
    model.eval()
    total = sum(model(x.to(device), y.to(device)).item() for x, y in batches)
    model.train()
    return total / len(batches)


def train_one(config, seed: int, train, vals: dict, args, device) -> dict:
    """base_train's loop (one micro-batch per step) on the given batches; the loss on each
    validation set every --eval-every steps and at the end."""
    defaults = base_train_args([])
    seed_everything(seed)
    model = GPT(config).to(device)
    optimizers = model.setup_optimizers(
        unembedding_lr=defaults.unembedding_lr,
        embedding_lr=defaults.embedding_lr,
        matrix_lr=defaults.matrix_lr,
        weight_decay=defaults.weight_decay,
    )
    losses, seconds = {}, 0.0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            losses[step] = {name: val_loss(model, val, device) for name, val in vals.items()}
        if step == args.steps:
            break
        synchronize(device)
        t0 = time.perf_counter()
        x, y = train[step]
        model(x.to(device), y.to(device)).backward()
        clip_grad_norm_(optimizers, defaults.grad_clip if defaults.grad_clip > 0 else None)
        set_lr(
            optimizers,
            lr_multiplier(
                step,
                args.steps,
                defaults.warmup_ratio,
                defaults.warmdown_ratio,
                defaults.final_lr_frac,
            ),
            muon_momentum(step, defaults.momentum_warmup_steps),
        )
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        synchronize(device)
        seconds += time.perf_counter() - t0
    return {
        "losses": losses,
        "s_per_step": seconds / args.steps,
        "params": model.num_params(),
        "flops_per_step": model.estimate_flops() * args.batch_size * args.max_seq_len,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    device = autodetect_device()
    if args.tokenizer == "train":
        from nanochat.dataset import text_iterator

        texts = text_iterator(
            "train", source=args.source, data_dir=args.data_dir, max_chars=args.tokenizer_chars
        )
        tokenizer = Tokenizer.train_from_iterator(texts, args.vocab_size, pattern=split_pattern(3))
    else:
        tokenizer = get_tokenizer()
    variants = [parse_variant(v) for v in args.variants]
    configs = {name: make_config(args, tokenizer.get_vocab_size(), o) for name, o in variants}
    trains = {p: build_batches(tokenizer, args, "train", args.steps, p) for p in args.packings}
    vals = {p: build_batches(tokenizer, args, "val", args.val_batches, p) for p in args.packings}
    print(
        f"{args.steps} training batches of {args.batch_size} x {args.max_seq_len} tokens "
        f"(identical for every run of a packing), {args.val_batches} validation batches; "
        f"vocab {tokenizer.get_vocab_size()}; {device}, {torch.get_num_threads()} threads"
    )
    runs = {}  # name -> (config, packing)
    for name, config in configs.items():
        for packing in args.packings:
            runs[name if len(args.packings) == 1 else f"{name}/{packing}"] = (config, packing)

    results = {}
    for name, (config, packing) in runs.items():
        for seed in args.seeds:
            r = train_one(config, seed, trains[packing], vals, args, device)
            results[(name, seed)] = r
            curve = "  ".join(
                f"{step}: " + "/".join(f"{v:.4f}" for v in loss.values())
                for step, loss in r["losses"].items()
            )
            print(
                f"{name:>10} seed {seed:>4}: {curve}   ({r['s_per_step'] * 1000:.0f} ms/step)",
                flush=True,
            )
    for val_name in vals:
        print_table(args, runs, results, val_name, len(vals) > 1)


def print_table(args, runs: dict, results: dict, val_name: str, name_val: bool) -> None:
    baseline = next(iter(runs))
    last = args.steps
    on = f" on validation batches packed {val_name!r}" if name_val else ""
    print(
        f"\nvalidation cross-entropy (nats/token){on} at step {last}; "
        f"paired difference to {baseline} per seed"
    )
    print(
        f"{'variant':>10} | {'params':>10} | {'GFLOP/step':>10} | "
        + " | ".join(f"seed {s:>4}" for s in args.seeds)
        + " | "
        + " | ".join(f"diff {s:>4}" for s in args.seeds)
        + " | mean diff | ms/step | time ratio"
    )
    base_time = sum(results[(baseline, s)]["s_per_step"] for s in args.seeds)

    def loss(name, seed):
        return results[(name, seed)]["losses"][last][val_name]

    for name in runs:
        rs = [results[(name, s)] for s in args.seeds]
        diffs = [loss(name, s) - loss(baseline, s) for s in args.seeds]
        t = sum(r["s_per_step"] for r in rs)
        print(
            f"{name:>10} | {rs[0]['params']:>10,} | {rs[0]['flops_per_step'] / 1e9:>10.2f} | "
            + " | ".join(f"{loss(name, s):9.4f}" for s in args.seeds)
            + " | "
            + " | ".join(f"{d:+9.4f}" for d in diffs)
            + f" | {sum(diffs) / len(diffs):+9.4f} | {t / len(rs) * 1000:7.0f}"
            + f" | {t / base_time:10.3f}"
        )
    spread = [
        abs(loss(baseline, a) - loss(baseline, b)) for a, b in zip(args.seeds, args.seeds[1:])
    ]
    if spread:
        print(f"seed spread of {baseline}: {max(spread):.4f}")


if __name__ == "__main__":
    main()
