"""Every knob of the RL stage (scripts/chat_rl.py), one line of help each, and their checks.

The command-line flags are generated from the fields (nanochat/config.py): `--num-samples` is
`RLConfig.num_samples`. A field marked resume_safe may change when a run resumes from a checkpoint:
it changes what is measured or how work is batched, not what is trained.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from nanochat.config import add_knobs, from_namespace, knob, resume_safe, with_default
from nanochat.tracking import TrackingKnobs
from nanochat.training import CheckpointKnobs, FineTuningOptimizerKnobs

SOURCE = "source checkpoint (the policy's start and the frozen reference)"
PROBLEMS = "problems"
ROLLOUTS = "rollouts"
REWARD = "reward and advantage"
LOSS = "loss"
OPTIMIZATION = "optimization"
EVALUATION = "evaluation and diagnostics"


@dataclass
class RLConfig(FineTuningOptimizerKnobs, CheckpointKnobs, TrackingKnobs):
    GROUPS = (SOURCE, PROBLEMS, ROLLOUTS, REWARD, LOSS, OPTIMIZATION, EVALUATION, "checkpoints")

    # ---- source checkpoint
    source_stage: str = knob(
        "sft", "stage to start from", group=SOURCE, choices=["mid", "sft", "rl"], aliases=("-i",)
    )
    source_tag: str | None = knob(
        None, "tag of the source checkpoint (default: its latest)", group=SOURCE, type=str,
        resume_safe=True,
    )  # fmt: skip
    source_step: int | None = knob(
        None, "step of the source checkpoint (default: last)", group=SOURCE, type=int,
        resume_safe=True,
    )  # fmt: skip
    tag: str | None = knob(
        None, "output checkpoint tag (default: the source's tag)", group=SOURCE, type=str,
        resume_safe=True,
    )  # fmt: skip

    # ---- problems
    aqua_source: str = knob(
        "auto",
        "hf: Hugging Face deepmind/aqua_rat; dir: --aqua-data-dir; synthetic: the offline "
        "generator; auto: dir if --aqua-data-dir is given, hf on CUDA, synthetic on CPU",
        group=PROBLEMS,
        choices=["auto", "hf", "dir", "synthetic"],
    )
    aqua_data_dir: str | None = knob(
        None, "local AQuA-RAT directory (original or prepared)", group=PROBLEMS, type=str
    )
    train_examples: int = knob(
        -1,
        "training questions to draw from (-1: the whole train split; synthetic: 20000)",
        group=PROBLEMS,
    )
    synthetic_difficulty: str = knob(
        "easy", "synthetic problems' difficulty", group=PROBLEMS,
        choices=["easy", "medium", "hard", "mixed"],
    )  # fmt: skip
    synthetic_seed: int = knob(
        1,
        "generator seed of the synthetic training questions: mid-training and SFT use seed 0, so "
        "seed 1 gives train-split problems they never saw (validation always uses seed 0)",
        group=PROBLEMS,
    )
    eval_problems: int = knob(
        254,
        "validation problems for rl/acc (AQuA-RAT dev has 254; -1: all)",
        group=PROBLEMS,
        resume_safe=True,
    )

    # ---- rollouts
    examples_per_step: int = knob(32, "questions per step (all ranks)", group=ROLLOUTS)
    num_samples: int = knob(8, "completions per question (the group)", group=ROLLOUTS)
    max_new_tokens: int = knob(256, "completion length limit", group=ROLLOUTS)
    temperature: float = knob(
        1.0,
        "sampling temperature (anything but 1 makes the loss's ratio off-policy)",
        group=ROLLOUTS,
    )
    top_k: int | None = knob(None, "top-k sampling (off-policy when set)", group=ROLLOUTS, type=int)
    top_p: float | None = knob(
        None, "nucleus sampling (off-policy when set)", group=ROLLOUTS, type=float
    )
    rollout_prompts: int = knob(
        0,
        "prompts decoded together per batch on a rank (0: all of the rank's questions)",
        group=ROLLOUTS,
        resume_safe=True,
    )

    # ---- reward and advantage
    format_reward: float = knob(
        0.0,
        "bonus for one well-formed final 'Answer: X' line in a finished completion",
        group=REWARD,
    )
    format_anneal_steps: int = knob(
        0,
        "the format bonus decays linearly to 0 over this many steps (0: constant)",
        group=REWARD,
    )
    mask_truncated: bool = knob(
        False,
        "leave completions cut off by --max-new-tokens out of the loss (they still count in "
        "the sequence and constant normalisers, as zeros, as TRL does)",
        group=REWARD,
    )
    truncation_warn: float = knob(
        0.2,
        "warn when more than this fraction of a step's completions is truncated",
        group=REWARD,
        resume_safe=True,
    )
    adv_std_norm: bool = knob(
        False,
        "divide advantages by the group's sample standard deviation of rewards (Bessel, n - 1, "
        "as TRL and verl do) + 1e-4",
        group=REWARD,
    )

    # ---- loss
    loss_norm: str = knob(
        "token",
        "token: mean over the global batch's completion tokens (TRL dapo); sequence: mean of "
        "per-completion means (grpo); constant: sum / (completions * max-new-tokens) (dr_grpo)",
        group=LOSS,
        choices=["token", "sequence", "constant"],
    )
    ppo_epochs: int = knob(1, "optimizer passes over each rollout batch", group=LOSS)
    clip_eps: float = knob(0.2, "ratio clip below (1 - eps) and above", group=LOSS)
    clip_eps_high: float | None = knob(
        None,
        "upper clip 1 + eps_high (DAPO's clip-higher; default: --clip-eps)",
        group=LOSS,
        type=float,
    )
    kl_coef: float = knob(0.0, "k3 KL penalty to the reference (0: tracked only)", group=LOSS)
    device_batch_size: int = knob(
        16, "completions per training micro-batch", group=LOSS, resume_safe=True
    )

    # ---- optimization (the lrs come from FineTuningOptimizerKnobs)
    num_steps: int = knob(100, "RL steps", group=OPTIMIZATION)
    init_lr_frac: float = knob(0.05, "multiplier on the lrs above", group=OPTIMIZATION)
    warmdown_ratio: float = knob(
        1.0,
        "fraction of the steps at the end over which the lr decays linearly to 0",
        group=OPTIMIZATION,
    )
    seed: int = knob(42, "question order and rollout sampling seed", group=OPTIMIZATION)

    # ---- evaluation and diagnostics
    eval_every: int = knob(
        25, "rl/acc every N steps (0: start and end only)", group=EVALUATION, resume_safe=True
    )
    eval_samples: int = knob(
        4, "k of pass@k at temperature 1 (1: greedy only)", group=EVALUATION, resume_safe=True
    )
    eval_prompts: int = knob(
        32, "validation prompts decoded together", group=EVALUATION, resume_safe=True
    )
    diagnostics: bool = knob(
        True,
        "reference forward, KL, margins and attention entropy (--no-diagnostics: all off)",
        group=EVALUATION,
        negatable=True,
        resume_safe=True,
    )
    kl_sample_frac: float = knob(
        0.0625,
        "policy and reference score the groups of every round(1 / frac)-th question (the same "
        "ones on any number of ranks) with one prefill each: tracked KL and margins come from "
        "that subsample (those two forwards are the diagnostics' main cost; 1: every completion)",
        group=EVALUATION,
        resume_safe=True,
    )
    attn_every: int = knob(
        25, "attention entropy every N steps (0: off)", group=EVALUATION, resume_safe=True
    )
    attn_heatmap_every: int = knob(
        100, "attention heatmaps every N steps (0: off)", group=EVALUATION, resume_safe=True
    )
    attn_probes: int = knob(
        4, "validation conversations probed for entropy", group=EVALUATION, resume_safe=True
    )
    log_samples_every: int = knob(
        25,
        "every N steps, a table of a few completions (question, text, letter, reward, advantage) "
        "to W&B (rl/samples) and <base>/runs/<run>/rl_samples.jsonl (0: never)",
        group=EVALUATION,
        resume_safe=True,
    )
    log_every: int = knob(
        1, "print a line every N steps (all are logged)", group=EVALUATION, resume_safe=True
    )

    # ---- checkpoints (the rest come from CheckpointKnobs)
    save_every: int = with_default(CheckpointKnobs, "save_every", 50)

    def problems(self, world_size: int = 1) -> list[str]:
        """What is wrong with these settings (empty when nothing is)."""
        found = []
        if self.num_samples < 2:
            found.append("--num-samples must be >= 2 (group advantages need two samples at least)")
        sizes = (self.examples_per_step, self.num_steps, self.max_new_tokens)
        if min(sizes) < 1 or self.device_batch_size < 1:
            found.append(
                "--examples-per-step, --num-steps, --max-new-tokens and --device-batch-size must "
                "be >= 1"
            )
        elif self.examples_per_step % world_size:
            found.append(
                f"--examples-per-step {self.examples_per_step} must be divisible by the "
                f"{world_size} processes (each rank samples an equal share of the questions)"
            )
        if self.temperature <= 0:
            found.append(
                "--temperature must be > 0 (greedy rollouts make every sample of a group the same)"
            )
        if self.ppo_epochs < 1:
            found.append("--ppo-epochs must be >= 1")
        if self.clip_eps <= 0 or (self.clip_eps_high or self.clip_eps) <= 0:
            found.append("--clip-eps and --clip-eps-high must be > 0")
        if self.clip_eps >= 1:
            found.append("--clip-eps must be < 1 (the ratio is clipped below at 1 - eps)")
        if self.kl_coef < 0 or self.format_reward < 0:
            found.append("--kl-coef and --format-reward must be >= 0")
        if not 0.0 < self.kl_sample_frac <= 1.0:
            found.append("--kl-sample-frac must be in (0, 1]")
        if self.eval_samples < 1 or self.eval_prompts < 1:
            found.append("--eval-samples and --eval-prompts must be >= 1")
        if min(self.eval_problems, self.train_examples) < -1 or 0 in (
            self.eval_problems,
            self.train_examples,
        ):
            found.append(
                "--eval-problems and --train-examples must be >= 1 (or -1: the whole split)"
            )
        if self.rollout_prompts < 0:
            found.append("--rollout-prompts must be >= 0 (0: all of a rank's questions at once)")
        return found

    @property
    def on_policy(self) -> bool:
        """The samples come from the policy's own distribution (what the loss's ratio assumes)."""
        return self.temperature == 1.0 and self.top_k is None and self.top_p is None


RESUME_SAFE = resume_safe(RLConfig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uv run python -m scripts.chat_rl",
        description="GRPO-style RL on AQuA-style multiple choice (see the module docstring of "
        "scripts/chat_rl.py for what one step does).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_knobs(parser, RLConfig, notes={"lr_note": " (x --init-lr-frac)"})
    return parser


def parse_config(argv=None) -> RLConfig:
    """The config from command-line flags, checked (for the WORLD_SIZE processes torchrun starts);
    a bad flag exits with every problem named."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    parser = build_parser()
    cfg = from_namespace(RLConfig, parser.parse_args(argv))
    if cfg.clip_eps_high is None:
        cfg.clip_eps_high = cfg.clip_eps
    found = cfg.problems(world_size)
    if found:
        parser.error("; ".join(found))
    return cfg
