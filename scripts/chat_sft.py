"""Supervised fine-tuning on chat conversations, and mid-training (scripts/mid_train.py runs this
file with the mid stage's defaults).

    uv run python -m scripts.chat_sft                       # from the mid checkpoint (or base)
    uv run python -m scripts.chat_sft --aqua-source hf --aqua-train-examples 20000 \\
        --aqua-val-examples 254
    uv run torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft
    uv run python -m scripts.chat_sft --aqua-source synthetic --synthetic-examples 4000   # CPU

Loads the previous stage's checkpoint (sft: mid, or base when there is no mid checkpoint; mid:
base), builds the task mixture the data flags ask for (nanochat/chat_mixture.py) and trains with
the loss on the assistant's tokens only. A step is --total-batch-size conversations whatever the
number of processes (each process takes its share in micro-batches of --device-batch-size), so a
run on one GPU and on eight is the same run; every --eval-every steps the held-out loss and
answer-letter accuracy are measured.
Checkpoints go to <base>/checkpoints/<stage>/<tag>/ and the same command resumes from the newest;
--fresh starts over. Logs: <base>/runs/<run>/<stage>.jsonl (and W&B); report: <stage>.md.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanochat.chat_loader import ConversationLoader
from nanochat.chat_mixture import add_data_args, build_mixture, resolve_aqua_source
from nanochat.chat_val import evaluate_val
from nanochat.checkpoint import checkpoint_dir, find_last_step, load_model
from nanochat.common import (
    autodetect_dtype,
    cleanup_distributed,
    init_distributed,
    print0,
    seed_everything,
)
from nanochat.compile import maybe_compile
from nanochat.files import get_base_dir
from nanochat.optim import clip_grad_norm_, overlap_grad_sync
from nanochat.report import write_section
from nanochat.tokenizer import tokenizer_record
from nanochat.tracking import add_tracking_args, make_tracker
from nanochat.training import (
    StepTimer,
    add_checkpoint_args,
    add_optimizer_args,
    batch_layout,
    refuse_changed_flags,
    save,
    set_lr,
    setup_optimizers,
    start_or_resume,
    stop_if_not_finite,
    warmdown_multiplier,
)

# Flags that may change on a resume besides the common ones (nanochat/training.HARMLESS_FLAGS): the
# micro-batch only splits the --total-batch-size conversations of a step differently.
RESUME_HARMLESS = {"device_batch_size"}
# Mid-training is the longer, hotter pass right after pretraining; SFT a gentle final one.
STAGE_DEFAULTS = {
    "mid": {"source_stage": "base", "init_lr_frac": 1.0, "num_epochs": 1.0, "warmdown_ratio": 0.2},
    "sft": {"source_stage": "mid", "init_lr_frac": 0.05, "num_epochs": 1.0, "warmdown_ratio": 1.0},
}
TITLES = {"mid": "Mid-training (mid_train)", "sft": "Supervised fine-tuning (chat_sft)"}
TRAINING_SCRIPT = {"base": "base_train", "mid": "mid_train", "sft": "chat_sft", "rl": "chat_rl"}


def build_parser(stage: str) -> argparse.ArgumentParser:
    d = STAGE_DEFAULTS[stage]
    p = argparse.ArgumentParser(
        prog=f"uv run python -m scripts.{TRAINING_SCRIPT[stage]}",
        description=f"{TITLES[stage]}: train on a conversation task mixture with the loss on "
        "assistant tokens (see scripts/chat_sft.py's docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("source checkpoint")
    fallback = ", or base when no mid checkpoint exists" if stage == "sft" else ""
    g.add_argument(
        "--source-stage",
        default=None,
        choices=["base", "mid", "sft", "rl"],
        help=f"stage to start from (default {d['source_stage']}{fallback})",
    )
    g.add_argument(
        "--source-tag", default=None, help="tag of the source checkpoint (default: its latest tag)"
    )
    g.add_argument(
        "--source-step",
        type=int,
        default=None,
        help="step of the source checkpoint (default: last)",
    )
    add_data_args(p)
    g = p.add_argument_group("batch and budget")
    g.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="tokens per conversation (longer ones are truncated; default: the model's context)",
    )
    g.add_argument(
        "--total-batch-size",
        type=int,
        default=32,
        help="conversations per optimizer step, over all processes (the same on 1 GPU and on 8)",
    )
    g.add_argument(
        "--device-batch-size",
        type=int,
        default=None,
        help="conversations per micro-batch per process (default: the largest of 8, 4, 2, 1 that "
        "divides the per-process share; micro-batches per step follow)",
    )
    g.add_argument(
        "--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)"
    )
    g.add_argument(
        "--num-epochs", type=float, default=d["num_epochs"], help="passes over the training mixture"
    )
    g = p.add_argument_group("optimization")
    add_optimizer_args(g, lr_note=" (x --init-lr-frac)", fine_tuning=True)
    g.add_argument(
        "--init-lr-frac",
        type=float,
        default=d["init_lr_frac"],
        help="multiplier on the three lrs above (pretraining lrs are too hot for fine-tuning)",
    )
    g.add_argument(
        "--warmdown-ratio",
        type=float,
        default=d["warmdown_ratio"],
        help="fraction of steps at the end over which the lr decays linearly to 0",
    )
    g.add_argument("--seed", type=int, default=42, help="data-order seed")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument(
        "--eval-every", type=int, default=100, help="eval loss every N steps (0: only at the end)"
    )
    g.add_argument(
        "--eval-examples", type=int, default=400, help="held-out conversations per eval (-1: all)"
    )
    g.add_argument("--log-every", type=int, default=10, help="log training metrics every N steps")
    add_checkpoint_args(g, save_every=500, tag_help="output checkpoint tag (default: the source's)")
    add_tracking_args(p)
    return p


def main(argv=None, stage: str = "sft") -> dict:
    args = build_parser(stage).parse_args(argv)
    info = init_distributed()

    # ---- the model to start from, the data, the number of steps
    model, tokenizer, run = load_source(args, stage, info)
    train_task, val_task = load_data(run, info)

    # ---- optimizers, and a resume of this stage's checkpoint if there is one
    optimizers = setup_optimizers(model, args)
    start_step, loader_state = resume_or_start(
        run.ckpt_dir, info, model, optimizers, args, run.plan
    )
    train_model = maybe_compile(model, info.device)
    # compiled: a few bucket lengths, so a few graphs, instead of one per batch length
    loader = ConversationLoader(
        train_task,
        tokenizer,
        run.device_batch,
        run.seq_len,
        grad_accum=run.grad_accum,
        rank=info.rank,
        world_size=info.world_size,
        seed=args.seed,
        device=info.device,
        state=loader_state,
        fixed_shapes=train_model is not model,
    )
    tracker = make_tracker(args, stage, run_config(run, model, start_step, info))

    # ---- the training loop: `step` optimizer steps are done
    num_iterations = run.plan["num_iterations"]
    scores = {"val_losses": [], "val_loss": None, "letter_acc": {}, "train_loss": float("nan")}
    timer = StepTimer(info.device, start_step, num_iterations)
    model.train()
    for step in range(start_step, num_iterations + 1):
        last = step == num_iterations
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            val_loss, letter_acc = evaluate_val(
                model,
                val_task,
                tokenizer,
                run.device_batch,
                run.seq_len,
                info,
                args.eval_examples,
            )
            if val_loss is not None:
                scores.update(val_loss=val_loss, letter_acc=letter_acc)
                scores["val_losses"].append(val_loss)
                log_val(tracker, step, num_iterations, val_loss, letter_acc)
        if last:
            break

        timer.start()
        lrm = warmdown_multiplier(step, num_iterations, args.warmdown_ratio)
        micro_batches = loader.next_step()
        loss_sum, counts, grad_norm = train_step(
            train_model,
            model,
            optimizers,
            micro_batches,
            args.init_lr_frac * lrm,
            args.grad_clip,
            info,
        )
        timer.stop()
        done = step + 1
        if done % args.log_every == 0 or done == num_iterations:
            if info.is_ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            scores["train_loss"] = loss_sum.item() / max(counts[0].item(), 1.0)
            stop_if_not_finite(grad_norm.item(), "the gradient norm", done, run.ckpt_dir)
            stop_if_not_finite(scores["train_loss"], "the training loss", done, run.ckpt_dir)
            log_train(tracker, done, run, loader, timer.last, lrm, scores, grad_norm.item(), counts)
        if done == num_iterations or (args.save_every > 0 and done % args.save_every == 0):
            meta = checkpoint_meta(run, model, tokenizer, scores)
            state = {"loader": loader.state_dict()}
            save(run.ckpt_dir, done, model, optimizers, meta, info.rank, args.keep_last, state)

    result = finish(run, tracker, scores, loader, timer, info)
    cleanup_distributed()
    return result


def has_checkpoint(stage: str, tag: str | None) -> bool:
    root = get_base_dir() / "checkpoints" / stage
    dirs = [root / tag] if tag else (list(root.iterdir()) if root.is_dir() else [])
    return any(find_last_step(d) is not None for d in dirs if d.is_dir())


def pick_source_stage(args, stage: str) -> str:
    """The stage whose checkpoint this one starts from; SFT falls back to base with a note."""
    source = args.source_stage or STAGE_DEFAULTS[stage]["source_stage"]
    if args.source_stage is None and stage == "sft" and not has_checkpoint("mid", args.source_tag):
        print0(
            "note: no mid checkpoint found; SFT starts from the base checkpoint "
            "(run scripts.mid_train first for the full pipeline)"
        )
        source = "base"
    if not has_checkpoint(source, args.source_tag):
        where = get_base_dir() / "checkpoints" / source / (args.source_tag or "*")
        raise SystemExit(
            f"no {source} checkpoint at {where}: train that stage first "
            f"(scripts.{TRAINING_SCRIPT[source]}) or pass --source-stage/--source-tag"
        )
    return source


def resume_or_start(ckpt_dir, info, model, optimizers, args, plan: dict):
    """(first step, the data loader's saved state or None); a resume must keep the run's plan."""
    start_step, resumed, rank_state = start_or_resume(
        ckpt_dir, info, model, optimizers, args.fresh, args.resume
    )
    if resumed is None:
        seed_everything(args.seed)
        return 0, None
    refuse_changed_flags(ckpt_dir, start_step, resumed.get("args", {}), args, RESUME_HARMLESS)
    saved = {k: resumed.get(k) for k in plan}
    if saved != plan:
        raise SystemExit(
            f"{ckpt_dir} step {start_step} belongs to a run of {saved['num_iterations']} steps "
            f"x {saved['per_step']} conversations; these flags give {plan['num_iterations']} x "
            f"{plan['per_step']}. Keep the flags (and process count) to resume, or use --fresh / "
            f"another --tag."
        )
    return start_step, rank_state["loader"]


def train_step(train_model, model, optimizers, micro_batches, lr_multiplier, grad_clip, info):
    """One optimizer step over this rank's micro-batches -> (loss sum, [trained, input] token
    counts over all ranks, gradient norm)."""
    # The step's loss is the sum of its token losses over every micro-batch and rank, divided by
    # the number of trained tokens in the whole step: a long answer weighs by its tokens, not by
    # the micro-batch it landed in, and an all-masked micro-batch adds exactly 0 (never 0/0).
    counts = torch.tensor(
        [
            float(sum(int((y != -1).sum()) for _, y in micro_batches)),
            float(sum(x.numel() for x, _ in micro_batches)),
        ],
        device=info.device,
        dtype=torch.float64,
    )
    if info.is_ddp:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    trained_tokens = max(counts[0].item(), 1.0)
    loss_sum = torch.zeros((), device=info.device)
    for i, (x, y) in enumerate(micro_batches):
        loss = train_model(x, y, loss_reduction="sum")
        loss_sum += loss.detach()
        if i == len(micro_batches) - 1:  # the last backward sends the gradients as they complete
            overlap_grad_sync(optimizers)
        # the optimizers average gradients over ranks: * world_size turns that mean into the sum
        (loss * (info.world_size / trained_tokens)).backward()
    grad_norm = clip_grad_norm_(optimizers, grad_clip if grad_clip > 0 else None)
    set_lr(optimizers, lr_multiplier)
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss_sum, counts, grad_norm


def load_source(args, stage: str, info):
    """(model, tokenizer, run): the checkpoint this stage starts from, and what the run is."""
    source_stage = pick_source_stage(args, stage)
    model, tokenizer, src_meta = load_model(
        source_stage, tag=args.source_tag, step=args.source_step, device=info.device, phase="train"
    )
    config = model.config
    tag = args.tag or src_meta.get("tag") or args.source_tag or f"d{config.n_layer}"
    run = SimpleNamespace(
        stage=stage,
        args=args,
        tag=tag,
        ckpt_dir=checkpoint_dir(stage, tag),
        seq_len=args.max_seq_len or config.sequence_len,
        source={"stage": source_stage, "tag": src_meta.get("tag"), "step": src_meta.get("step")},
    )
    print0(
        f"{stage}: source {source_stage}/{run.source['tag'] or '?'} step {run.source['step']} "
        f"-> {stage}/{tag}; depth {config.n_layer}, n_embd {config.n_embd}, vocab "
        f"{config.vocab_size}, {model.num_params():,} params; seq len {run.seq_len}"
    )
    return model, tokenizer, run


def load_data(run, info):
    """(train mixture, val mixture or None); sets the run's plan (steps x conversations)."""
    args, device, world_size = run.args, info.device, info.world_size
    train_task, run.train_desc = build_mixture(args, "train", device, seed=args.seed)
    val_task, run.val_desc = build_mixture(args, "val", device, seed=args.seed)
    run.aqua_source = resolve_aqua_source(args, device)
    run.conversations = len(train_task)
    print0(
        f"train mixture: {run.train_desc} = {run.conversations} conversations (AQuA: "
        f"{run.aqua_source})"
    )
    val_size = f" = {len(val_task)} conversations" if val_task else ""
    print0(f"val mixture:   {run.val_desc}{val_size}")
    run.device_batch, run.grad_accum = batch_layout(
        args.total_batch_size, args.device_batch_size, world_size, "conversations"
    )
    per_step = args.total_batch_size
    num_iterations = args.num_iterations
    if num_iterations <= 0:
        num_iterations = max(1, int(args.num_epochs * run.conversations) // per_step)
    run.plan = {"num_iterations": num_iterations, "per_step": per_step}
    run.epochs = num_iterations * per_step / run.conversations
    print0(
        f"{num_iterations} steps x {per_step} conversations ({world_size} proc x "
        f"{run.grad_accum} micro x {run.device_batch}) = {run.epochs:.2f} epochs"
    )
    return train_task, val_task


def run_config(run, model, start_step, info) -> dict:
    """What the tracker records about the run (W&B's config)."""
    return {
        **vars(run.args),
        **run.plan,
        "stage": run.stage,
        "tag": run.tag,
        **{f"source_{k}": v for k, v in run.source.items()},
        "world_size": info.world_size,
        "device": str(info.device),
        "dtype": str(autodetect_dtype(info.device)),
        "model_config": asdict(model.config),
        "train_mixture": run.train_desc,
        "val_mixture": run.val_desc,
        "seq_len": run.seq_len,
        "resumed_from": start_step,
    }


def checkpoint_meta(run, model, tokenizer, scores) -> dict:
    return {
        "model_config": asdict(model.config),
        "tokenizer": tokenizer_record(tokenizer),
        "stage": run.stage,
        "tag": run.tag,
        **run.plan,
        **{f"source_{k}": v for k, v in run.source.items()},
        "train_loss": scores["train_loss"],
        "val_loss": scores["val_loss"],
        "args": vars(run.args),
    }


def finish(run, tracker, scores, loader, timer, info) -> dict:
    """The summary, the report section and main's return value."""
    best_val = min(scores["val_losses"], default=None)
    letter_acc = scores["letter_acc"]
    summary = {
        "final/train_loss": scores["train_loss"],
        "final/val_loss": scores["val_loss"],
        **{f"final/letter_acc/{k}": v for k, v in letter_acc.items()},
        "final/min_val_loss": best_val,
        "final/steps": run.plan["num_iterations"],
        "final/train_time_s": timer.total,
    }
    tracker.summary(summary)
    tracker.finish()
    if info.rank == 0:
        facts = {
            "ckpt_dir": run.ckpt_dir,
            "source": run.source,
            **run.plan,
            "conversations": run.conversations,
            "train_desc": run.train_desc,
            "val_desc": run.val_desc,
            "aqua_source": run.aqua_source,
            "epochs": run.epochs,
            "seq_len": run.seq_len,
            "truncated": loader.truncated,
            "train_loss": scores["train_loss"],
            "first_val": scores["val_losses"][0] if scores["val_losses"] else None,
            "val_loss": scores["val_loss"],
            "best_val": best_val,
            "letter_acc": letter_acc,
            "minutes": timer.total / 60,
            "hardware": f"{info.world_size} x {info.device.type}",
        }
        lines = report_lines(run.stage, run.args, facts)
        write_section(get_base_dir(), run.args.run, run.stage, "\n".join(lines))
    return {
        "val_loss": scores["val_loss"],
        "letter_acc": letter_acc,
        "train_loss": scores["train_loss"],
        "ckpt_dir": str(run.ckpt_dir),
        "steps": run.plan["num_iterations"],
    }


def log_val(tracker, step, num_iterations, val_loss, letter_acc) -> None:
    extra = "".join(f" | letter acc {k} {v:.3f}" for k, v in letter_acc.items())
    print0(f"step {step:05d}/{num_iterations} | val loss {val_loss:.4f}{extra}")
    metrics = {"val/loss": val_loss, **{f"val/letter_acc/{k}": v for k, v in letter_acc.items()}}
    tracker.log(metrics, step=step)


def log_train(tracker, step, run, loader, dt, lrm, scores, grad_norm, counts) -> None:
    args, loss = run.args, scores["train_loss"]
    trained_tokens, input_tokens = counts[0].item(), counts[1].item()
    tok_per_sec = input_tokens / dt
    metrics = {
        "train/loss": loss,
        "train/lrm": lrm,
        "train/lr": args.matrix_lr * args.init_lr_frac * lrm,
        "train/grad_norm": grad_norm,
        "train/tok_per_sec": tok_per_sec,
        "train/trained_tokens": trained_tokens,
        "train/epoch": loader.epoch,
        "train/step_time_s": dt,
        # share of the micro-batches' token slots that held padding (this rank, so far)
        "train/pad_frac": 1 - loader.real_tokens / max(1, loader.padded_tokens),
    }
    tracker.log(metrics, step=step)
    print0(
        f"step {step:05d}/{run.plan['num_iterations']} | loss {loss:.4f} | lrm {lrm:.3f} | gnorm "
        f"{grad_norm:.3f} | {int(trained_tokens)} trained tok | {dt * 1000:.0f} ms | "
        f"{tok_per_sec:,.0f} tok/s | epoch {loader.epoch:.2f}"
    )


def report_lines(stage, args, f: dict) -> list[str]:
    def fmt(v):
        return "n/a" if v is None else f"{v:.4f}"

    letters = ", ".join(f"{k} {v:.3f}" for k, v in f["letter_acc"].items()) or "n/a"
    return [
        f"## {TITLES[stage]}",
        "",
        f"- checkpoint: `{f['ckpt_dir']}` (step {f['num_iterations']}), from "
        f"{f['source']['stage']}/{f['source']['tag'] or '?'} step {f['source']['step']}",
        f"- train mixture: {f['train_desc']} = {f['conversations']} conversations; AQuA source "
        f"`{f['aqua_source']}`",
        f"- val mixture: {f['val_desc']}",
        f"- {f['num_iterations']} steps x {f['per_step']} conversations = "
        f"{f['epochs']:.2f} epochs; context {f['seq_len']} (conversations truncated on rank 0: "
        f"{f['truncated']})",
        f"- lrs x {args.init_lr_frac}: embedding {args.embedding_lr}, unembedding "
        f"{args.unembedding_lr}, matrix {args.matrix_lr}; warmdown {args.warmdown_ratio}",
        f"- final train loss: {fmt(f['train_loss'])}",
        f"- val loss (per assistant token): first {fmt(f['first_val'])}, final "
        f"{fmt(f['val_loss'])}, best {fmt(f['best_val'])}",
        "- teacher-forced answer-letter accuracy (val, gold rationale given; chance 0.2): "
        + letters,
        f"- training time: {f['minutes']:.1f} min on {f['hardware']}",
    ]


if __name__ == "__main__":
    main(stage="sft")
