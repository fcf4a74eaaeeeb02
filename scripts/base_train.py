"""Pretrain the base model: next-token prediction on the pretraining corpus.

    python -m scripts.base_train --depth 20                                  # one process (GPU or CPU)
    torchrun --standalone --nproc_per_node=8 -m scripts.base_train --depth 20
    python -m scripts.base_train --depth 2 --max-seq-len 128 --device-batch-size 4 \\
        --total-batch-size 1024 --num-iterations 50 --source synthetic      # tiny CPU run

What one optimizer step is: `--total-batch-size` tokens, split over world_size processes and
grad_accum micro-steps of `--device-batch-size` rows x `--max-seq-len` tokens each
(grad_accum = total / (device_batch_size * seq_len * world_size); it must divide exactly).

Data layout (why the loaders are per "slot"): the global batch of a step is made of
world_size * grad_accum slots, each a data-loader shard `DataLoader(rank=slot, world_size=slots)`.
Process r runs the slots r*grad_accum .. r*grad_accum + grad_accum - 1. So a step sees the same
rows whether it runs as 1 process x 8 micro-steps or 8 processes x 1: the run is reproducible
across device counts (tested: torchrun x2 equals one process with grad accumulation).

Token budget (first one that is set wins): --num-iterations; --target-flops (FLOPs / (flops per token
* tokens per step)); --target-param-data-ratio (tokens = ratio * params; 20 = Chinchilla).

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
from dataclasses import asdict

import torch
import torch.distributed as dist

from nanochat.checkpoint import check_tokenizer, checkpoint_dir
from nanochat.common import (
    autodetect_dtype,
    cleanup_distributed,
    get_base_dir,
    init_distributed,
    peak_flops,
    print0,
    seed_everything,
)
from nanochat.dataloader import DataLoader
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth, maybe_compile
from nanochat.loss_eval import evaluate_bpb
from nanochat.optim import clip_grad_norm_
from nanochat.report import write_section
from nanochat.tokenizer import get_token_bytes, get_tokenizer, tokenizer_record
from nanochat.tracking import add_tracking_args, make_tracker
from nanochat.training import (
    StepTimer,
    refuse_changed_flags,
    save,
    set_lr,
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
    g.add_argument(
        "--embedding-lr", type=float, default=0.2, help="AdamW lr of the token embedding"
    )
    g.add_argument("--unembedding-lr", type=float, default=0.004, help="AdamW lr of lm_head")
    g.add_argument("--matrix-lr", type=float, default=0.02, help="Muon lr of the block matrices")
    g.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    g.add_argument(
        "--grad-clip",
        type=float,
        default=1.0,
        help="global grad-norm clip (0: off; the norm is logged anyway)",
    )
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
    g.add_argument(
        "--save-every",
        type=int,
        default=1000,
        help="checkpoint every N steps (0: only the final one)",
    )
    g.add_argument(
        "--keep-last", type=int, default=2, help="keep this many newest checkpoints (0: all)"
    )
    g.add_argument("--tag", default=None, help="checkpoint tag (default d<depth>)")
    g.add_argument(
        "--resume",
        default="auto",
        choices=["auto", "require"],
        help="auto: resume if a checkpoint exists; require: fail if there is none",
    )
    g.add_argument(
        "--fresh", action="store_true", help="DELETE this tag's checkpoints and start over"
    )
    add_tracking_args(p)
    args = p.parse_args(argv)
    if args.fresh and args.resume == "require":
        p.error("--fresh and --resume require contradict each other")
    return args


def lr_multiplier(
    step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float
) -> float:
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown  # 1 -> 0 over the warmdown
    return progress + (1.0 - progress) * final_lr_frac


def muon_momentum(step: int, warmup_steps: int) -> float:
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


def fit_device_batch(train_model, model, batch: int, seq_len: int, info) -> int:
    """The largest micro-batch <= `batch` whose forward + backward fits in memory, halving on
    out-of-memory; grad accumulation grows to keep the total batch. Probed with one step on zero tokens
    (no optimizer step, no RNG drawn: training itself is unchanged); all ranks take the smallest fit.
    The optimizer state, allocated at the first real step, is not in the probe: at the very edge of
    memory that step can still run out."""
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
        # the next try: the largest divisor of batch up to its half (the total batch stays divisible)
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
            f"note: a micro-batch of {batch} x {seq_len} tokens does not fit in memory: trying {smaller} "
            f"(more gradient accumulation, the same total batch)"
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


def main(argv=None) -> None:
    args = parse_args(argv)
    info = init_distributed()
    device, rank, world_size = info.device, info.rank, info.world_size
    tag = args.tag or f"d{args.depth}"
    base_dir = get_base_dir()

    # ---- batch geometry
    tokens_per_micro = args.device_batch_size * args.max_seq_len * world_size
    if args.total_batch_size % tokens_per_micro != 0:
        raise SystemExit(
            f"--total-batch-size {args.total_batch_size} must be a multiple of device_batch_size * max_seq_len * "
            f"world_size = {args.device_batch_size} * {args.max_seq_len} * {world_size} = {tokens_per_micro} "
            f"(e.g. {max(1, args.total_batch_size // tokens_per_micro) * tokens_per_micro})"
        )

    # ---- tokenizer and model
    try:
        tokenizer = get_tokenizer()
    except (
        FileNotFoundError,
        ValueError,
    ) as exc:  # missing or damaged: the message names the files
        raise SystemExit(str(exc)) from None
    token_bytes = get_token_bytes(device)
    config = config_from_depth(
        args.depth,
        tokenizer.get_vocab_size(),
        sequence_len=args.max_seq_len,
        aspect_ratio=args.aspect_ratio,
        head_dim=args.head_dim,
        value_embed_every=args.value_embed_every,
    )
    seed_everything(args.seed)  # same seed on every rank -> identical initial weights everywhere
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=device)
    model.init_weights()
    num_params, flops_per_token = model.num_params(), model.estimate_flops()
    budget_params = (
        model.num_budget_params()
    )  # value embeddings add parameters, not tokens to train on

    # ---- checkpoint: fresh start or resume
    ckpt_dir = checkpoint_dir(STAGE, tag)
    optimizers = model.setup_optimizers(
        unembedding_lr=args.unembedding_lr,
        embedding_lr=args.embedding_lr,
        matrix_lr=args.matrix_lr,
        weight_decay=args.weight_decay,
    )
    # Running figures that survive a resume (kept in the checkpoint's meta.json).
    stats = {
        "smooth_loss": 0.0,
        "smooth_count": 0,
        "train_time": 0.0,
        "timed_steps": 0,
        "train_loss": None,
        "val_bpb": None,
        "min_val_bpb": None,
    }
    start_step, resumed_meta, rank_state = start_or_resume(
        ckpt_dir, info, model, optimizers, args.fresh, args.resume
    )
    train_model = maybe_compile(model, device)
    # The micro-batch: a resumed run keeps the one it was started with (the data layout depends on it);
    # a fresh one takes the largest that fits, halving --device-batch-size on out-of-memory.
    if resumed_meta is not None:
        device_batch = resumed_meta.get("device_batch_size", args.device_batch_size)
    else:
        device_batch = fit_device_batch(
            train_model, model, args.device_batch_size, args.max_seq_len, info
        )
    tokens_per_micro = device_batch * args.max_seq_len * world_size
    grad_accum = args.total_batch_size // tokens_per_micro
    num_slots = world_size * grad_accum
    loader_states = rank_state["loaders"] if rank_state else [None] * grad_accum
    if resumed_meta is not None:
        check_tokenizer(resumed_meta, tokenizer, config.vocab_size, f"{ckpt_dir} step {start_step}")
        if (
            resumed_meta.get("world_size") != world_size
            or resumed_meta.get("grad_accum") != grad_accum
        ):
            raise SystemExit(
                f"{ckpt_dir} step {start_step} was written by {resumed_meta.get('world_size')} "
                f"process(es) x {resumed_meta.get('grad_accum')} micro-steps; now {world_size} x "
                f"{grad_accum}. Resume with the same --nproc_per_node and batch flags, or start over "
                f"with --fresh."
            )
        stats.update(resumed_meta.get("stats", {}))
        refuse_changed_flags(ckpt_dir, start_step, resumed_meta.get("args", {}), args)

    total_batch_size = args.total_batch_size
    num_iterations, budget_rule = resolve_num_iterations(
        args, budget_params, flops_per_token, total_batch_size
    )
    if resumed_meta is not None and resumed_meta.get("num_iterations") != num_iterations:
        raise SystemExit(
            f"the checkpoint's run has num_iterations={resumed_meta.get('num_iterations')}, these flags "
            f"give {num_iterations}: the lr schedule would change mid-run. Keep the budget flags, "
            f"or use --fresh / another --tag."
        )
    if start_step > num_iterations:
        raise SystemExit(f"checkpoint step {start_step} is past num_iterations={num_iterations}")
    if start_step == num_iterations:
        print0(
            f"Training already complete at step {start_step}: only the final evaluation and report are redone "
            f"(use --fresh to retrain)"
        )

    print0(
        f"model: depth {config.n_layer}, n_embd {config.n_embd}, heads {config.n_head}, vocab {config.vocab_size}, "
        f"seq {config.sequence_len}, {num_params:,} params, {flops_per_token:.3e} FLOPs/token"
    )
    print0(
        f"batch: {total_batch_size:,} tokens/step = {world_size} proc x {grad_accum} micro x "
        f"{device_batch} rows x {args.max_seq_len}; {num_iterations} steps ({budget_rule}) = "
        f"{num_iterations * total_batch_size:,} tokens, "
        f"{num_iterations * total_batch_size / budget_params:.1f} tokens/param "
        f"(value embeddings not counted)"
    )

    # ---- data: this rank's slots (see the module docstring)
    try:
        loaders = [
            DataLoader(
                tokenizer,
                device_batch,
                args.max_seq_len,
                "train",
                rank=rank * grad_accum + i,
                world_size=num_slots,
                source=args.source,
                data_dir=args.data_dir,
                device=device,
                state=loader_states[i],
            )
            for i in range(grad_accum)
        ]
    except (
        ValueError,
        FileNotFoundError,
    ) as exc:  # missing or damaged shards: what to do, no traceback
        raise SystemExit(f"pretraining data: {exc}") from None
    eval_tokens = args.eval_tokens if args.eval_tokens > 0 else 10 * args.total_batch_size
    val_steps = max(1, eval_tokens // tokens_per_micro)

    def evaluate_val() -> float:
        # A fresh loader each time: every evaluation scores the same first val tokens.
        val_loader = DataLoader(
            tokenizer,
            device_batch,
            args.max_seq_len,
            "val",
            rank=rank,
            world_size=world_size,
            source=args.source,
            data_dir=args.data_dir,
            device=device,
        )
        return evaluate_bpb(train_model, val_loader, val_steps, token_bytes)

    run_config = {
        **vars(args),
        "tag": tag,
        "num_params": num_params,
        "flops_per_token": flops_per_token,
        "num_iterations": num_iterations,
        "grad_accum": grad_accum,
        "world_size": world_size,
        "device": str(device),
        "dtype": str(autodetect_dtype(device)),
        "model_config": asdict(config),
        "resumed_from": start_step,
        "cpu_threads": torch.get_num_threads(),
    }
    tracker = make_tracker(args, STAGE, run_config)
    peak = peak_flops(device)

    # ---- training loop: `step` = optimizer steps taken so far
    samples, ema_beta = [], 0.9
    step = start_step
    timer = StepTimer(device, start_step, num_iterations, stats["train_time"], stats["timed_steps"])
    while True:
        last = step == num_iterations
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            val_bpb = evaluate_val()
            stats["val_bpb"] = val_bpb
            stats["min_val_bpb"] = min(val_bpb, stats["min_val_bpb"] or float("inf"))
            print0(f"step {step:05d}/{num_iterations} | val bpb {val_bpb:.4f}")
            tracker.log({"val/bpb": val_bpb}, step=step)
        want_samples = args.sample_every >= 0 and (
            last or (args.sample_every > 0 and step % args.sample_every == 0)
        )
        if want_samples and rank == 0:
            samples = greedy_samples(model, tokenizer, SAMPLE_PROMPTS, args.sample_tokens)
            for i, text in enumerate(samples):
                print0(f"  sample {i}: {text!r}")
            tracker.log({f"samples/{i}": text for i, text in enumerate(samples)}, step=step)
        if last:
            break

        timer.start()
        loss_sum = torch.zeros((), device=device)
        for loader in loaders:
            x, y = loader.next_batch()
            loss = train_model(x, y)
            loss_sum += loss.detach()
            (
                loss / grad_accum
            ).backward()  # mean over this rank's micro-steps; optimizers average over ranks
        grad_norm = clip_grad_norm_(optimizers, args.grad_clip if args.grad_clip > 0 else None)
        lrm = lr_multiplier(
            step, num_iterations, args.warmup_ratio, args.warmdown_ratio, args.final_lr_frac
        )
        momentum = muon_momentum(step, args.momentum_warmup_steps)
        set_lr(optimizers, lrm, momentum)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        timer.stop()
        dt = timer.last
        step += 1
        stats["train_time"], stats["timed_steps"] = timer.total, timer.count
        if step % args.log_every == 0 or step == num_iterations:
            if info.is_ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            train_loss = loss_sum.item() / (grad_accum * world_size)
            stop_if_not_finite(grad_norm.item(), "the gradient norm", step, ckpt_dir)
            stop_if_not_finite(train_loss, "the training loss", step, ckpt_dir)
            stats["train_loss"] = train_loss
            stats["smooth_loss"] = ema_beta * stats["smooth_loss"] + (1 - ema_beta) * train_loss
            stats["smooth_count"] += 1
            smooth = stats["smooth_loss"] / (1 - ema_beta ** stats["smooth_count"])
            tok_per_sec = total_batch_size / dt
            metrics = {
                "train/loss": train_loss,
                "train/loss_smooth": smooth,
                "train/lrm": lrm,
                "train/muon_momentum": momentum,
                "train/grad_norm": grad_norm.item(),
                "train/tok_per_sec": tok_per_sec,
                "train/step_time_s": dt,
                "train/tokens": step * total_batch_size,
                "train/mem_mb": memory_mb(device),
                "train/data_passes": loaders[0].passes,
            }
            if loaders[0].epoch >= 1 and not stats.get("data_repeat_noted"):
                stats["data_repeat_noted"] = True  # said once per run (kept across resumes)
                print0(
                    f"note: the training data ran out by step {step}: the documents now repeat (pass "
                    f"{loaders[0].epoch + 1}). More data: more shards (run_aquarat_small.sh --shards N, "
                    f"python -m nanochat.dataset -n N) or a smaller --num-iterations"
                )
            mfu_text = ""
            if peak:  # percent of the devices' peak bf16 FLOP/s
                metrics["train/mfu"] = 100.0 * flops_per_token * tok_per_sec / (peak * world_size)
                mfu_text = f" | mfu {metrics['train/mfu']:.1f}%"
            tracker.log(metrics, step=step)
            print0(
                f"step {step:05d}/{num_iterations} | loss {train_loss:.4f} (smooth {smooth:.4f}) | lrm {lrm:.3f} "
                f"| gnorm {grad_norm.item():.3f} | {dt * 1000:.0f} ms | {tok_per_sec:,.0f} tok/s{mfu_text}"
            )

        if step == num_iterations or (args.save_every > 0 and step % args.save_every == 0):
            meta = {
                "model_config": asdict(config),
                "tokenizer": tokenizer_record(tokenizer),
                "stage": STAGE,
                "tag": tag,
                "num_iterations": num_iterations,
                "grad_accum": grad_accum,
                "total_batch_size": total_batch_size,
                "device_batch_size": device_batch,
                "stats": stats,
                "args": vars(args),
            }
            save(
                ckpt_dir,
                step,
                model,
                optimizers,
                meta,
                rank,
                args.keep_last,
                {"loaders": [loader.state_dict() for loader in loaders]},
            )

    # ---- wrap up (figures accumulate over resumes)
    train_time, timed_steps = stats["train_time"], stats["timed_steps"]
    avg_tok_per_sec = total_batch_size * timed_steps / train_time if train_time > 0 else None
    avg_mfu = (
        100.0 * flops_per_token * avg_tok_per_sec / (peak * world_size)
        if (peak and avg_tok_per_sec)
        else None
    )
    summary = {
        "final/val_bpb": stats["val_bpb"],
        "final/min_val_bpb": stats["min_val_bpb"],
        "final/train_loss": stats["train_loss"],
        "final/tok_per_sec": avg_tok_per_sec,
        "final/mfu": avg_mfu,
        "final/steps": num_iterations,
        "final/tokens": num_iterations * total_batch_size,
        "final/mem_mb": memory_mb(device),
        "final/train_time_s": train_time,
        "final/data_passes": loaders[0].passes,
    }
    tracker.summary(summary)
    tracker.finish()
    if rank == 0:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines = [
            "## Base model pretraining (base_train)",
            "",
            f"- checkpoint: `{ckpt_dir}` (step {num_iterations})",
            f"- model: depth {config.n_layer}, n_embd {config.n_embd}, {config.n_head} heads, "
            f"vocab {config.vocab_size}, context {config.sequence_len}, {num_params:,} parameters",
            f"- data: source `{args.source}`; {num_iterations} steps x {total_batch_size:,} tokens = "
            f"{num_iterations * total_batch_size:,} tokens "
            f"({num_iterations * total_batch_size / budget_params:.2f} tokens/param, budget from {budget_rule}); {loaders[0].passes:.2f} passes over the training "
            f"documents"
            + (
                " (they repeated: more shards would have given fresh text)"
                if loaders[0].epoch >= 1
                else ""
            ),
            f"- layout: {world_size} process(es) x {grad_accum} micro-steps x {device_batch} rows on "
            f"{device.type} ({autodetect_dtype(device)})",
            f"- lrs: embedding {args.embedding_lr}, unembedding {args.unembedding_lr}, matrix {args.matrix_lr}, "
            f"weight decay {args.weight_decay}, warmup {args.warmup_ratio}, warmdown {args.warmdown_ratio}",
            f"- final train loss: {fmt(stats['train_loss'])}",
            f"- validation bits per byte: final {fmt(stats['val_bpb'])}, best {fmt(stats['min_val_bpb'])}",
            f"- throughput: {avg_tok_per_sec:,.0f} tok/s"
            if avg_tok_per_sec
            else "- throughput: n/a (no timed steps)",
            f"- MFU: {avg_mfu:.1f}%"
            if avg_mfu is not None
            else "- MFU: n/a (peak FLOPs unknown for this device)",
            f"- peak memory: {memory_mb(device):,.0f} MiB ({'CUDA allocated' if device.type == 'cuda' else 'process RSS'})",
            f"- training time: {train_time:.1f} s over {timed_steps} timed steps (first step of each session excluded)",
        ]
        if samples:
            lines += ["", "Greedy samples:", ""] + [f"    {s!r}" for s in samples]
        write_section(base_dir, args.run, "base_train", "\n".join(lines))
    cleanup_distributed()


if __name__ == "__main__":
    main()
