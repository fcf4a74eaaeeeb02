"""GRPO-style RL on AQuA-style multiple choice, with diagnostics of how the policy moves.

    uv run python -m scripts.chat_rl                                       # from the sft checkpoint
    uv run python -m scripts.chat_rl --aqua-source hf --num-steps 300  # AQuA-RAT train, eval on dev
    uv run torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl --examples-per-step 64

One step (the loop in main: five calls, one module each):
1. rollouts (nanochat/rollouts.py): --examples-per-step questions (split across ranks),
   --num-samples completions each, decoded together at temperature 1 with no top-k/top-p, so the
   tokens come from the very distribution the policy gradient differentiates. Sample seeds depend
   on (--seed, step, question, sample) only: the same rollouts on any number of ranks and after a
   resume.
2. rewards (the task's: tasks/aqua.py, AquaStyleTask.reward): 1 when the task grades the completion
   right (two different answer letters earn 0), plus an optional --format-reward for one
   well-formed final "Answer: X", annealed to 0 over --format-anneal-steps.
3. advantages (nanochat/rl.py): reward minus the group mean (--adv-std-norm: over the group's
   sample std as well). A group whose rewards are all equal carries no signal and gets no backward
   pass (unless --kl-coef).
4. the update (nanochat/rl.py): the clipped surrogate per completion token, plus an optional k3 KL
   penalty to the reference (--kl-coef; 0 by default: KL is tracked, not optimised), normalised
   over the GLOBAL batch (--loss-norm). --ppo-epochs > 1 reuses the batch, one optimizer step per
   pass.
5. diagnostics (nanochat/diagnostics.py), of the policy before the update: letter KL, sequence KL,
   letter margin and predicted-letter counts against the frozen reference; attention entropy per
   layer on fixed probes every --attn-every steps, heatmaps every --attn-heatmap-every.
Every --eval-every steps and at the end: rl/acc, greedy accuracy on the validation split, and
pass@k over --eval-samples samples (nanochat/mc_eval.py, shared with chat_eval).

Every knob is a field of nanochat/rl_config.RLConfig (the flags are generated from it).
Checkpoints: <base>/checkpoints/rl/<tag>/ every --save-every steps and at the end; the same command
resumes (a SIGKILLed run ends with the weights of an uninterrupted one on CPU fp32).
Logs: stage "rl" (<base>/runs/<run>/rl.jsonl and W&B); report section "rl".
"""

from __future__ import annotations

import math
from dataclasses import asdict

from nanochat import rl
from nanochat.checkpoint import checkpoint_dir, load_model
from nanochat.common import (
    autodetect_dtype,
    cleanup_distributed,
    gather_by_name,
    init_distributed,
    print0,
    reduce_by_name,
)
from nanochat.diagnostics import Diagnostics, step_diagnostics
from nanochat.engine import Engine
from nanochat.files import get_base_dir
from nanochat.mc_eval import generative_eval
from nanochat.report import report_dir, write_section
from nanochat.rl_config import RESUME_SAFE, parse_config
from nanochat.rollouts import format_bonus, sample_rollouts
from nanochat.tokenizer import tokenizer_record
from nanochat.tracking import make_tracker
from nanochat.training import (
    StepTimer,
    refuse_changed_flags,
    save,
    set_lr,
    setup_optimizers,
    start_or_resume,
    stop_if_not_finite,
    warmdown_multiplier,
)
from tasks.aqua import AquaRat
from tasks.synthetic_aqua import SyntheticAqua

STAGE = "rl"


def main(argv=None) -> dict:
    # ---- setup: config, processes, the policy and its frozen reference, problems, optimizer
    cfg = parse_config(argv)
    info = init_distributed()
    device, rank, world = info.device, info.rank, info.world_size
    if not cfg.on_policy:
        print0(
            "WARNING: temperature != 1 or top-k/top-p: the samples do not come from the policy's "
            "own distribution, so the loss's ratio and the tracked sequence KL are off-policy "
            "estimates"
        )
    base_dir = get_base_dir()
    model, ref_model, tokenizer, src_meta, tag = load_policy_and_reference(cfg, device)
    source = resolve_source(cfg, device)
    train_task = load_split(cfg, source, "train", cfg.train_examples)
    val_task = load_split(cfg, source, "validation", cfg.eval_problems)
    n_eval = len(val_task) if cfg.eval_problems < 0 else min(cfg.eval_problems, len(val_task))
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    max_len = model.config.sequence_len
    diagnostics = Diagnostics(cfg, ref_model, tokenizer, train_task, val_task, max_len, pad_id)
    if diagnostics.letter_ids is None:
        print0(
            "note: ' A'..' E' are not single tokens after 'Answer:' in this tokenizer: letter KL "
            "and margins are off"
        )
    print0(
        f"rl: {cfg.source_stage}/{src_meta.get('tag')} step {src_meta.get('step')} -> rl/{tag}; "
        f"{source} problems: {len(train_task)} train, {n_eval} validation; {cfg.num_steps} "
        f"steps x {cfg.examples_per_step} questions x {cfg.num_samples} samples on {world} x "
        f"{device.type}"
    )
    optimizers = setup_optimizers(model, cfg)
    ckpt_dir = checkpoint_dir(STAGE, tag)
    start_step, kept = resume(ckpt_dir, info, model, optimizers, cfg, src_meta)
    meta = checkpoint_meta(cfg, model, tokenizer, tag, src_meta)
    run_config = {**asdict(cfg), **{k: meta[k] for k in ("stage", "tag", "model_config")}}
    run_config.update(source_tag=src_meta.get("tag"), source_step=src_meta.get("step"))
    run_config.update(problem_source=source, world_size=world, device=str(device))
    run_config.update(dtype=str(autodetect_dtype(device)), resumed_from=start_step)
    tracker = make_tracker(cfg, STAGE, run_config)
    engine = Engine(model, tokenizer)
    timer = StepTimer(device, start_step, cfg.num_steps, kept["train_time"], kept["timed_steps"])
    last_eval = {}

    # ---- the loop: `step` = RL steps already taken
    step = start_step
    while True:
        last = step == cfg.num_steps
        if last or step == start_step or (cfg.eval_every > 0 and step % cfg.eval_every == 0):
            last_eval = evaluate(engine, val_task, n_eval, cfg, kept)
            drift = diagnostics.weight_drift(model) if rank == 0 else {}
            tracker.log({**last_eval, **drift}, step=step)
            print0(f"step {step:04d}/{cfg.num_steps} | eval " + _format(last_eval))
        if rank == 0 and (
            attn := diagnostics.attention(model, step, last, report_dir(base_dir, cfg.run))
        ):
            tracker.log(attn, step=step)
        if last:
            break

        timer.start()
        lrm = warmdown_multiplier(step, cfg.num_steps, cfg.warmdown_ratio)
        set_lr(optimizers, cfg.init_lr_frac * lrm)
        rollouts = sample_rollouts(engine, train_task, step, cfg, rank, world)  # 1, 2 (rewards)
        adv, zero_signal = rl.group_advantages(rollouts.rewards(), cfg.adv_std_norm)  # 3
        moved = diagnostics.measure(model, rollouts, step)  # 5: the policy before the update
        update = rl.policy_update(  # 4
            model, ref_model, optimizers, rollouts.groups, adv, zero_signal, cfg, info, pad_id
        )
        timer.stop()
        step += 1

        stop_if_not_finite(update["grad_norm"], "the gradient norm", step, ckpt_dir)
        metrics = step_metrics(rollouts, zero_signal, update, moved, train_task, cfg, info)
        metrics.update({"rl/lr": cfg.matrix_lr * cfg.init_lr_frac * lrm, "rl/lrm": lrm})
        metrics["rl/step_time_s"] = timer.last
        samples_due = cfg.log_samples_every > 0 and step % cfg.log_samples_every == 0
        if rank == 0 and (samples_due or step == cfg.num_steps):
            metrics.update(diagnostics.samples(rollouts, adv, step))
        metrics["rl/format_bonus"] = format_bonus(
            cfg.format_reward, cfg.format_anneal_steps, step - 1
        )
        tracker.log(metrics, step=step)
        print_step(step, metrics, cfg, timer.last)
        if step == cfg.num_steps or (cfg.save_every > 0 and step % cfg.save_every == 0):
            kept.update(train_time=timer.total, timed_steps=timer.count)
            state = {**meta, "stats": kept, "eval": last_eval}
            save(ckpt_dir, step, model, optimizers, state, rank, cfg.keep_last, {})

    # ---- summary and report
    summary = {
        "final/acc": last_eval.get("rl/acc"),
        "final/first_acc": kept["first_acc"],
        "final/best_acc": kept["best_acc"],
        "final/steps": cfg.num_steps,
        "final/train_time_s": timer.total,
    }
    if f"rl/pass@{cfg.eval_samples}" in last_eval:
        summary[f"final/pass@{cfg.eval_samples}"] = last_eval[f"rl/pass@{cfg.eval_samples}"]
    tracker.summary(summary)
    tracker.finish()
    if rank == 0:
        problems = f"{source}, {len(train_task)} train questions; rl/acc on {n_eval}"
        write_report(base_dir, cfg, src_meta, tag, problems, kept, last_eval, timer, info)
    cleanup_distributed()
    return {
        "acc": last_eval.get("rl/acc"),
        "first_acc": kept["first_acc"],
        "ckpt_dir": str(ckpt_dir),
        **last_eval,
    }


# ------------------------------------------------------------------------------------------------
# setup


def load_policy_and_reference(cfg, device):
    """(policy, frozen reference or None, tokenizer, source meta, output tag): both models start
    from the same source checkpoint; the reference is only loaded when something reads it."""
    source = dict(tag=cfg.source_tag, step=cfg.source_step, device=device)
    model, tokenizer, src_meta = load_model(cfg.source_stage, **source, phase="train")
    ref_model = None
    if cfg.diagnostics or cfg.kl_coef > 0:
        ref_model, _, _ = load_model(cfg.source_stage, **source, phase="eval")
        ref_model.requires_grad_(False)
    tag = cfg.tag or src_meta.get("tag") or f"d{model.config.n_layer}"
    if cfg.source_stage == STAGE and tag == src_meta.get("tag"):
        raise SystemExit(
            f"-i rl with output tag {tag!r} would train into its own source (and --fresh would "
            f"delete it): pass another --tag"
        )
    return model, ref_model, tokenizer, src_meta, tag


def resolve_source(cfg, device) -> str:
    if cfg.aqua_source != "auto":
        return cfg.aqua_source
    if cfg.aqua_data_dir:
        return "dir"
    return "hf" if device.type == "cuda" else "synthetic"


def load_split(cfg, source: str, split: str, n: int):
    """The task of one split: AQuA-RAT (hf/dir) or synthetic problems; n < 0 = the whole split."""
    if source == "synthetic":
        size = n if n > 0 else (20000 if split == "train" else 254)
        seed = cfg.synthetic_seed if split == "train" else 0
        return SyntheticAqua(
            split, num_examples=size, difficulty=cfg.synthetic_difficulty, seed=seed
        )
    data_dir = cfg.aqua_data_dir if source == "dir" else None
    try:
        task = AquaRat(split, data_dir=data_dir, max_examples=None if n < 0 else n)
    except Exception as exc:
        where = f"--aqua-data-dir {data_dir}" if data_dir else "Hugging Face deepmind/aqua_rat"
        raise SystemExit(
            f"AQuA-RAT {split} could not be loaded from {where} ({type(exc).__name__}: {exc}). "
            f"Pass --aqua-data-dir, or use --aqua-source synthetic offline."
        ) from exc
    if len(task) == 0:
        raise SystemExit(
            f"AQuA-RAT {split} from {task.source} has no valid rows: nothing to train or score on"
        )
    return task


def resume(ckpt_dir, info, model, optimizers, cfg, src_meta) -> tuple[int, dict]:
    """(first step, the run's kept statistics): step 0 and fresh statistics, or those of the last
    checkpoint of this tag when it was written by the same settings, ranks and source."""
    start_step, resumed, _ = start_or_resume(
        ckpt_dir, info, model, optimizers, cfg.fresh, cfg.resume
    )
    kept = {"first_acc": None, "best_acc": None, "train_time": 0.0, "timed_steps": 0}
    if resumed is None:
        return start_step, kept
    refuse_changed_flags(ckpt_dir, start_step, resumed.get("args", {}), cfg, RESUME_SAFE)
    if resumed.get("world_size") != info.world_size:  # start_or_resume refuses it first
        raise SystemExit(
            f"{ckpt_dir} step {start_step} was written by {resumed.get('world_size')} "
            f"process(es), this run has {info.world_size}: resume with the same number, or --fresh"
        )
    began = (resumed.get("source_tag"), resumed.get("source_step"))
    if began != (src_meta.get("tag"), src_meta.get("step")):
        raise SystemExit(
            f"{ckpt_dir} started from {cfg.source_stage}/{began[0]} step {began[1]}, but the "
            f"reference now resolves to {src_meta.get('tag')} step {src_meta.get('step')}: "
            f"pass --source-tag {began[0]} --source-step {began[1]} to resume, or --fresh"
        )
    kept.update(resumed.get("stats", {}))
    return start_step, kept


def checkpoint_meta(cfg, model, tokenizer, tag: str, src_meta: dict) -> dict:
    """What every checkpoint of this run records besides its statistics and last evaluation."""
    return {
        "model_config": asdict(model.config),
        "tokenizer": tokenizer_record(tokenizer),
        "stage": STAGE,
        "tag": tag,
        "args": asdict(cfg),
        "source_stage": cfg.source_stage,
        "source_tag": src_meta.get("tag"),
        "source_step": src_meta.get("step"),
        "num_iterations": cfg.num_steps,
    }


# ------------------------------------------------------------------------------------------------
# evaluation, step metrics, report


def evaluate(engine, task, n: int, cfg, kept: dict) -> dict:
    """rl/acc (greedy) and pass@k at temperature 1 on the first n validation problems, all ranks;
    keeps the first and best accuracy in `kept`."""
    res = generative_eval(
        engine,
        engine.tokenizer,
        task,
        n,
        cfg.max_new_tokens,
        cfg.eval_prompts,
        cfg.eval_samples,
        temperature=1.0,
        seed=cfg.seed * 7,
    )
    out = {"rl/acc": res.acc}
    # per-letter recall: a bias toward some letters shows as spread, whatever the gold mix
    out.update({f"rl/eval_letter_recall/{k}": v for k, v in res.letter_recall.items()})
    out["rl/eval_letter_recall_std"] = res.letter_recall_std
    if cfg.eval_samples > 1:
        out[f"rl/pass@{cfg.eval_samples}"] = res.pass_at_k
        out["rl/eval_sample_acc"] = res.sample_acc
    if kept["first_acc"] is None:
        kept["first_acc"] = res.acc
    kept["best_acc"] = max(kept["best_acc"] or 0.0, res.acc)
    return out


def step_metrics(rollouts, zero_signal, update, moved, task, cfg, info) -> dict:
    """Everything logged for one step, reduced over ranks by name (sums, a maximum and lists).

    update: rl.policy_update's statistics; moved: Diagnostics.measure's (sums, lists)."""
    rows = rollouts.rows()
    diag_sums, diag_lists = moved
    sums = {
        "completions": len(rows),
        "reward": sum(c.reward for c in rows),
        "reward_sq": sum(c.reward**2 for c in rows),
        "correct": sum(c.correct for c in rows),
        "tokens": sum(c.length for c in rows),
        "truncated": sum(not c.finished for c in rows),
        "zero_signal": float(zero_signal.sum()),
        "groups": len(rows) // cfg.num_samples,
        **{k: update[k] for k in ("clipped", "clip_tokens", "logprob_gap", "gap_tokens")},
        **diag_sums,
    }
    s = reduce_by_name(sums, info)
    longest = reduce_by_name({"len": max(c.length for c in rows)}, info, op="max")["len"]
    rollout_s = rollouts.seconds
    n = max(s["completions"], 1.0)
    mean_reward = s["reward"] / n
    out = {
        "rl/mean_reward": mean_reward,
        "rl/reward_std": math.sqrt(max(s["reward_sq"] / n - mean_reward**2, 0.0)),
        "rl/sample_acc": s["correct"] / n,
        "rl/completion_len_mean": s["tokens"] / n,
        "rl/completion_len_max": longest,
        "rl/truncation_rate": s["truncated"] / n,
        "rl/zero_signal_groups": s["zero_signal"],
        "rl/groups": s["groups"],
        "rl/clip_frac": s["clipped"] / max(s["clip_tokens"], 1.0),
        "rl/logprob_gap_mean": s["logprob_gap"] / max(s["gap_tokens"], 1.0),
        "rl/update_skipped": float(update["skipped"]),
        "rl/grad_norm": update["grad_norm"],
        "rl/rollout_time_s": rollout_s,
        "rl/rollout_tok_per_s": s["tokens"] / max(rollout_s, 1e-9),  # all ranks' new tokens
    }
    out.update(step_diagnostics(s, gather_by_name(diag_lists, info), task.letters))
    return out


def _format(metrics: dict) -> str:
    return " | ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def print_step(step: int, metrics: dict, cfg, step_s: float) -> None:
    if metrics["rl/truncation_rate"] > cfg.truncation_warn:
        print0(
            f"WARNING step {step}: {metrics['rl/truncation_rate']:.0%} of the completions hit "
            f"--max-new-tokens {cfg.max_new_tokens} (raise it, or --mask-truncated)"
        )
    if step % cfg.log_every and step != cfg.num_steps:
        return
    kl = ""
    if cfg.diagnostics:
        kl = (
            f" | kl seq {metrics['rl/kl_sequence_mean']:.4f} "
            f"letter {metrics['rl/kl_letter_mean']:.4f} "
            f"| margin {metrics['rl/letter_margin_mean']:.2f}"
        )
    signal = f"{int(metrics['rl/zero_signal_groups'])}/{int(metrics['rl/groups'])}"
    print0(
        f"step {step:04d}/{cfg.num_steps} | reward {metrics['rl/mean_reward']:.3f} | "
        f"zero-signal {signal}{kl} | len {metrics['rl/completion_len_mean']:.0f} | "
        f"{step_s:.2f}s (rollout {metrics['rl/rollout_time_s']:.2f}s, "
        f"{metrics['rl/rollout_tok_per_s']:,.0f} tok/s)"
    )


def write_report(base_dir, cfg, src_meta, tag, problems, kept, last_eval, timer, info) -> None:
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    pass_k = last_eval.get(f"rl/pass@{cfg.eval_samples}")
    lines = [
        "## Reinforcement learning (chat_rl)",
        "",
        f"- checkpoint: `{checkpoint_dir(STAGE, tag)}` (step {cfg.num_steps}), from "
        f"{cfg.source_stage}/{src_meta.get('tag')} step {src_meta.get('step')}; the reference "
        f"model is that checkpoint, frozen",
        f"- problems: {problems} validation problems (greedy)",
        f"- {cfg.num_steps} steps x {cfg.examples_per_step} questions x {cfg.num_samples} "
        f"samples, max {cfg.max_new_tokens} new tokens, temperature {cfg.temperature}",
        f"- loss: {cfg.loss_norm}-normalised clipped policy gradient (eps {cfg.clip_eps}/"
        f"{cfg.clip_eps_high}, {cfg.ppo_epochs} epoch(s)), KL coefficient {cfg.kl_coef}, "
        f"advantage std-norm {cfg.adv_std_norm}, format reward {cfg.format_reward}",
        f"- validation accuracy (greedy): start {fmt(kept['first_acc'])} -> end "
        f"{fmt(last_eval.get('rl/acc'))} (best {fmt(kept['best_acc'])})"
        + (f"; pass@{cfg.eval_samples} {fmt(pass_k)}" if pass_k is not None else ""),
        f"- training time: {timer.total / 60:.1f} min on {info.world_size} x {info.device.type}",
    ]
    write_section(base_dir, cfg.run, STAGE, "\n".join(lines))


if __name__ == "__main__":
    main()
