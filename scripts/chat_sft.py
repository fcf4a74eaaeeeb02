"""Supervised fine-tuning on chat conversations (also the engine of mid-training: scripts/mid_train.py).

    python -m scripts.chat_sft                                    # from the mid checkpoint (or base)
    python -m scripts.chat_sft --aqua-source hf --aqua_train_examples=20000 --aqua_val_examples=254
    torchrun --standalone --nproc_per_node=8 -m scripts.chat_sft
    python -m scripts.chat_sft --aqua-source synthetic --synthetic-examples 4000 --num-epochs 2   # CPU

What it does: loads the previous stage's checkpoint (sft: mid, falling back to base with a note when
no mid checkpoint exists; mid: base; --source-stage picks another), builds a task mixture from the
data flags (nanochat/chat_data.py), and trains with the loss on assistant tokens only
(render_conversation's mask; everything else is target -1).

Loss normalisation: one optimizer step's loss is the sum of token losses over all its micro-batches
on all ranks divided by the number of trained tokens in the whole step (all-reduced), so a long
conversation weighs by its tokens, not by its micro-batch, and a micro-batch whose targets are all
masked contributes exactly 0 (never 0/0 = NaN).

One step = world_size * grad_accum * device_batch_size conversations. Eval loss (mean per trained token)
on held-out conversations every --eval-every steps. Checkpoints: <base>/checkpoints/<stage>/<tag>/,
resumed automatically by re-running the same command; --fresh starts over (deleting them).
Logs (stage "sft" / "mid"): train/loss, val/loss, train/lr, train/lrm, train/tok_per_sec, ...
Report section: <base>/report/<stage>.md.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.chat_data import (
    ConversationLoader,
    add_data_args,
    answer_letter_ids,
    build_mixture,
    iter_eval_batches,
    letter_hits,
    resolve_aqua_source,
)
from nanochat.checkpoint import checkpoint_dir, find_last_step, load_model
from nanochat.common import (
    autodetect_dtype,
    cleanup_distributed,
    get_base_dir,
    init_distributed,
    print0,
    seed_everything,
)
from nanochat.gpt import maybe_compile
from nanochat.optim import clip_grad_norm_
from nanochat.report import write_section
from nanochat.tokenizer import tokenizer_record
from nanochat.tracking import add_tracking_args, make_tracker
from nanochat.training import (
    StepTimer,
    refuse_changed_flags,
    save,
    set_lr,
    start_or_resume,
    stop_if_not_finite,
    warmdown_multiplier,
)

# Per-stage defaults: mid-training is the longer, higher-lr pass right after pretraining; SFT a gentle
# final pass. Everything is a flag.
STAGE_DEFAULTS = {
    "mid": {"source_stage": "base", "init_lr_frac": 1.0, "num_epochs": 1.0, "warmdown_ratio": 0.2},
    "sft": {"source_stage": "mid", "init_lr_frac": 0.05, "num_epochs": 1.0, "warmdown_ratio": 1.0},
}
TITLES = {"mid": "Mid-training (mid_train)", "sft": "Supervised fine-tuning (chat_sft)"}


def build_parser(stage: str) -> argparse.ArgumentParser:
    d = STAGE_DEFAULTS[stage]
    p = argparse.ArgumentParser(
        prog=f"python -m scripts.{'mid_train' if stage == 'mid' else 'chat_sft'}",
        description=f"{TITLES[stage]}: train on a conversation task mixture with the loss on assistant tokens "
        f"(see scripts/chat_sft.py's docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("source checkpoint")
    g.add_argument(
        "--source-stage",
        default=None,
        choices=["base", "mid", "sft", "rl"],
        help=f"stage to start from (default {d['source_stage']}"
        + (", or base when no mid checkpoint exists)" if stage == "sft" else ")"),
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
        "--device-batch-size", type=int, default=8, help="conversations per micro-batch per process"
    )
    g.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step per process"
    )
    g.add_argument(
        "--num-iterations", type=int, default=-1, help="optimizer steps (-1: from --num-epochs)"
    )
    g.add_argument(
        "--num-epochs", type=float, default=d["num_epochs"], help="passes over the training mixture"
    )
    g = p.add_argument_group("optimization")
    g.add_argument(
        "--embedding-lr", type=float, default=0.2, help="AdamW lr of the embedding (x init-lr-frac)"
    )
    g.add_argument(
        "--unembedding-lr", type=float, default=0.004, help="AdamW lr of lm_head (x init-lr-frac)"
    )
    g.add_argument(
        "--matrix-lr", type=float, default=0.02, help="Muon lr of block matrices (x init-lr-frac)"
    )
    g.add_argument("--weight-decay", type=float, default=0.0)
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
    g.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0: off)")
    g.add_argument("--seed", type=int, default=42, help="data-order seed")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument(
        "--eval-every", type=int, default=100, help="eval loss every N steps (0: only at the end)"
    )
    g.add_argument(
        "--eval-examples", type=int, default=400, help="held-out conversations per eval (-1: all)"
    )
    g.add_argument("--log-every", type=int, default=10, help="log training metrics every N steps")
    g.add_argument(
        "--save-every",
        type=int,
        default=500,
        help="checkpoint every N steps (0: only the final one)",
    )
    g.add_argument(
        "--keep-last", type=int, default=2, help="keep this many newest checkpoints (0: all)"
    )
    g.add_argument("--tag", default=None, help="output checkpoint tag (default: the source's tag)")
    g.add_argument(
        "--resume",
        default="auto",
        choices=["auto", "require"],
        help="auto: resume if this stage/tag has a checkpoint; require: fail if there is none",
    )
    g.add_argument(
        "--fresh", action="store_true", help="DELETE this stage/tag's checkpoints and start over"
    )
    add_tracking_args(p)
    return p


def has_checkpoint(stage: str, tag: str | None) -> bool:
    root = get_base_dir() / "checkpoints" / stage
    dirs = [root / tag] if tag else (list(root.iterdir()) if root.is_dir() else [])
    return any(find_last_step(d) is not None for d in dirs if d.is_dir())


def main(argv=None, stage: str = "sft") -> dict:
    args = build_parser(stage).parse_args(argv)
    info = init_distributed()
    device, rank, world_size = info.device, info.rank, info.world_size
    base_dir = get_base_dir()

    # ---- source checkpoint (mid <- base, sft <- mid or base)
    source_stage = args.source_stage or STAGE_DEFAULTS[stage]["source_stage"]
    if args.source_stage is None and stage == "sft" and not has_checkpoint("mid", args.source_tag):
        print0(
            "note: no mid checkpoint found; SFT starts from the base checkpoint "
            "(run scripts.mid_train first for the full pipeline)"
        )
        source_stage = "base"
    if not has_checkpoint(source_stage, args.source_tag):
        where = base_dir / "checkpoints" / source_stage / (args.source_tag or "*")
        raise SystemExit(
            f"no {source_stage} checkpoint at {where}: train that stage first "
            f"(scripts.{ {'base': 'base_train', 'mid': 'mid_train'}.get(source_stage, source_stage) }) "
            f"or pass --source-stage/--source-tag"
        )
    model, tokenizer, src_meta = load_model(
        source_stage, tag=args.source_tag, step=args.source_step, device=device, phase="train"
    )
    config = model.config
    tag = args.tag or src_meta.get("tag") or args.source_tag or f"d{config.n_layer}"
    seq_len = args.max_seq_len or config.sequence_len
    print0(
        f"{stage}: source {source_stage}/{src_meta.get('tag', '?')} step {src_meta.get('step')} -> "
        f"{stage}/{tag}; model depth {config.n_layer}, n_embd {config.n_embd}, vocab {config.vocab_size}, "
        f"{model.num_params():,} params; seq len {seq_len}"
    )

    # ---- data
    train_task, train_desc = build_mixture(args, "train", device, seed=args.seed)
    val_task, val_desc = build_mixture(args, "val", device, seed=args.seed)
    print0(
        f"train mixture: {train_desc} = {len(train_task)} conversations (AQuA source: "
        f"{resolve_aqua_source(args, device)})"
    )
    print0(f"val mixture:   {val_desc}" + (f" = {len(val_task)} conversations" if val_task else ""))
    per_step = world_size * args.grad_accum * args.device_batch_size
    if args.num_iterations > 0:
        num_iterations = args.num_iterations
    else:
        num_iterations = max(1, int(args.num_epochs * len(train_task)) // per_step)
    print0(
        f"{num_iterations} steps x {per_step} conversations ({world_size} proc x {args.grad_accum} micro x "
        f"{args.device_batch_size}) = {num_iterations * per_step / len(train_task):.2f} epochs"
    )

    # ---- checkpoint: fresh start or resume
    ckpt_dir = checkpoint_dir(stage, tag)
    optimizers = model.setup_optimizers(
        unembedding_lr=args.unembedding_lr,
        embedding_lr=args.embedding_lr,
        matrix_lr=args.matrix_lr,
        weight_decay=args.weight_decay,
    )
    start_step, resumed, rank_state = start_or_resume(
        ckpt_dir, info, model, optimizers, args.fresh, args.resume
    )
    if resumed is not None:
        refuse_changed_flags(ckpt_dir, start_step, resumed.get("args", {}), args)
    if resumed is not None and (
        resumed.get("num_iterations") != num_iterations or resumed.get("per_step") != per_step
    ):
        raise SystemExit(
            f"{ckpt_dir} step {start_step} belongs to a run of {resumed.get('num_iterations')} steps "
            f"x {resumed.get('per_step')} conversations; these flags give {num_iterations} x "
            f"{per_step}. Keep the flags (and process count) to resume, or use --fresh / another --tag."
        )
    loader_state = rank_state["loader"] if rank_state else None
    if resumed is None:
        seed_everything(args.seed)
    train_model = maybe_compile(model, device)
    compiled = train_model is not model
    loader = ConversationLoader(
        train_task,
        tokenizer,
        args.device_batch_size,
        seq_len,
        grad_accum=args.grad_accum,
        rank=rank,
        world_size=world_size,
        seed=args.seed,
        device=device,
        state=loader_state,
        fixed_shapes=compiled,
    )  # a few bucket lengths: few recompiles under compile

    letter_ids = answer_letter_ids(tokenizer)
    letter_vocab = torch.tensor(sorted(letter_ids), device=device) if letter_ids else None

    letter_tasks = sorted({t.name for t in val_task.tasks}) if val_task is not None else []

    @torch.no_grad()
    def evaluate_val() -> tuple[float | None, dict]:
        """(mean loss per trained token, {task: teacher-forced answer-letter accuracy}) on held-out conversations.
        The letter accuracy: given the gold rationale, is the gold letter the most likely of " A".." E"?
        On AQuA-RAT it separates "can find the option" from "can compute the value" (chat_eval scores both);
        on synthetic problems whose rationale checks the options, the gold checks name the option, so it
        only says the checks are being followed -- chat_eval's generative accuracy is the real figure."""
        if val_task is None:
            return None, {}
        model.eval()
        tot = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, trained tokens
        letters = torch.zeros(
            len(letter_tasks), 2, device=device, dtype=torch.float64
        )  # hits, count per task
        for x, y, letter_pos in iter_eval_batches(
            val_task,
            tokenizer,
            args.device_batch_size,
            seq_len,
            rank,
            world_size,
            args.eval_examples,
            device,
        ):
            logits = model(x)
            tot[0] += F.cross_entropy(
                logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum"
            ).double()
            tot[1] += (y != -1).sum()
            if letter_pos and letter_vocab is not None:
                hits = letter_hits(logits, y, letter_pos, letter_vocab)
                for (_, _, name), hit in zip(letter_pos, hits.tolist()):
                    letters[letter_tasks.index(name)] += torch.tensor(
                        [float(hit), 1.0], device=device, dtype=torch.float64
                    )
        if info.is_ddp:
            dist.all_reduce(tot, op=dist.ReduceOp.SUM)
            dist.all_reduce(letters, op=dist.ReduceOp.SUM)
        model.train()
        accs = {
            name: (letters[i, 0] / letters[i, 1]).item()
            for i, name in enumerate(letter_tasks)
            if letters[i, 1] > 0
        }
        return (tot[0] / tot[1].clamp(min=1)).item(), accs

    run_config = {
        **vars(args),
        "stage": stage,
        "tag": tag,
        "source_stage": source_stage,
        "source_tag": src_meta.get("tag"),
        "source_step": src_meta.get("step"),
        "num_iterations": num_iterations,
        "per_step": per_step,
        "world_size": world_size,
        "device": str(device),
        "dtype": str(autodetect_dtype(device)),
        "model_config": asdict(config),
        "train_mixture": train_desc,
        "val_mixture": val_desc,
        "seq_len": seq_len,
        "resumed_from": start_step,
    }
    tracker = make_tracker(args, stage, run_config)

    # ---- training loop (step = optimizer steps already taken)
    val_loss, first_val, min_val, letter_acc = None, None, float("inf"), {}
    last_loss, trained_tokens_total = float("nan"), 0
    timer = StepTimer(device, start_step, num_iterations)
    step = start_step
    model.train()
    while True:
        last = step == num_iterations
        if last or (args.eval_every > 0 and step % args.eval_every == 0):
            val_loss, letter_acc = evaluate_val()
            if val_loss is not None:
                first_val = val_loss if first_val is None else first_val
                min_val = min(min_val, val_loss)
                extra = "".join(f" | letter acc {k} {v:.3f}" for k, v in letter_acc.items())
                print0(f"step {step:05d}/{num_iterations} | val loss {val_loss:.4f}{extra}")
                tracker.log(
                    {
                        "val/loss": val_loss,
                        **{f"val/letter_acc/{k}": v for k, v in letter_acc.items()},
                    },
                    step=step,
                )
        if last:
            break

        timer.start()
        micro = loader.next_step()
        # the step's trained-token count over every micro-batch and rank: the loss denominator
        counts = torch.tensor(
            [
                float(sum(int((y != -1).sum()) for _, y in micro)),
                float(sum(x.numel() for x, _ in micro)),
            ],
            device=device,
            dtype=torch.float64,
        )
        if info.is_ddp:
            dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        n_target = max(counts[0].item(), 1.0)
        loss_sum = torch.zeros((), device=device)
        for x, y in micro:
            loss = train_model(x, y, loss_reduction="sum")  # 0 when every target is masked
            loss_sum += loss.detach()
            # optimizers average gradients over ranks, hence * world_size to get sum / global count
            (loss * (world_size / n_target)).backward()
        grad_norm = clip_grad_norm_(optimizers, args.grad_clip if args.grad_clip > 0 else None)
        lrm = warmdown_multiplier(step, num_iterations, args.warmdown_ratio)
        set_lr(optimizers, args.init_lr_frac * lrm)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        timer.stop()
        dt = timer.last
        step += 1
        trained_tokens_total += int(counts[0].item())

        if step % args.log_every == 0 or step == num_iterations:
            if info.is_ddp:
                dist.all_reduce(loss_sum, op=dist.ReduceOp.SUM)
            last_loss = loss_sum.item() / n_target
            stop_if_not_finite(grad_norm.item(), "the gradient norm", step, ckpt_dir)
            stop_if_not_finite(last_loss, "the training loss", step, ckpt_dir)
            tok_per_sec = counts[1].item() / dt
            metrics = {
                "train/loss": last_loss,
                "train/lrm": lrm,
                "train/lr": args.matrix_lr * args.init_lr_frac * lrm,
                "train/grad_norm": grad_norm.item(),
                "train/tok_per_sec": tok_per_sec,
                "train/trained_tokens": counts[0].item(),
                "train/epoch": loader.epoch,
                "train/step_time_s": dt,
                # share of the micro-batches' token slots that held padding (this rank, so far)
                "train/pad_frac": 1 - loader.real_tokens / max(1, loader.padded_tokens),
            }
            tracker.log(metrics, step=step)
            print0(
                f"step {step:05d}/{num_iterations} | loss {last_loss:.4f} | lrm {lrm:.3f} | gnorm "
                f"{grad_norm.item():.3f} | {int(counts[0].item())} trained tok | {dt * 1000:.0f} ms | "
                f"{tok_per_sec:,.0f} tok/s | epoch {loader.epoch:.2f}"
            )

        if step == num_iterations or (args.save_every > 0 and step % args.save_every == 0):
            meta = {
                "model_config": asdict(config),
                "tokenizer": tokenizer_record(tokenizer),
                "stage": stage,
                "tag": tag,
                "num_iterations": num_iterations,
                "per_step": per_step,
                "source_stage": source_stage,
                "source_tag": src_meta.get("tag"),
                "source_step": src_meta.get("step"),
                "train_loss": last_loss,
                "val_loss": val_loss,
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
                {"loader": loader.state_dict()},
            )

    # ---- wrap up
    summary = {
        "final/train_loss": last_loss,
        "final/val_loss": val_loss,
        **{f"final/letter_acc/{k}": v for k, v in letter_acc.items()},
        "final/min_val_loss": min_val if min_val < float("inf") else None,
        "final/steps": num_iterations,
        "final/train_time_s": timer.total,
    }
    tracker.summary(summary)
    tracker.finish()
    if rank == 0:
        truncated = loader.truncated
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        lines = [
            f"## {TITLES[stage]}",
            "",
            f"- checkpoint: `{ckpt_dir}` (step {num_iterations}), from {source_stage}/{src_meta.get('tag', '?')} "
            f"step {src_meta.get('step')}",
            f"- train mixture: {train_desc} = {len(train_task)} conversations; AQuA source "
            f"`{resolve_aqua_source(args, device)}`",
            f"- val mixture: {val_desc}",
            f"- {num_iterations} steps x {per_step} conversations = {num_iterations * per_step / len(train_task):.2f} "
            f"epochs; context {seq_len} (conversations truncated on rank 0: {truncated})",
            f"- lrs x {args.init_lr_frac}: embedding {args.embedding_lr}, unembedding {args.unembedding_lr}, "
            f"matrix {args.matrix_lr}; warmdown {args.warmdown_ratio}",
            f"- final train loss: {fmt(last_loss)}",
            f"- val loss (per assistant token): first {fmt(first_val)}, final {fmt(val_loss)}, best "
            f"{fmt(summary['final/min_val_loss'])}",
            "- teacher-forced answer-letter accuracy (val, gold rationale given; chance 0.2): "
            + (", ".join(f"{k} {v:.3f}" for k, v in letter_acc.items()) or "n/a"),
            f"- training time: {timer.total / 60:.1f} min on {world_size} x {device.type}",
        ]
        write_section(base_dir, args.run, stage, "\n".join(lines))
    cleanup_distributed()
    return {
        "val_loss": val_loss,
        "letter_acc": letter_acc,
        "train_loss": last_loss,
        "ckpt_dir": str(ckpt_dir),
        "steps": num_iterations,
    }


if __name__ == "__main__":
    main(stage="sft")
