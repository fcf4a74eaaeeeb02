"""Pretrain the base model: next-token prediction on the pretraining corpus.

    uv run python -m scripts.base_train --depth 20                   # one process (GPU or CPU)
    uv run torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 20
    uv run python -m scripts.base_train --depth 2 --max-seq-len 128 --device-batch-size 4 \\
        --total-batch-size 1024 --num-iterations 50 --source synthetic      # tiny CPU run

What one optimizer step is: `--total-batch-size` tokens, split over world_size processes and
grad_accum micro-steps of `--device-batch-size` rows x `--max-seq-len` tokens each
(grad_accum = total / (device_batch_size * seq_len * world_size); it must divide exactly).

Data layout (why the loaders are per "slot"): the global batch of a step is made of
world_size * grad_accum slots, each a data-loader shard `DataLoader(rank=slot, world_size=slots)`.
Process r runs the slots r*grad_accum .. r*grad_accum + grad_accum - 1. So a step sees the same
rows whether it runs as 1 process x 8 micro-steps or 8 processes x 1: the run is reproducible
across device counts (tested: torchrun x2 equals one process with grad accumulation). Each loader
reads, tokenises and packs --prefetch batches ahead in a background thread, so the timed step only
pops a ready batch; a checkpoint saves the position after the last batch trained on.

Token budget (the first one set wins): --num-iterations; --target-flops (FLOPs / (FLOPs per
token * tokens per step)); --target-param-data-ratio (tokens = ratio * params; 20 = Chinchilla).

Schedule: lr multiplier ramps linearly over the first warmup_ratio of steps, holds at 1, then decays
linearly to final_lr_frac over the last warmdown_ratio. Muon momentum warms up 0.85 -> 0.95 over
--momentum-warmup-steps.

Checkpoints go to <base>/checkpoints/base/<tag>/step_NNNNNN (model, per-rank optimizer shards,
data-loader positions, RNG). Re-running the same command resumes from the newest complete one
(a killed run loses at most --save-every steps and continues bit-exactly on CPU); --fresh deletes
the tag's checkpoints and starts over. Nothing is ever deleted without --fresh.

Under torchrun, name the run with NANOCHAT_RUN=... rather than --run: torchrun's own argument parser
rejects "--run" anywhere on its command line as an ambiguous abbreviation of its --run-path.
"""

from __future__ import annotations

import argparse
import resource
from contextlib import contextmanager
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanochat.checkpoint import check_tokenizer, checkpoint_dir
from nanochat.common import (
    autodetect_dtype,
    cleanup_distributed,
    init_distributed,
    peak_flops,
    print0,
    seed_everything,
)
from nanochat.compile import maybe_compile
from nanochat.dataloader import PRETRAINING_PACKING, DataLoader
from nanochat.engine import Engine
from nanochat.files import get_base_dir
from nanochat.gpt import GPT, config_from_depth
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import clip_grad_norm_, overlap_grad_sync
from nanochat.report import write_section
from nanochat.tokenizer import get_token_bytes, get_tokenizer, tokenizer_record
from nanochat.tracking import add_tracking_args, make_tracker
from nanochat.training import (
    StepTimer,
    add_checkpoint_args,
    add_optimizer_args,
    refuse_changed_flags,
    save,
    set_lr,
    setup_optimizers,
    start_or_resume,
    stop_if_not_finite,
)

STAGE = "base"
SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If 3x + 2 = 11, then x =",
    "A train covers 120 km in 2 hours, so its speed is",
    "The opposite of hot is",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Pretrain the base GPT (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--depth",
        type=int,
        default=20,
        help="number of layers; sets width and heads (gpt.config_from_depth)",
    )
    g.add_argument("--aspect-ratio", type=int, default=64, help="n_embd = depth * aspect_ratio")
    g.add_argument("--head-dim", type=int, default=128, help="target attention head dimension")
    g.add_argument(
        "--value-embed-every",
        type=int,
        default=2,
        help="value embeddings on every k-th layer counted back from the last (0: none)",
    )
    g.add_argument("--max-seq-len", type=int, default=2048, help="context length in tokens")
    g = p.add_argument_group("data")
    g.add_argument(
        "--source",
        default="auto",
        choices=["auto", "fineweb", "dir", "synthetic"],
        help="pretraining text source (nanochat.dataset.text_iterator)",
    )
    g.add_argument(
        "--data-dir",
        default=None,
        help="directory of parquet/text shards (default <base>/base_data)",
    )
    g.add_argument(
        "--packing",
        default=PRETRAINING_PACKING,
        choices=["continue", "legacy"],
        help="how rows are packed (nanochat.dataloader): legacy drops the cropped tails (about "
        "45%% of web-like text at 2048; the shard count allows for it) but trained to a 0.08-0.10 "
        "nats/token lower loss per FLOP than continue in the CPU benchmark (docs/experiments.md); "
        "continue keeps every token, carrying a cropped document's rest into a later row "
        "(pass --shards about 0.55x as many)",
    )
    g.add_argument(
        "--prefetch",
        type=int,
        default=4,
        help="batches each data loader reads, tokenises and packs ahead in a background thread, "
        "so the step does not wait for them (0: tokenise inside the step)",
    )
    g = p.add_argument_group("budget and batch")
    g.add_argument(
        "--num-iterations", type=int, default=-1, help="optimizer steps (-1: from the flags below)"
    )
    g.add_argument(
        "--target-flops", type=float, default=-1.0, help="training FLOPs budget (-1: off)"
    )
    g.add_argument(
        "--target-param-data-ratio",
        type=float,
        default=20.0,
        help="tokens = ratio * params when no other budget is given (20 = Chinchilla)",
    )
    g.add_argument(
        "--device-batch-size", type=int, default=32, help="rows per micro-step per process"
    )
    g.add_argument(
        "--total-batch-size",
        type=int,
        default=524288,
        help="tokens per optimizer step (all processes)",
    )
    g = p.add_argument_group("optimization")
    add_optimizer_args(g)
    g.add_argument(
        "--warmup-ratio", type=float, default=0.0, help="fraction of steps of linear lr warmup"
    )
    g.add_argument(
        "--warmdown-ratio",
        type=float,
        default=0.2,
        help="fraction of steps of linear lr decay at the end",
    )
    g.add_argument(
        "--final-lr-frac", type=float, default=0.0, help="lr multiplier reached at the last step"
    )
    g.add_argument(
        "--momentum-warmup-steps",
        type=int,
        default=300,
        help="Muon momentum 0.85 -> 0.95 over this many steps",
    )
    g.add_argument("--seed", type=int, default=42, help="model init seed")
    g = p.add_argument_group("evaluation, samples, logging")
    g.add_argument(
        "--eval-every",
        type=int,
        default=250,
        help="val bits-per-byte every N steps (0: only at the end)",
    )
    g.add_argument(
        "--eval-tokens",
        type=int,
        default=-1,
        help="val tokens per evaluation (-1: 10 x --total-batch-size, i.e. ten steps' worth)",
    )
    g.add_argument(
        "--sample-every",
        type=int,
        default=2000,
        help="greedy samples every N steps (0: only at the end, -1: never)",
    )
    g.add_argument("--sample-tokens", type=int, default=24, help="tokens per greedy sample")
    g.add_argument("--log-every", type=int, default=1, help="log training metrics every N steps")
    g = p.add_argument_group("checkpoints")
    add_checkpoint_args(g, save_every=1000, tag_help="checkpoint tag (default d<depth>)")
    add_tracking_args(p)
    args = p.parse_args(argv)
    if args.fresh and args.resume == "require":
        p.error("--fresh and --resume require contradict each other")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    info = init_distributed()
    check_batch_geometry(args, info.world_size)

    # ---- tokenizer, model and token budget
    tokenizer = load_tokenizer()
    token_bytes = get_token_bytes(info.device)
    model = build_model(args, tokenizer.get_vocab_size(), info.device)
    run = plan_run(args, info, model)

    # ---- optimizers, a resume if there is a checkpoint, and the micro-batch
    optimizers = setup_optimizers(model, args)
    start_step, resumed, rank_state = start_or_resume(
        run.ckpt_dir, info, model, optimizers, args.fresh, args.resume
    )
    train_model = maybe_compile(model, info.device)
    stats = fix_layout(run, resumed, start_step, train_model, model, optimizers, tokenizer)
    announce(run, model, start_step)

    # ---- data and tracking
    loaders = train_loaders(args, tokenizer, run.device_batch, run.grad_accum, info, rank_state)
    tracker = make_tracker(args, STAGE, run_config(run, model, start_step))

    # ---- the training loop: `step` optimizer steps are done
    samples = []
    timer = StepTimer(
        info.device, start_step, run.num_iterations, stats["train_time"], stats["timed_steps"]
    )
    for step in range(start_step, run.num_iterations + 1):
        last = step == run.num_iterations
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            bpb = val_bpb(train_model, tokenizer, token_bytes, run)
            stats["val_bpb"] = bpb
            stats["min_val_bpb"] = min(bpb, stats["min_val_bpb"] or float("inf"))
            print0(f"step {step:05d}/{run.num_iterations} | val bpb {bpb:.4f}")
            tracker.log({"val/bpb": bpb}, step=step)
        sample_now = last or (args.sample_every > 0 and step % args.sample_every == 0)
        if args.sample_every >= 0 and sample_now and info.rank == 0:
            samples = greedy_samples(model, tokenizer, SAMPLE_PROMPTS, args.sample_tokens)
            for i, text in enumerate(samples):
                print0(f"  sample {i}: {text!r}")
            tracker.log({f"samples/{i}": text for i, text in enumerate(samples)}, step=step)
        if last:
            break

        timer.start()
        lrm = lr_multiplier(
            step, run.num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac
        )
        momentum = muon_momentum(step, args.momentum_warmup_steps)
        loss_sum, grad_norm = train_step(
            train_model, model, optimizers, loaders, lrm, momentum, args.grad_clip, info.device
        )
        timer.stop()
        done = step + 1
        stats["train_time"], stats["timed_steps"] = timer.total, timer.count
        if done % args.log_every == 0 or done == run.num_iterations:
            log_step(run, stats, tracker, loaders, done, loss_sum, grad_norm, lrm, momentum, timer)
        if done == run.num_iterations or (args.save_every > 0 and done % args.save_every == 0):
            meta = checkpoint_meta(run, model, tokenizer, stats)
            loader_states = {"loaders": [loader.state_dict() for loader in loaders]}
            save(
                run.ckpt_dir,
                done,
                model,
                optimizers,
                meta,
                info.rank,
                args.keep_last,
                loader_states,
            )

    for loader in loaders:
        loader.close()
    finish(run, model, tracker, stats, loaders, samples)
    cleanup_distributed()


def lr_multiplier(
    step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float
) -> float:
    # Warm-up, stable, decay: the flat stretch makes most of the progress at full lr, and the
    # linear decay at the end averages out the step noise, which is where the final loss drops.
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown  # 1 -> 0 over the warmdown
    return progress + (1.0 - progress) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int) -> float:
    # Early gradients point in changing directions; a lower momentum lets Muon follow them before
    # it settles into the long average that 0.95 gives.
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * 0.85 + frac * 0.95


def resolve_num_iterations(
    args, budget_params: int, flops_per_token: float, total_batch_size: int
) -> tuple[int, str]:
    if args.num_iterations > 0:
        return args.num_iterations, "--num-iterations"
    if args.target_flops > 0:
        n = round(args.target_flops / (flops_per_token * total_batch_size))
        return max(1, n), f"--target-flops {args.target_flops:.3g}"
    if args.target_param_data_ratio > 0:
        n = int(args.target_param_data_ratio * budget_params) // total_batch_size
        return max(1, n), f"--target-param-data-ratio {args.target_param_data_ratio:g}"
    raise SystemExit(
        "no token budget: set --num-iterations, --target-flops or --target-param-data-ratio > 0"
    )


def memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@contextmanager
def optimizer_state_allocated(model, optimizers):
    """The optimizers' state, allocated for the duration of the block and dropped after it, so
    that a memory probe sees what every training step after the first holds (AdamW's two moments,
    Muon's momentum). Allocated by one step at lr 0 on zero gradients, which moves no parameter
    (every update is scaled by the lr, weight decay too); afterwards each optimizer gets back its
    state_dict from before (no state, the same lrs), so training is exactly as without the probe.
    Under torchrun the step's collectives run on every rank, before the probe's first try."""
    saved = [opt.state_dict() for opt in optimizers]
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    try:
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = 0.0
            opt.step()
    except torch.OutOfMemoryError:
        raise SystemExit(
            "out of memory with the parameters, gradients and optimizer state alone, before any "
            "activation: a smaller --depth, more GPUs, or a GPU with more memory (uv run python -m "
            "scripts.plan_memory shows the figures)"
        ) from None
    finally:
        model.zero_grad(set_to_none=True)
    try:
        yield
    finally:
        for opt, state in zip(optimizers, saved):
            opt.load_state_dict(state)


def fit_device_batch(train_model, model, optimizers, batch: int, seq_len: int, info) -> int:
    """The largest micro-batch <= `batch` whose forward + backward fits in memory next to the
    optimizer state (held during the probe: optimizer_state_allocated), halving on out-of-memory;
    grad accumulation grows to keep the total batch. Probed with one step on zero tokens (no RNG
    drawn, no parameter moved: training itself is unchanged); all ranks take the smallest fit.
    uv run python -m scripts.plan_memory gives the same answer before any download or GPU."""
    with optimizer_state_allocated(model, optimizers):
        return _fit_device_batch(train_model, model, batch, seq_len, info)


def _fit_device_batch(train_model, model, batch: int, seq_len: int, info) -> int:
    while True:
        try:
            ids = torch.zeros(batch, seq_len, dtype=torch.long, device=info.device)
            train_model(ids, ids).backward()
            fits = True
        except torch.OutOfMemoryError:
            fits = False
        model.zero_grad(set_to_none=True)
        if info.device.type == "cuda":
            torch.cuda.empty_cache()
        # the next try: the largest divisor of batch up to its half (keeps the total divisible)
        smaller = max((d for d in range(1, batch // 2 + 1) if batch % d == 0), default=0)
        agreed = torch.tensor([batch if fits else smaller], device=info.device)
        if info.is_ddp:
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if int(agreed.item()) == batch:
            return batch
        smaller = int(agreed.item())
        if smaller < 1:
            raise SystemExit(
                f"out of memory even with a micro-batch of {batch} x {seq_len} tokens: a smaller "
                f"--max-seq-len or --depth, or a GPU with more memory"
            )
        print0(
            f"note: a micro-batch of {batch} x {seq_len} tokens does not fit in memory: trying "
            f"{smaller} (more gradient accumulation, the same total batch)"
        )
        batch = smaller


def greedy_samples(model, tokenizer, prompts: list[str], max_tokens: int) -> list[str]:
    engine = Engine(model, tokenizer)
    outs = []
    for prompt in prompts:
        tokens = tokenizer.encode(prompt, prepend=tokenizer.get_bos_token_id())
        result = engine.generate_batch(
            tokens, num_samples=1, max_tokens=max_tokens, temperature=0.0
        )
        outs.append(prompt + tokenizer.decode(result.sequences[0]))
    return outs


# Running figures that survive a resume (kept in the checkpoint's meta.json).
FRESH_STATS = {
    "smooth_loss": 0.0,
    "smooth_count": 0,
    "train_time": 0.0,
    "timed_steps": 0,
    "train_loss": None,
    "val_bpb": None,
    "min_val_bpb": None,
}
SMOOTHING = 0.9  # the EMA of the logged training loss


def check_batch_geometry(args, world_size: int) -> None:
    tokens_per_micro = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_micro != 0:
        example = max(1, args.total_batch_size // tokens_per_micro) * tokens_per_micro
        raise SystemExit(
            f"--total-batch-size {args.total_batch_size} must be a multiple of device_batch_size "
            f"* max_seq_len * world_size = {args.device_batch_size} * {args.max_seq_len} * "
            f"{world_size} = {tokens_per_micro} (e.g. {example})"
        )


def build_model(args, vocab_size: int, device) -> GPT:
    config = config_from_depth(
        args.depth,
        vocab_size,
        sequence_len=args.max_seq_len,
        aspect_ratio=args.aspect_ratio,
        head_dim=args.head_dim,
        value_embed_every=args.value_embed_every,
    )
    seed_everything(args.seed)  # the same seed on every rank: identical initial weights everywhere
    with torch.device("meta"):  # shapes only; the weights are allocated once, on the device
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    return model


def check_resumable(meta, ckpt_dir, step, args, tokenizer, layout, num_iterations) -> None:
    """Stop when the checkpoint's run cannot go on with these flags: it would train another run."""
    check_tokenizer(meta, tokenizer, tokenizer.get_vocab_size(), f"{ckpt_dir} step {step}")
    saved_layout = (meta.get("world_size"), meta.get("grad_accum"))
    if saved_layout != layout:
        raise SystemExit(
            f"{ckpt_dir} step {step} was written by {saved_layout[0]} process(es) x "
            f"{saved_layout[1]} micro-steps; now {layout[0]} x {layout[1]}. Resume with the same "
            f"--nproc_per_node and batch flags, or start over with --fresh."
        )
    refuse_changed_flags(ckpt_dir, step, meta.get("args", {}), args)
    if meta.get("num_iterations") != num_iterations:
        raise SystemExit(
            f"the checkpoint's run has num_iterations={meta.get('num_iterations')}, these flags "
            f"give {num_iterations}: the lr schedule would change mid-run. Keep the budget flags, "
            f"or use --fresh / another --tag."
        )
    if step > num_iterations:
        raise SystemExit(f"checkpoint step {step} is past num_iterations={num_iterations}")


def train_loaders(args, tokenizer, device_batch, grad_accum, info, rank_state) -> list:
    """This rank's slots of the global batch, one loader each (see the module docstring)."""
    states = rank_state["loaders"] if rank_state else [None] * grad_accum
    try:
        return [
            DataLoader(
                tokenizer,
                device_batch,
                args.max_seq_len,
                "train",
                rank=info.rank * grad_accum + i,
                world_size=info.world_size * grad_accum,
                source=args.source,
                data_dir=args.data_dir,
                device=info.device,
                state=states[i],
                packing=args.packing,
                prefetch=args.prefetch,
            )
            for i in range(grad_accum)
        ]
    except (ValueError, FileNotFoundError) as exc:  # missing or damaged shards: one line, no trace
        raise SystemExit(f"pretraining data: {exc}") from None


def val_bpb(train_model, tokenizer, token_bytes, run) -> float:
    args, info = run.args, run.info
    val_steps = max(1, eval_tokens(args) // (run.device_batch * args.max_seq_len * info.world_size))
    # a fresh loader each time: every evaluation scores the same first val tokens
    with DataLoader(
        tokenizer,
        run.device_batch,
        args.max_seq_len,
        "val",
        rank=info.rank,
        world_size=info.world_size,
        source=args.source,
        data_dir=args.data_dir,
        device=info.device,
        prefetch=args.prefetch,
    ) as val_loader:
        return evaluate_bpb(train_model, val_loader, val_steps, token_bytes)


def eval_tokens(args) -> int:
    return args.eval_tokens if args.eval_tokens > 0 else 10 * args.total_batch_size


def train_step(train_model, model, optimizers, loaders, lrm, momentum, grad_clip, device):
    """One optimizer step over this rank's micro-batches -> (summed loss, gradient norm)."""
    loss_sum = torch.zeros((), device=device)
    for i, loader in enumerate(loaders):
        x, y = loader.next_batch()
        loss = train_model(x, y)
        loss_sum += loss.detach()
        if i == len(loaders) - 1:  # the last backward sends the gradients as they complete
            overlap_grad_sync(optimizers)
        # each micro-batch's loss is a mean over its tokens; dividing by their count makes the
        # gradient the mean over this rank's step, and the optimizers average it over ranks
        (loss / len(loaders)).backward()
    grad_norm = clip_grad_norm_(optimizers, grad_clip if grad_clip > 0 else None)
    set_lr(optimizers, lrm, momentum)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum, grad_norm


def plan_run(args, info, model) -> SimpleNamespace:
    """What this run is: its checkpoint place, its budget and the figures its logs need. The
    micro-batch and gradient accumulation are filled in by fix_layout."""
    budget_params = model.num_budget_params()  # value embeddings add parameters, not tokens
    flops_per_token = model.estimate_flops()
    num_iterations, budget_rule = resolve_num_iterations(
        args, budget_params, flops_per_token, args.total_batch_size
    )
    tag = args.tag or f"d{args.depth}"
    return SimpleNamespace(
        args=args,
        info=info,
        tag=tag,
        ckpt_dir=checkpoint_dir(STAGE, tag),
        num_iterations=num_iterations,
        budget_rule=budget_rule,
        budget_params=budget_params,
        flops_per_token=flops_per_token,
        total_batch=args.total_batch_size,
        peak=peak_flops(info.device),
        device_batch=None,
        grad_accum=None,
    )


def fix_layout(run, resumed, start_step, train_model, model, optimizers, tokenizer) -> dict:
    """Sets the micro-batch and gradient accumulation; returns the running stats (a resume's)."""
    args, world_size = run.args, run.info.world_size
    # A resumed run keeps its micro-batch (the data layout depends on it); a fresh one takes the
    # largest that fits, halving --device-batch-size on out-of-memory.
    if resumed is not None:
        run.device_batch = resumed.get("device_batch_size", args.device_batch_size)
    else:
        run.device_batch = fit_device_batch(
            train_model, model, optimizers, args.device_batch_size, args.max_seq_len, run.info
        )
    run.grad_accum = run.total_batch // (run.device_batch * args.max_seq_len * world_size)
    stats = dict(FRESH_STATS)
    if resumed is not None:
        layout = (world_size, run.grad_accum)
        check_resumable(
            resumed, run.ckpt_dir, start_step, args, tokenizer, layout, run.num_iterations
        )
        stats.update(resumed.get("stats", {}))
    return stats


def announce(run, model, start_step) -> None:
    config, args, steps, total = model.config, run.args, run.num_iterations, run.total_batch
    if start_step == steps:
        print0(
            f"Training already complete at step {start_step}: only the final evaluation and "
            f"report are redone (use --fresh to retrain)"
        )
    print0(
        f"model: depth {config.n_layer}, n_embd {config.n_embd}, heads {config.n_head}, vocab "
        f"{config.vocab_size}, seq {config.sequence_len}, {model.num_params():,} params, "
        f"{run.flops_per_token:.3e} FLOPs/token"
    )
    print0(
        f"batch: {total:,} tokens/step = {run.info.world_size} proc x {run.grad_accum} micro x "
        f"{run.device_batch} rows x {args.max_seq_len}; {steps} steps ({run.budget_rule}) = "
        f"{steps * total:,} tokens, {steps * total / run.budget_params:.1f} tokens/param "
        f"(value embeddings not counted)"
    )


def run_config(run, model, start_step) -> dict:
    """What the tracker records about the run (W&B's config)."""
    device = run.info.device
    return {
        **vars(run.args),
        "tag": run.tag,
        "num_params": model.num_params(),
        "flops_per_token": run.flops_per_token,
        "num_iterations": run.num_iterations,
        "grad_accum": run.grad_accum,
        "world_size": run.info.world_size,
        "device": str(device),
        "dtype": str(autodetect_dtype(device)),
        "model_config": asdict(model.config),
        "resumed_from": start_step,
        "cpu_threads": torch.get_num_threads(),
    }


def checkpoint_meta(run, model, tokenizer, stats) -> dict:
    return {
        "model_config": asdict(model.config),
        "tokenizer": tokenizer_record(tokenizer),
        "stage": STAGE,
        "tag": run.tag,
        "num_iterations": run.num_iterations,
        "grad_accum": run.grad_accum,
        "total_batch_size": run.total_batch,
        "device_batch_size": run.device_batch,
        "stats": stats,
        "args": vars(run.args),
    }


def mfu(run, tok_per_sec: float) -> float | None:
    """Model FLOPs utilisation: the model's FLOPs per token (6 per matmul parameter plus the
    attention matmuls) times the tokens per second, in percent of the devices' peak bf16 FLOP/s."""
    if not run.peak or not tok_per_sec:
        return None
    return 100.0 * run.flops_per_token * tok_per_sec / (run.peak * run.info.world_size)


def log_step(run, stats, tracker, loaders, step, loss_sum, grad_norm, lrm, momentum, timer):
    info, loader = run.info, loaders[0]
    if info.is_ddp:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
    train_loss = loss_sum.item() / (run.grad_accum * info.world_size)
    stop_if_not_finite(grad_norm.item(), "the gradient norm", step, run.ckpt_dir)
    stop_if_not_finite(train_loss, "the training loss", step, run.ckpt_dir)
    metrics = step_metrics(run, stats, loaders, step, train_loss, grad_norm.item(), lrm, momentum)
    metrics["train/step_time_s"] = timer.last
    metrics["train/tok_per_sec"] = run.total_batch / timer.last
    step_mfu = mfu(run, metrics["train/tok_per_sec"])
    if step_mfu is not None:
        metrics["train/mfu"] = step_mfu
    tracker.log(metrics, step=step)
    print_step(step, run.num_iterations, metrics)
    if loader.epoch >= 1 and not stats.get("data_repeat_noted"):
        stats["data_repeat_noted"] = True  # said once per run (kept across resumes)
        print0(
            f"note: the training data ran out by step {step}: the documents now repeat "
            f"(pass {loader.epoch + 1}). More data: more shards "
            f"(run_aquarat_small.sh --shards N, uv run python -m nanochat.dataset -n N) or a "
            f"smaller --num-iterations"
        )


def finish(run, model, tracker, stats, loaders, samples) -> None:
    """The summary (the figures accumulate over resumes) and the report section."""
    info, total, loader = run.info, run.total_batch, loaders[0]
    train_time, timed_steps = stats["train_time"], stats["timed_steps"]
    avg_tok_per_sec = total * timed_steps / train_time if train_time > 0 else None
    summary = {
        "final/val_bpb": stats["val_bpb"],
        "final/min_val_bpb": stats["min_val_bpb"],
        "final/train_loss": stats["train_loss"],
        "final/tok_per_sec": avg_tok_per_sec,
        "final/mfu": mfu(run, avg_tok_per_sec),
        "final/steps": run.num_iterations,
        "final/tokens": run.num_iterations * total,
        "final/mem_mb": memory_mb(info.device),
        "final/train_time_s": train_time,
        "final/data_passes": loader.passes,
        "final/kept_frac": kept_frac(loaders),
    }
    tracker.summary(summary)
    tracker.finish()
    if info.rank != 0:
        return
    facts = {
        "ckpt_dir": run.ckpt_dir,
        "config": model.config,
        "num_params": model.num_params(),
        "budget_params": run.budget_params,
        "budget_rule": run.budget_rule,
        "passes": loader.passes,
        "kept_frac": summary["final/kept_frac"],
        "repeated": loader.epoch >= 1,
        "layout": f"{info.world_size} process(es) x {run.grad_accum} micro-steps x "
        f"{run.device_batch} rows",
        "device": info.device,
        "samples": samples,
    }
    lines = report_lines(run.args, facts, stats, summary)
    write_section(get_base_dir(), run.args.run, "base_train", "\n".join(lines))


def load_tokenizer():
    try:
        return get_tokenizer()
    except (FileNotFoundError, ValueError) as exc:  # missing or damaged: the message names files
        raise SystemExit(str(exc)) from None


def kept_frac(loaders) -> float:
    """Tokens trained / tokens tokenised (and out of the look-ahead) over this rank's loaders: what
    the packing kept of the text. The shard count (run_aquarat_small.sh) assumes
    dataloader.KEPT_FRACTION of the packing; a lower figure here means the shards run out sooner."""
    kept = sum(loader.tokens_kept for loader in loaders)
    seen = kept + sum(loader.tokens_dropped for loader in loaders)
    return kept / seen if seen else 1.0


def step_metrics(run, stats, loaders, step, loss, grad_norm, lrm, momentum) -> dict:
    """The logged figures of one step (timing added by the caller); updates the running loss
    average in `stats`."""
    stats["train_loss"] = loss
    stats["smooth_loss"] = SMOOTHING * stats["smooth_loss"] + (1 - SMOOTHING) * loss
    stats["smooth_count"] += 1
    # the EMA starts at 0: dividing by 1 - beta^n removes that bias from the first steps' average
    smooth = stats["smooth_loss"] / (1 - SMOOTHING ** stats["smooth_count"])
    return {
        "train/loss": loss,
        "train/loss_smooth": smooth,
        "train/lrm": lrm,
        "train/muon_momentum": momentum,
        "train/grad_norm": grad_norm,
        "train/tokens": step * run.total_batch,
        "train/mem_mb": memory_mb(run.info.device),
        "train/data_passes": loaders[0].passes,
        "train/kept_frac": kept_frac(loaders),
    }


def print_step(step: int, num_iterations: int, m: dict) -> None:
    mfu = f" | mfu {m['train/mfu']:.1f}%" if "train/mfu" in m else ""
    print0(
        f"step {step:05d}/{num_iterations} | loss {m['train/loss']:.4f} (smooth "
        f"{m['train/loss_smooth']:.4f}) | lrm {m['train/lrm']:.3f} | gnorm "
        f"{m['train/grad_norm']:.3f} | {m['train/step_time_s'] * 1000:.0f} ms | "
        f"{m['train/tok_per_sec']:,.0f} tok/s{mfu}"
    )


def report_lines(args, f: dict, stats: dict, summary: dict) -> list[str]:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    config, device, steps = f["config"], f["device"], summary["final/steps"]
    tokens = summary["final/tokens"]
    repeated = " (they repeated: more shards would have given fresh text)" if f["repeated"] else ""
    tok_per_sec, mfu = summary["final/tok_per_sec"], summary["final/mfu"]
    memory = "CUDA allocated" if device.type == "cuda" else "process RSS"
    throughput = f"{tok_per_sec:,.0f} tok/s" if tok_per_sec else "n/a (no timed steps)"
    mfu_text = f"{mfu:.1f}%" if mfu is not None else "n/a (peak FLOPs unknown for this device)"
    lines = [
        "## Base model pretraining (base_train)",
        "",
        f"- checkpoint: `{f['ckpt_dir']}` (step {steps})",
        f"- model: depth {config.n_layer}, n_embd {config.n_embd}, {config.n_head} heads, "
        f"vocab {config.vocab_size}, context {config.sequence_len}, {f['num_params']:,} "
        "parameters",
        f"- data: source `{args.source}`; {steps} steps x {args.total_batch_size:,} tokens = "
        f"{tokens:,} tokens ({tokens / f['budget_params']:.2f} tokens/param, budget from "
        f"{f['budget_rule']}); {f['passes']:.2f} passes over the training documents{repeated}; "
        f"{f['kept_frac']:.1%} of the tokenised text trained on (the rest cropped away)",
        f"- layout: {f['layout']} on {device.type} ({autodetect_dtype(device)})",
        f"- lrs: embedding {args.embedding_lr}, unembedding {args.unembedding_lr}, matrix "
        f"{args.matrix_lr}, weight decay {args.weight_decay}, warmup {args.warmup_ratio}, "
        f"warmdown {args.warmdown_ratio}",
        f"- final train loss: {fmt(stats['train_loss'])}",
        f"- validation bits per byte: final {fmt(stats['val_bpb'])}, best "
        f"{fmt(stats['min_val_bpb'])}",
        f"- throughput: {throughput}",
        f"- MFU: {mfu_text}",
        f"- peak memory: {summary['final/mem_mb']:,.0f} MiB ({memory})",
        f"- training time: {stats['train_time']:.1f} s over {stats['timed_steps']} timed steps "
        f"(first step of each session excluded)",
    ]
    if f["samples"]:
        lines += ["", "Greedy samples:", ""] + [f"    {s!r}" for s in f["samples"]]
    return lines


if __name__ == "__main__":
    main()
