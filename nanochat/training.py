"""The training-loop plumbing that base_train, chat_sft / mid_train and chat_rl share: resume, the
lr schedule, checkpoint saves that refuse non-finite weights, step timing and the shared flags.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from nanochat.checkpoint import (
    CheckpointWriteError,
    find_last_step,
    load_checkpoint,
    read_meta,
    restore_rng_state,
    save_checkpoint,
    save_rng_state,
)
from nanochat.common import print0, synchronize
from nanochat.config import add_fields, knob, resume_safe
from nanochat.tracking import TrackingKnobs


def start_or_resume(ckpt_dir, info, model, optimizers, fresh: bool, resume: str):
    """-> (start step, meta of the resumed checkpoint or None, this rank's saved state or None).

    The newest complete checkpoint in ckpt_dir, if any, is loaded into the model and optimizers and
    this rank's RNG restored. fresh: delete ckpt_dir first. resume "require": fail when there is
    nothing to resume. A checkpoint of a model of another shape is refused.
    """
    if fresh and resume == "require":
        raise SystemExit("--fresh and --resume require contradict each other")
    if fresh:
        if info.rank == 0 and ckpt_dir.exists():
            print0(f"--fresh: deleting {ckpt_dir}")
            shutil.rmtree(ckpt_dir)
        if info.is_ddp:
            dist.barrier()
    last_step = None if fresh else find_last_step(ckpt_dir)
    if last_step is None:
        if resume == "require":
            raise SystemExit(f"--resume require: no complete checkpoint in {ckpt_dir}")
        return 0, None, None
    saved_world = read_meta(ckpt_dir, last_step).get("world_size", 1)
    if saved_world != info.world_size:
        # The optimizer state would re-shard (load_checkpoint(world_size=...)), but each rank's
        # data-loader position and RNG state belong to the rank that saved them.
        raise SystemExit(
            f"{ckpt_dir} step {last_step} was written by {saved_world} process(es), this run has "
            f"{info.world_size}: resume with --nproc_per_node={saved_world}, or start over with "
            f"--fresh (or another --tag)."
        )
    model_state, optim_states, meta = load_checkpoint(
        ckpt_dir, step=last_step, device=info.device, load_optimizer=True, rank=info.rank
    )
    saved = dict(meta.get("model_config") or {})
    ours = asdict(model.config)
    # fields added since the checkpoint was written take their defaults: the model it was
    saved = {**{k: v for k, v in asdict(type(model.config)()).items() if k not in saved}, **saved}
    if saved != ours:
        differ = ", ".join(
            f"{k}: {saved.get(k)} in the checkpoint, {v} here"
            for k, v in ours.items()
            if saved.get(k) != v
        )
        raise SystemExit(
            f"{ckpt_dir} holds another model ({differ}). Use --fresh to overwrite it, "
            f"another --tag, or the flags it was trained with."
        )
    model.load_state_dict(model_state, strict=True)
    for opt, state in zip(optimizers, optim_states):
        try:
            opt.load_state_dict(state)
        except ValueError as exc:  # its parameter groups are not the ones these flags build
            raise SystemExit(
                f"{ckpt_dir} step {last_step}: its optimizer state does not fit the optimizer "
                f"these flags build ({exc}); checkpoints of mid/SFT/RL from before "
                f"--value-embed-lr trained the value embeddings with the token embedding. Finish "
                f"such a run with "
                f"the code it started with, or start over with --fresh / another --tag."
            ) from None
    rank_state = meta["rank_state"][info.rank]
    restore_rng_state(rank_state["rng"])
    print0(f"Resuming {ckpt_dir} from step {last_step}")
    return last_step, meta, rank_state


def refuse_changed_flags(ckpt_dir, step: int, old_args: dict, args, harmless=()) -> None:
    """Stop when a resume would continue a run with flags that change what it trains."""
    skip = HARMLESS_FLAGS | set(harmless)
    changed = [
        f"--{k.replace('_', '-')} {old_args[k]} -> {v}"
        for k, v in vars(args).items()
        if k in old_args and k not in skip and old_args[k] != v
    ]
    if changed:
        raise SystemExit(
            f"{ckpt_dir} step {step} was trained with other settings ({', '.join(changed)}). "
            f"Resume with the same flags, or start over with --fresh (run_aquarat_small.sh: "
            f"--force), or use another --run / --tag."
        )


def batch_layout(total: int, device_batch: int | None, world_size: int, what: str = "rows"):
    """(device batch, micro-batches per process) that make `total` rows per optimizer step on
    world_size processes, so that a run is the same run on 1 GPU and on 8 (only the split differs).
    device_batch None: the largest of 8, 4, 2, 1 that divides the per-process share. A layout that
    cannot make the total exactly is refused, naming the numbers."""
    if total <= 0 or total % world_size:
        raise SystemExit(
            f"--total-batch-size {total} {what} per step cannot be split evenly over {world_size} "
            f"processes: use a positive multiple of {world_size}"
        )
    share = total // world_size
    if device_batch is None:
        device_batch = next(b for b in (8, 4, 2, 1) if share % b == 0)
    if device_batch <= 0 or share % device_batch:
        raise SystemExit(
            f"--total-batch-size {total} {what} per step on {world_size} process(es) is {share} "
            f"per process, which --device-batch-size {device_batch} does not divide: pick a device "
            f"batch that divides {share} (the micro-batches per process follow from it)"
        )
    return device_batch, share // device_batch


def warmdown_multiplier(step: int, num_steps: int, warmdown_ratio: float) -> float:
    """1.0, then linear decay to 0 over the last warmdown_ratio of the steps (chat stages)."""
    warmdown = round(warmdown_ratio * num_steps)
    if warmdown <= 0 or step < num_steps - warmdown:
        return 1.0
    return max(0.0, (num_steps - step) / warmdown)


def set_lr(optimizers, multiplier: float, momentum: float | None = None) -> None:
    """The schedule's multiplier on every param group's initial lr (and Muon's momentum)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * multiplier
            if momentum is not None and "momentum" in group:  # Muon groups
                group["momentum"] = momentum


def stop_if_not_finite(value: float, what: str, step: int, ckpt_dir) -> None:
    """End the stage when `value` (a loss, a gradient norm) is NaN or infinite: training on would
    only spread it through the weights. The newest checkpoint on disk is from before."""
    if math.isfinite(value):
        return
    last = find_last_step(ckpt_dir)
    kept = (
        f"the newest checkpoint, step {last} in {ckpt_dir}, is intact"
        if last
        else "no checkpoint was saved"
    )
    raise SystemExit(
        f"{what} is {value} at step {step}: stopped, and nothing from this step on is saved; "
        f"{kept}. Lower the learning rate, then run the same command (it resumes) or start "
        f"over with --fresh."
    )


def save(
    ckpt_dir, step: int, model, optimizers, meta: dict, rank: int, keep_last: int, rank_state: dict
) -> None:
    """Checkpoint `step` on every rank (save_checkpoint synchronises them), with this rank's RNG
    state added to its rank_state. Non-finite weights are refused: a run that blew up must never
    overwrite a good checkpoint."""
    params = list(model.named_parameters())
    # one flag per parameter, stacked: one device sync instead of one per parameter
    finite = torch.stack([p.detach().isfinite().all() for _, p in params])
    if not bool(finite.all()):
        bad = [name for (name, _), ok in zip(params, finite.tolist()) if not ok]
        last = find_last_step(ckpt_dir)
        raise SystemExit(
            f"the weights are not finite at step {step} ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): not saved; the newest checkpoint in {ckpt_dir} "
            f"is step {last}, intact. Lower the learning rate, then resume or use --fresh."
        )
    try:
        save_checkpoint(
            ckpt_dir,
            step,
            model.state_dict(),
            [opt.state_dict() for opt in optimizers],
            meta,
            rank=rank,
            keep_last=keep_last,
            rank_state={**rank_state, "rng": save_rng_state()},
        )
    except CheckpointWriteError as exc:
        raise SystemExit(str(exc)) from None


class StepTimer:
    """timer.start(); ...one optimizer step...; timer.stop() -> timer.last (s); total/count over the
    timed steps.

    The first step of each session is left out of total/count: it pays for warm-up and
    torch.compile, so throughput figures survive a resume."""

    def __init__(
        self, device, start_step: int, num_iterations: int, total: float = 0.0, count: int = 0
    ):
        self.device = device
        self.total = total
        self.count = count
        self.last = 0.0
        self.first = start_step + 1
        # a session of a single step times it anyway: there is nothing else to time
        self.only_one = num_iterations - start_step == 1
        self.step = start_step

    def start(self) -> None:
        synchronize(self.device)  # queued GPU work would otherwise land in the wrong step
        self._t0 = time.time()

    def stop(self) -> None:
        synchronize(self.device)
        self.last = time.time() - self._t0
        self.step += 1
        if self.step > self.first or self.only_one:
            self.total += self.last
            self.count += 1


@dataclass
class OptimizerKnobs:
    """The optimizer knobs of every training stage ({lr_note}: what scales the lrs, if anything)."""

    embedding_lr: float = knob(
        0.2, "AdamW lr of the token embedding{lr_note}", group="optimization"
    )
    unembedding_lr: float = knob(0.004, "AdamW lr of lm_head{lr_note}", group="optimization")
    matrix_lr: float = knob(0.02, "Muon lr of the block matrices{lr_note}", group="optimization")
    weight_decay: float = knob(0.0, "decoupled weight decay", group="optimization")
    grad_clip: float = knob(
        1.0, "global grad-norm clip (0: off; the norm is logged anyway)", group="optimization"
    )


@dataclass
class FineTuningOptimizerKnobs(OptimizerKnobs):
    """Fine-tuning stages also set the value embeddings' lr, 0 (frozen) by default."""

    value_embed_lr: float = knob(
        0.0,
        "AdamW lr of the value-embedding tables{lr_note}; 0 keeps them as pretraining left them "
        "(mid-training them cost accuracy: docs/experiments.md)",
        group="optimization",
    )


@dataclass
class CheckpointKnobs:
    """How often a training stage saves, how many it keeps, whether it resumes."""

    save_every: int = knob(
        0, "checkpoint every N steps (0: only the final one)", group="checkpoints", resume_safe=True
    )
    keep_last: int = knob(
        2, "keep this many newest checkpoints (0: all)", group="checkpoints", resume_safe=True
    )
    resume: str = knob(
        "auto",
        "auto: resume if this stage/tag has a checkpoint; require: fail if there is none",
        group="checkpoints",
        choices=["auto", "require"],
        resume_safe=True,
    )
    fresh: bool = knob(
        False,
        "DELETE this stage/tag's checkpoints and start over",
        group="checkpoints",
        resume_safe=True,
    )


def setup_optimizers(model, settings) -> list:
    """The model's optimizers with the lrs and weight decay of `settings` (parsed flags or a
    config with the optimizer knobs); the value embeddings' lr where the stage has that knob."""
    names = ["embedding_lr", "unembedding_lr", "matrix_lr", "weight_decay", "value_embed_lr"]
    return model.setup_optimizers(
        **{k: getattr(settings, k) for k in names if hasattr(settings, k)}
    )


def add_optimizer_args(group, lr_note: str = "", fine_tuning: bool = False) -> None:
    """The optimizer flags of a stage whose parser is hand-written (base_train, chat_sft)."""
    knobs = FineTuningOptimizerKnobs if fine_tuning else OptimizerKnobs
    add_fields(group, knobs, notes={"lr_note": lr_note})


def add_checkpoint_args(group, save_every: int, tag_help: str | None = None) -> None:
    """The checkpoint flags of a hand-written parser, and --tag, the checkpoints' name, unless the
    stage declares it elsewhere (tag_help None)."""
    add_fields(group, CheckpointKnobs, defaults={"save_every": save_every})
    if tag_help is not None:
        group.add_argument("--tag", default=None, help=tag_help)


# Flags every stage may change on a resume: they change what is logged or kept, not what is trained
# (the knob groups' own resume_safe fields, and the cadences of base_train's and chat_sft's
# hand-written parsers).
HARMLESS_FLAGS = {
    "eval_every",
    "eval_tokens",
    "eval_examples",
    "sample_every",
    "sample_tokens",
    "log_every",
    *resume_safe(CheckpointKnobs),
    *resume_safe(TrackingKnobs),
}
