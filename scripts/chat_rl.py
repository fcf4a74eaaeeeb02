"""GRPO-style RL on AQuA-style multiple choice, with diagnostics of how the policy moves.

    uv run python -m scripts.chat_rl                                       # from the sft checkpoint
    uv run python -m scripts.chat_rl --aqua-source hf --num-steps 300  # AQuA-RAT train, eval on dev
    uv run torchrun --standalone --nproc_per_node=8 -m scripts.chat_rl --examples-per-step 64

One step (the loop in main):
1. rollouts: --examples-per-step questions (split across ranks), --num-samples completions each,
   decoded together at temperature 1 with no top-k/top-p, so the tokens come from the very
   distribution the policy gradient differentiates. Sample seeds depend on (--seed, step, question,
   sample) only: the same rollouts on any number of ranks and after a resume.
2. rewards: 1 when the task grades the completion right (two different answer letters earn 0),
   plus an optional --format-reward for one well-formed final "Answer: X", annealed to 0 over
   --format-anneal-steps.
3. advantages: reward minus the group mean (--adv-std-norm: over the group std as well). A group
   whose rewards are all equal carries no signal and gets no backward pass (unless --kl-coef).
4. loss: the clipped surrogate per completion token, plus an optional k3 KL penalty to the
   reference (--kl-coef; 0 by default: KL is tracked, not optimised), normalised over the GLOBAL
   batch (--loss-norm). --ppo-epochs > 1 reuses the batch, one optimizer step per pass.
5. diagnostics (nanochat/diagnostics.py): letter KL, sequence KL, letter margin and predicted-letter
   counts against the frozen reference; attention entropy per layer on fixed probes every
   --attn-every steps, heatmaps every --attn-heatmap-every.
Every --eval-every steps and at the end: rl/acc, greedy accuracy on the validation split, and
pass@k over --eval-samples samples (nanochat/mc_eval.py, shared with chat_eval).

Checkpoints: <base>/checkpoints/rl/<tag>/ every --save-every steps and at the end; the same command
resumes (a SIGKILLed run ends with the weights of an uninterrupted one on CPU fp32).
Logs: stage "rl" (<base>/runs/<run>/rl.jsonl and W&B); report section "rl".
"""

from __future__ import annotations

import argparse
import functools
import math
import random
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat import diagnostics as diag
from nanochat import rl
from nanochat.checkpoint import checkpoint_dir, load_model
from nanochat.common import (
    autodetect_dtype,
    cleanup_distributed,
    get_base_dir,
    init_distributed,
    print0,
)
from nanochat.engine import Engine
from nanochat.mc_eval import generative_eval
from nanochat.optim import clip_grad_norm_, overlap_grad_sync
from nanochat.report import report_dir, write_section
from nanochat.tokenizer import tokenizer_record
from nanochat.tracking import Histogram, Image, add_tracking_args, make_tracker
from nanochat.training import (
    StepTimer,
    add_checkpoint_args,
    add_optimizer_args,
    refuse_changed_flags,
    save,
    set_lr,
    start_or_resume,
    stop_if_not_finite,
    warmdown_multiplier,
)
from tasks.aqua import AQUA_LETTERS, AquaRat, extract_letter
from tasks.synthetic_aqua import SyntheticAqua

STAGE = "rl"
# Flags that may change on a resume besides the common ones (nanochat/training.HARMLESS_FLAGS): they
# change what is measured or how work is batched, not what is trained.
RESUME_HARMLESS = {
    "eval_samples",
    "eval_prompts",
    "eval_problems",
    "diagnostics",
    "kl_sample_frac",
    "attn_every",
    "attn_heatmap_every",
    "attn_probes",
    "truncation_warn",
    "rollout_prompts",
    "device_batch_size",
    "source_tag",
    "source_step",
    "tag",
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="uv run python -m scripts.chat_rl",
        description="GRPO-style RL on AQuA-style multiple choice (see the module "
        "docstring for what one step does).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("source checkpoint (the policy's start and the frozen reference)")
    g.add_argument("-i", "--source-stage", default="sft", choices=["mid", "sft", "rl"])
    g.add_argument(
        "--source-tag", default=None, help="tag of the source checkpoint (default: its latest)"
    )
    g.add_argument(
        "--source-step",
        type=int,
        default=None,
        help="step of the source checkpoint (default: last)",
    )
    g.add_argument("--tag", default=None, help="output checkpoint tag (default: the source's tag)")
    g = p.add_argument_group("problems")
    g.add_argument(
        "--aqua-source",
        default="auto",
        choices=["auto", "hf", "dir", "synthetic"],
        help="hf: Hugging Face deepmind/aqua_rat; dir: --aqua-data-dir; synthetic: the offline "
        "generator; auto: dir if --aqua-data-dir is given, hf on CUDA, synthetic on CPU",
    )
    g.add_argument(
        "--aqua-data-dir", default=None, help="local AQuA-RAT directory (original or prepared)"
    )
    g.add_argument(
        "--train-examples",
        type=int,
        default=-1,
        help="training questions to draw from (-1: the whole train split; synthetic: 20000)",
    )
    g.add_argument(
        "--synthetic-difficulty", default="easy", choices=["easy", "medium", "hard", "mixed"]
    )
    g.add_argument(
        "--synthetic-seed",
        type=int,
        default=1,
        help="generator seed of the synthetic training questions: mid-training and SFT use seed 0, "
        "so seed 1 gives train-split problems they never saw (validation always uses seed 0)",
    )
    g.add_argument(
        "--eval-problems",
        type=int,
        default=254,
        help="validation problems for rl/acc (AQuA-RAT dev has 254; -1: all)",
    )
    g = p.add_argument_group("rollouts")
    g.add_argument(
        "--examples-per-step", type=int, default=32, help="questions per step (all ranks)"
    )
    g.add_argument(
        "--num-samples", type=int, default=8, help="completions per question (the group)"
    )
    g.add_argument("--max-new-tokens", type=int, default=256, help="completion length limit")
    g.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature (anything but 1 makes the loss's ratio off-policy)",
    )
    g.add_argument("--top-k", type=int, default=None, help="top-k sampling (off-policy when set)")
    g.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling (off-policy when set)"
    )
    g.add_argument(
        "--rollout-prompts",
        type=int,
        default=0,
        help="prompts decoded together per batch on a rank (0: all of the rank's questions)",
    )
    g = p.add_argument_group("reward and advantage")
    g.add_argument(
        "--format-reward",
        type=float,
        default=0.0,
        help="bonus for one well-formed final 'Answer: X' line in a finished completion",
    )
    g.add_argument(
        "--format-anneal-steps",
        type=int,
        default=0,
        help="the format bonus decays linearly to 0 over this many steps (0: constant)",
    )
    g.add_argument(
        "--mask-truncated",
        action="store_true",
        help="leave completions cut off by --max-new-tokens out of the loss",
    )
    g.add_argument(
        "--truncation-warn",
        type=float,
        default=0.2,
        help="warn when more than this fraction of a step's completions is truncated",
    )
    g.add_argument(
        "--adv-std-norm", action="store_true", help="divide advantages by the group's reward std"
    )
    g = p.add_argument_group("loss")
    g.add_argument(
        "--loss-norm",
        default="token",
        choices=["token", "sequence", "constant"],
        help="token: mean over the global batch's completion tokens; sequence: mean of per-"
        "completion means; constant: sum / (completions * max-new-tokens), Dr. GRPO",
    )
    g.add_argument(
        "--ppo-epochs", type=int, default=1, help="optimizer passes over each rollout batch"
    )
    g.add_argument(
        "--clip-eps", type=float, default=0.2, help="ratio clip below (1 - eps) and above"
    )
    g.add_argument(
        "--clip-eps-high",
        type=float,
        default=None,
        help="upper clip 1 + eps_high (DAPO's clip-higher; default: --clip-eps)",
    )
    g.add_argument(
        "--kl-coef",
        type=float,
        default=0.0,
        help="k3 KL penalty to the reference (0: tracked only)",
    )
    g.add_argument(
        "--device-batch-size", type=int, default=16, help="completions per training micro-batch"
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--num-steps", type=int, default=100, help="RL steps")
    add_optimizer_args(g, lr_note=" (x --init-lr-frac)", fine_tuning=True)
    g.add_argument(
        "--init-lr-frac", type=float, default=0.05, help="multiplier on the three lrs above"
    )
    g.add_argument(
        "--warmdown-ratio",
        type=float,
        default=1.0,
        help="fraction of the steps at the end over which the lr decays linearly to 0",
    )
    g.add_argument("--seed", type=int, default=42, help="question order and rollout sampling seed")
    g = p.add_argument_group("evaluation and diagnostics")
    g.add_argument(
        "--eval-every", type=int, default=25, help="rl/acc every N steps (0: start and end only)"
    )
    g.add_argument(
        "--eval-samples", type=int, default=4, help="k of pass@k at temperature 1 (1: greedy only)"
    )
    g.add_argument(
        "--eval-prompts", type=int, default=32, help="validation prompts decoded together"
    )
    g.add_argument(
        "--diagnostics",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reference forward, KL, margins and attention entropy (--no-diagnostics: all off)",
    )
    g.add_argument(
        "--kl-sample-frac",
        type=float,
        default=0.125,
        help="policy and reference score the groups of every round(1 / frac)-th question (the "
        "same ones on any number of ranks) with one prefill each: tracked KL and margins come from "
        "that subsample (those two forwards are the diagnostics' main cost; 1: every completion)",
    )
    g.add_argument(
        "--attn-every", type=int, default=25, help="attention entropy every N steps (0: off)"
    )
    g.add_argument(
        "--attn-heatmap-every",
        type=int,
        default=100,
        help="attention heatmaps every N steps (0: off)",
    )
    g.add_argument(
        "--attn-probes", type=int, default=4, help="validation conversations probed for entropy"
    )
    g.add_argument(
        "--log-every", type=int, default=1, help="print a line every N steps (all are logged)"
    )
    g = p.add_argument_group("checkpoints")
    add_checkpoint_args(g, save_every=50)
    add_tracking_args(p)
    args = p.parse_args(argv)
    if args.clip_eps_high is None:
        args.clip_eps_high = args.clip_eps
    problems = []
    if args.num_samples < 2:
        problems.append("--num-samples must be >= 2 (group advantages need at least two samples)")
    if (
        args.examples_per_step < 1
        or args.num_steps < 1
        or args.max_new_tokens < 1
        or args.device_batch_size < 1
    ):
        problems.append(
            "--examples-per-step, --num-steps, --max-new-tokens and --device-batch-size must be "
            ">= 1"
        )
    if args.temperature <= 0:
        problems.append(
            "--temperature must be > 0 (greedy rollouts make every sample of a group the same)"
        )
    if args.ppo_epochs < 1:
        problems.append("--ppo-epochs must be >= 1")
    if args.clip_eps <= 0 or args.clip_eps_high <= 0:
        problems.append("--clip-eps and --clip-eps-high must be > 0")
    if args.kl_coef < 0 or args.format_reward < 0:
        problems.append("--kl-coef and --format-reward must be >= 0")
    if not 0.0 < args.kl_sample_frac <= 1.0:
        problems.append("--kl-sample-frac must be in (0, 1]")
    if args.eval_samples < 1 or args.eval_prompts < 1:
        problems.append("--eval-samples and --eval-prompts must be >= 1")
    if (
        args.eval_problems == 0
        or args.eval_problems < -1
        or args.train_examples == 0
        or args.train_examples < -1
    ):
        problems.append(
            "--eval-problems and --train-examples must be >= 1 (or -1: the whole split)"
        )
    if args.rollout_prompts < 0:
        problems.append("--rollout-prompts must be >= 0 (0: all of a rank's questions at once)")
    if args.clip_eps >= 1:
        problems.append("--clip-eps must be < 1 (the ratio is clipped below at 1 - eps)")
    if problems:
        p.error("; ".join(problems))
    return args


# ------------------------------------------------------------------------------------------------
# problems


def resolve_source(args, device) -> str:
    if args.aqua_source != "auto":
        return args.aqua_source
    if args.aqua_data_dir:
        return "dir"
    return "hf" if device.type == "cuda" else "synthetic"


def load_split(args, source: str, split: str, n: int):
    """The task of one split: AQuA-RAT (hf/dir) or synthetic problems; n < 0 = the whole split."""
    if source == "synthetic":
        size = n if n > 0 else (20000 if split == "train" else 254)
        seed = args.synthetic_seed if split == "train" else 0
        return SyntheticAqua(
            split, num_examples=size, difficulty=args.synthetic_difficulty, seed=seed
        )
    data_dir = args.aqua_data_dir if source == "dir" else None
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


def step_questions(args, step: int, rank: int, world: int) -> list[int]:
    """Global question numbers of this rank at `step`: each rank takes a contiguous share."""
    per_rank = args.examples_per_step // world
    first = step * args.examples_per_step + rank * per_rank
    return list(range(first, first + per_rank))


def question_index(seed: int, q: int, n: int) -> int:
    """Problem behind global question number q: each pass over the n problems is a fresh
    permutation."""
    epoch, pos = divmod(q, n)
    return _pass_order(seed, epoch, n)[pos]


@functools.lru_cache(maxsize=2)
def _pass_order(seed: int, epoch: int, n: int) -> list[int]:
    return random.Random(seed * 1_000_003 + epoch).sample(range(n), n)


# ------------------------------------------------------------------------------------------------
# rollouts


@dataclass
class Completion:
    ids: list[int]  # prompt + completion
    prompt_len: int
    logprobs: list[float]  # the engine's log-probs of the completion tokens
    finished: bool
    reward: float
    correct: bool
    letter: str | None  # the letter the completion chose (extract_letter)
    letter_pos: int | None  # index in ids of its final answer-letter token
    gold: int  # index 0-4 of the gold letter
    sample: int  # index inside its group


def rollout(
    engine, tokenizer, task, questions: list[int], step: int, args, letter_ids
) -> list[list[Completion]]:
    """Sample and score the groups of this rank's questions (global question numbers)."""
    convs = [task[question_index(args.seed, q, len(task))] for q in questions]
    prompts = [tokenizer.render_for_completion(conv) for conv in convs]
    seeds = [rl.rollout_seed(args.seed, step, q) for q in questions]
    chunk = args.rollout_prompts or len(prompts)
    results = []
    for i in range(0, len(prompts), chunk):
        results += engine.generate_multi(
            prompts[i : i + chunk],
            num_samples=args.num_samples,
            max_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seeds=seeds[i : i + chunk],
        )
    bonus = rl.format_bonus(args.format_reward, args.format_anneal_steps, step)
    groups = []
    for conv, prompt, res in zip(convs, prompts, results):
        group = []
        for i, (seq, lps, fin) in enumerate(zip(res.sequences, res.logprobs, res.finished)):
            body = engine.without_stop(seq)  # the stop token is trained on, but is not text
            text = tokenizer.decode(body)
            correct = rl.correctness_reward(task, conv, text)
            reward = correct + (bonus if bonus and rl.well_formed(text, fin) else 0.0)
            pos = diag.answer_letter_position(body, tokenizer, letter_ids) if letter_ids else None
            group.append(
                Completion(
                    ids=prompt + seq,
                    prompt_len=len(prompt),
                    logprobs=lps,
                    finished=fin,
                    reward=reward,
                    correct=bool(correct),
                    letter=extract_letter(text, conv.get("options")),
                    letter_pos=None if pos is None else len(prompt) + pos,
                    gold=AQUA_LETTERS.index(conv["answer"]),
                    sample=i,
                )
            )
        groups.append(group)
    return groups


# ------------------------------------------------------------------------------------------------
# diagnostics: how far the policy has moved from the reference


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position (B, T), 0 where the target is -1."""
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")
    return -nll.view(targets.shape) * (targets != -1)


def diagnose(model, ref_model, groups, questions, args, letter_ids, pad_id) -> dict:
    """Per completion: sequence KL (and k3) to the reference, and where there is an answer letter,
    letter KL and margin (empty lists with --no-diagnostics).

    Both sides are scored by the same function, `completion_logits` (one no-grad prompt forward per
    group through a KV cache, fp32 log-softmax at the end), on the groups of every
    round(1 / kl-sample-frac)-th global question (so the subsample does not depend on the number of
    ranks): the policy before this step's update, and the reference. Reading the policy's side off
    the rollout instead (the engine's one-token-at-a-time decode) would be free, but in bf16 the
    decode and a prefill round differently, and the KLs would show a policy "moving" at step 0
    (0.03-0.08 nats of sequence KL at d2). Through one code path, at step 0 policy and reference are
    the same function of the same weights: both KLs are exactly 0 in any dtype. The sampler vs
    trainer mismatch stays measured, by rl/logprob_gap_mean (train_step)."""
    out = {"kl_seq": [], "kl_seq_k3": [], "kl_letter": [], "margin": []}
    if not args.diagnostics:
        return out
    stride = max(1, round(1.0 / args.kl_sample_frac))
    for q, group in zip(questions, groups):
        if q % stride:
            continue
        prompt = group[0].ids[: group[0].prompt_len]
        completions = [c.ids[c.prompt_len :] for c in group]
        policy = diag.completion_logits(model, prompt, completions, pad_id)
        ref = diag.completion_logits(ref_model, prompt, completions, pad_id)
        width = ref.size(1)
        targets = torch.tensor(
            [c + [-1] * (width - len(c)) for c in completions], device=ref.device
        )
        # Sequence KL: the sampled tokens came from the policy, so summing log pi - log pi_ref over
        # them estimates KL(pi || pi_ref) of whole completions without enumerating the vocabulary.
        seq_kl, seq_k3 = diag.sequence_kl(
            token_logprobs(policy, targets), token_logprobs(ref, targets), targets != -1
        )
        out["kl_seq"] += seq_kl.tolist()
        out["kl_seq_k3"] += seq_k3.tolist()
        lettered = [r for r, c in enumerate(group) if c.letter_pos is not None]
        if not (letter_ids and lettered):
            continue
        # Letter KL: at the one token where the answer is decided, compare the two models' choice
        # among the five letters exactly (a 5-way distribution), not through a sampled estimate.
        at = (
            torch.tensor(lettered),
            torch.tensor([group[r].letter_pos - group[r].prompt_len for r in lettered]),
        )
        policy_letters, ref_letters = policy[at], ref[at]
        gold = torch.tensor([group[r].gold for r in lettered], device=ref.device)
        out["kl_letter"] += diag.letter_kl(policy_letters, ref_letters, letter_ids).tolist()
        out["margin"] += diag.letter_margin(policy_letters, letter_ids, gold).tolist()
    return out


def attention_probes(task, tokenizer, n: int, max_tokens: int) -> list[list[int]]:
    """The token ids of the first n conversations of `task`, whole (prompt and answer)."""
    n = min(n, len(task))
    return [tokenizer.render_conversation(task[i], max_tokens=max_tokens)[0] for i in range(n)]


def attention_due(args, step: int, last: bool) -> tuple[bool, bool]:
    """(measure attention entropy at this step, with heatmaps): every --attn-every and
    --attn-heatmap-every steps, and at the end."""
    heatmaps = last or _every(args.attn_heatmap_every, step)
    return args.diagnostics and (heatmaps or _every(args.attn_every, step)), heatmaps


def attention_metrics(model, tokenizer, probes, step: int, heatmaps: bool, out_dir) -> dict:
    """attn/entropy_mean, attn/entropy/layer_<i>, and (heatmaps) one image per layer of probe 0.

    Training runs the fused attention kernel, which never materialises attention probabilities;
    these probe forwards take the explicit path (attn_capture) on a few fixed validation
    conversations, so the curve follows the same inputs across steps at a small cost."""
    per_layer, probs = diag.attention_entropy(model, probes, keep_probs=heatmaps)
    out = {"attn/entropy_mean": sum(per_layer) / len(per_layer)}
    out.update({f"attn/entropy/layer_{i}": v for i, v in enumerate(per_layer)})
    if heatmaps and probs:
        labels = [tokenizer.id_to_token(t) for t in probes[0]]
        for i, path in enumerate(diag.save_heatmaps(probs, labels, out_dir, step)):
            out[f"attn/heatmap/layer_{i}"] = Image(path, caption=f"layer {i}, step {step}")
    return out


# ------------------------------------------------------------------------------------------------
# the update


def batch_tensors(rows: list[Completion], pad_id: int, device, mask_truncated: bool):
    """inputs (B, T), targets (B, T) with -1 off the completion, completion mask (B, T) and the
    mask of tokens that train (the completion mask, minus truncated ones with --mask-truncated)."""
    T = max(len(c.ids) for c in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for r, c in enumerate(rows):
        ids = torch.tensor(c.ids, dtype=torch.long)
        x[r, : len(c.ids) - 1] = ids[:-1]
        y[r, c.prompt_len - 1 : len(c.ids) - 1] = ids[c.prompt_len :]  # t predicts token t + 1
    comp = y != -1
    train = comp.clone()
    if mask_truncated:
        train &= torch.tensor([c.finished for c in rows])[:, None]
    return x.to(device), y.to(device), comp.to(device), train.to(device)


def loss_normalisers(rows, args, info) -> tuple[float, float]:
    """(completion tokens, completions) of the GLOBAL batch that the loss may train on.

    Every completion counts, zero-signal ones too: they carry zero advantage, so a batch that is
    mostly solved takes a proportionally smaller step, and --loss-norm constant stays constant.
    Counting over all ranks (not per rank or per micro-batch) makes the loss the same mean however
    the batch is split. With --mask-truncated, truncated completions are out."""
    kept = [c for c in rows if c.finished or not args.mask_truncated]
    counts = torch.tensor(
        [float(sum(len(c.ids) - c.prompt_len for c in kept)), float(len(kept))],
        dtype=torch.float64,
        device=info.device,
    )
    if info.is_ddp:
        dist.all_reduce(counts)
    return counts[0].item(), counts[1].item()


def train_step(model, ref_model, optimizers, groups, adv, zero_signal, args, info, pad_id) -> dict:
    """The --ppo-epochs optimizer steps on one rollout batch; returns this rank's statistics."""
    device = info.device
    stats = {"clipped": 0.0, "clip_tokens": 0.0, "logprob_gap": 0.0, "gap_tokens": 0.0}
    stats.update(grad_norm=0.0, skipped=False)
    rows = [c for group in groups for c in group]
    row_adv = adv.flatten().tolist()
    # Zero-signal groups have zero advantage everywhere: no forward/backward unless the KL penalty
    # applies to them too.
    trained = [
        i for i in range(len(rows)) if args.kl_coef > 0 or not zero_signal[i // args.num_samples]
    ]
    size = args.device_batch_size
    batches = [trained[k : k + size] for k in range(0, len(trained), size)]
    global_tokens, global_seqs = loss_normalisers(rows, args, info)
    anything = torch.tensor([float(len(trained))], device=device)
    if info.is_ddp:
        dist.all_reduce(anything)
    if anything.item() == 0:  # every group on every rank is zero-signal: no update at all
        stats["skipped"] = True
        return stats

    first_pass = {}  # per micro-batch: old (and reference) log-probs for the later epochs
    for epoch in range(args.ppo_epochs):
        for b, idx in enumerate(batches):
            sub = [rows[i] for i in idx]
            x, y, comp, train_mask = batch_tensors(sub, pad_id, device, args.mask_truncated)
            logp = -model(x, y, loss_reduction="none")  # log p of each target, 0 off the completion
            if epoch == 0:
                ref_logp = None
                if args.kl_coef > 0:
                    with torch.no_grad():
                        ref_logp = -ref_model(x, y, loss_reduction="none")
                # how far the trainer's log-probs are from the sampler's (bf16, kernels, ...)
                engine_lp = torch.zeros_like(logp)
                for r, c in enumerate(sub):
                    span = slice(c.prompt_len - 1, len(c.ids) - 1)
                    engine_lp[r, span] = torch.tensor(c.logprobs, device=device)
                stats["logprob_gap"] += ((logp.detach() - engine_lp).abs() * comp).sum().item()
                stats["gap_tokens"] += comp.sum().item()
                # The first pass is on-policy: old log-probs = these, detached, so the ratio is 1.
                first_pass[b] = (logp.detach(), ref_logp)
            old_logp, ref_logp = first_pass[b]
            weights = rl.token_weights(
                train_mask, args.loss_norm, global_tokens, global_seqs, args.max_new_tokens
            )
            a = torch.tensor([row_adv[i] for i in idx], device=device)
            loss, clipped = rl.policy_loss(
                logp,
                old_logp,
                a,
                weights,
                args.clip_eps,
                args.clip_eps_high,
                args.kl_coef,
                ref_logp,
            )
            if b == len(batches) - 1:  # the last backward sends the gradients as they complete
                overlap_grad_sync(optimizers)
            # the optimizers average gradients over ranks, so * world makes it the global sum
            (loss * info.world_size).backward()
            if epoch > 0:  # on the first pass the ratio is exactly 1: nothing can be clipped
                stats["clipped"] += clipped.sum().item()
                stats["clip_tokens"] += train_mask.sum().item()
        grad_norm = clip_grad_norm_(optimizers, args.grad_clip if args.grad_clip > 0 else None)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        stats["grad_norm"] = float(grad_norm)
    return stats


# ------------------------------------------------------------------------------------------------
# evaluation and step metrics


def evaluate(engine, tokenizer, task, n: int, args) -> dict:
    """rl/acc (greedy) and pass@k at temperature 1 on the first n validation problems, all ranks."""
    res = generative_eval(
        engine,
        tokenizer,
        task,
        n,
        args.max_new_tokens,
        args.eval_prompts,
        args.eval_samples,
        temperature=1.0,
        seed=args.seed * 7,
    )
    out = {"rl/acc": res.acc}
    if args.eval_samples > 1:
        out[f"rl/pass@{args.eval_samples}"] = res.pass_at_k
        out["rl/eval_sample_acc"] = res.sample_acc
    return out


def step_metrics(groups, zero_signal, update, moved, rollout_s: float, args, info) -> dict:
    """Everything logged for one step, reduced over ranks (sums, maxima and gathered lists).

    update: train_step's statistics; moved: diagnose's lists."""
    rows = [c for group in groups for c in group]
    lengths = [len(c.ids) - c.prompt_len for c in rows]
    rewards = [c.reward for c in rows]
    pred_labels = list(AQUA_LETTERS) + ["none"]
    letter_counts = diag.letter_counts([c.letter for c in rows])
    sums = torch.tensor(
        [
            len(rows),
            sum(rewards),
            sum(r * r for r in rewards),
            sum(c.correct for c in rows),
            sum(lengths),
            sum(not c.finished for c in rows),
            float(zero_signal.sum()),
            len(groups),
            update["clipped"],
            update["clip_tokens"],
            update["logprob_gap"],
            update["gap_tokens"],
            sum(c.letter_pos is not None for c in rows),
        ]
        + [letter_counts[k] for k in pred_labels],
        dtype=torch.float64,
        device=info.device,
    )
    longest = torch.tensor([max(lengths)], dtype=torch.float64, device=info.device)
    lists = dict(moved)
    if info.is_ddp:
        dist.all_reduce(sums)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        gathered = [None] * info.world_size
        dist.all_gather_object(gathered, lists)
        lists = {k: [v for part in gathered for v in part[k]] for k in lists}
    s = sums.tolist()
    n = max(s[0], 1.0)
    out = {
        "rl/mean_reward": s[1] / n,
        "rl/reward_std": math.sqrt(max(s[2] / n - (s[1] / n) ** 2, 0.0)),
        "rl/sample_acc": s[3] / n,
        "rl/completion_len_mean": s[4] / n,
        "rl/completion_len_max": longest.item(),
        "rl/truncation_rate": s[5] / n,
        "rl/zero_signal_groups": s[6],
        "rl/groups": s[7],
        "rl/clip_frac": s[8] / max(s[9], 1.0),
        "rl/logprob_gap_mean": s[10] / max(s[11], 1.0),
        "rl/answered_frac": s[12] / n,
        "rl/update_skipped": float(update["skipped"]),
        "rl/grad_norm": update["grad_norm"],
        "rl/rollout_time_s": rollout_s,
        "rl/rollout_tok_per_s": s[4] / max(rollout_s, 1e-9),  # all ranks' new tokens
    }
    for k, letter in enumerate(pred_labels):
        out[f"rl/letter_pred_counts/{letter}"] = s[13 + k]
    if args.diagnostics:
        out["rl/kl_sequence_mean"] = _mean(lists["kl_seq"])
        out["rl/kl_sequence_k3_mean"] = _mean(lists["kl_seq_k3"])
        out["rl/kl_letter_mean"] = _mean(lists["kl_letter"])
        out["rl/letter_margin_mean"] = _mean(lists["margin"])
        if lists["margin"]:
            out["rl/letter_margin_hist"] = Histogram(lists["margin"])
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _every(period: int, step: int) -> bool:
    """True every `period` steps (never when period is 0)."""
    return period > 0 and step % period == 0


def _format(metrics: dict) -> str:
    return " | ".join(f"{k} {v:.3f}" for k, v in metrics.items())


def print_step(step: int, metrics: dict, args, step_s: float) -> None:
    if metrics["rl/truncation_rate"] > args.truncation_warn:
        print0(
            f"WARNING step {step}: {metrics['rl/truncation_rate']:.0%} of the completions hit "
            f"--max-new-tokens {args.max_new_tokens} (raise it, or --mask-truncated)"
        )
    if step % args.log_every and step != args.num_steps:
        return
    kl = ""
    if args.diagnostics:
        kl = (
            f" | kl seq {metrics['rl/kl_sequence_mean']:.4f} "
            f"letter {metrics['rl/kl_letter_mean']:.4f} "
            f"| margin {metrics['rl/letter_margin_mean']:.2f}"
        )
    signal = f"{int(metrics['rl/zero_signal_groups'])}/{int(metrics['rl/groups'])}"
    print0(
        f"step {step:04d}/{args.num_steps} | reward {metrics['rl/mean_reward']:.3f} | "
        f"zero-signal {signal}{kl} | len {metrics['rl/completion_len_mean']:.0f} | "
        f"{step_s:.2f}s (rollout {metrics['rl/rollout_time_s']:.2f}s, "
        f"{metrics['rl/rollout_tok_per_s']:,.0f} tok/s)"
    )


# ------------------------------------------------------------------------------------------------
# setup, resume and the report


def check_run(args, world: int) -> None:
    if args.examples_per_step % world != 0:
        raise SystemExit(
            f"--examples-per-step {args.examples_per_step} must be divisible by the {world} "
            f"processes (each rank samples an equal share of the questions)"
        )
    if args.temperature != 1.0 or args.top_k is not None or args.top_p is not None:
        print0(
            "WARNING: temperature != 1 or top-k/top-p: the samples do not come from the policy's "
            "own distribution, so the loss's ratio and the tracked sequence KL are off-policy "
            "estimates"
        )


def load_policy_and_reference(args, device):
    """(policy, frozen reference or None, tokenizer, source meta, output tag): both models start
    from the same source checkpoint; the reference is only loaded when something reads it."""
    source = dict(tag=args.source_tag, step=args.source_step, device=device)
    model, tokenizer, src_meta = load_model(args.source_stage, **source, phase="train")
    ref_model = None
    if args.diagnostics or args.kl_coef > 0:
        ref_model, _, _ = load_model(args.source_stage, **source, phase="eval")
        ref_model.requires_grad_(False)
    tag = args.tag or src_meta.get("tag") or f"d{model.config.n_layer}"
    if args.source_stage == STAGE and tag == src_meta.get("tag"):
        raise SystemExit(
            f"-i rl with output tag {tag!r} would train into its own source (and --fresh would "
            f"delete it): pass another --tag"
        )
    return model, ref_model, tokenizer, src_meta, tag


def resume(ckpt_dir, info, model, optimizers, args, src_meta) -> tuple[int, dict]:
    """(first step, the run's kept statistics): step 0 and fresh statistics, or those of the last
    checkpoint of this tag when it was written by the same settings, ranks and source."""
    start_step, resumed, _ = start_or_resume(
        ckpt_dir, info, model, optimizers, args.fresh, args.resume
    )
    kept = {"first_acc": None, "best_acc": None, "train_time": 0.0, "timed_steps": 0}
    if resumed is None:
        return start_step, kept
    refuse_changed_flags(ckpt_dir, start_step, resumed.get("args", {}), args, RESUME_HARMLESS)
    if resumed.get("world_size") != info.world_size:  # start_or_resume refuses it first
        raise SystemExit(
            f"{ckpt_dir} step {start_step} was written by {resumed.get('world_size')} "
            f"process(es), this run has {info.world_size}: resume with the same number, or --fresh"
        )
    began = (resumed.get("source_tag"), resumed.get("source_step"))
    if began != (src_meta.get("tag"), src_meta.get("step")):
        raise SystemExit(
            f"{ckpt_dir} started from {args.source_stage}/{began[0]} step {began[1]}, but the "
            f"reference now resolves to {src_meta.get('tag')} step {src_meta.get('step')}: "
            f"pass --source-tag {began[0]} --source-step {began[1]} to resume, or --fresh"
        )
    kept.update(resumed.get("stats", {}))
    return start_step, kept


def static_checkpoint_meta(args, model, tokenizer, tag: str, src_meta: dict) -> dict:
    """What every checkpoint of this run records besides its statistics and last evaluation."""
    return {
        "model_config": asdict(model.config),
        "tokenizer": tokenizer_record(tokenizer),
        "stage": STAGE,
        "tag": tag,
        "args": vars(args),
        "source_stage": args.source_stage,
        "source_tag": src_meta.get("tag"),
        "source_step": src_meta.get("step"),
        "num_iterations": args.num_steps,
    }


def write_report(
    base_dir, args, src_meta, tag, source, n_train, n_eval, kept, last_eval, timer, info
):
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    pass_k = last_eval.get(f"rl/pass@{args.eval_samples}")
    lines = [
        "## Reinforcement learning (chat_rl)",
        "",
        f"- checkpoint: `{checkpoint_dir(STAGE, tag)}` (step {args.num_steps}), from "
        f"{args.source_stage}/{src_meta.get('tag')} step {src_meta.get('step')}; the reference "
        f"model is that checkpoint, frozen",
        f"- problems: {source}, {n_train} train questions; rl/acc on {n_eval} validation problems "
        f"(greedy)",
        f"- {args.num_steps} steps x {args.examples_per_step} questions x {args.num_samples} "
        f"samples, max {args.max_new_tokens} new tokens, temperature {args.temperature}",
        f"- loss: {args.loss_norm}-normalised clipped policy gradient (eps {args.clip_eps}/"
        f"{args.clip_eps_high}, {args.ppo_epochs} epoch(s)), KL coefficient {args.kl_coef}, "
        f"advantage std-norm {args.adv_std_norm}, format reward {args.format_reward}",
        f"- validation accuracy (greedy): start {fmt(kept['first_acc'])} -> end "
        f"{fmt(last_eval.get('rl/acc'))} (best {fmt(kept['best_acc'])})"
        + (f"; pass@{args.eval_samples} {fmt(pass_k)}" if pass_k is not None else ""),
        f"- training time: {timer.total / 60:.1f} min on {info.world_size} x {info.device.type}",
    ]
    write_section(base_dir, args.run, STAGE, "\n".join(lines))


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    # ---- setup
    args = parse_args(argv)
    info = init_distributed()
    device, rank, world = info.device, info.rank, info.world_size
    check_run(args, world)
    base_dir = get_base_dir()

    # ---- model: the policy and its frozen reference (the same starting weights)
    model, ref_model, tokenizer, src_meta, tag = load_policy_and_reference(args, device)
    letter_ids = diag.letter_token_ids(tokenizer)
    if letter_ids is None:
        print0(
            "note: ' A'..' E' are not single tokens after 'Answer:' in this tokenizer: letter KL "
            "and margins are off"
        )

    # ---- problems
    source = resolve_source(args, device)
    train_task = load_split(args, source, "train", args.train_examples)
    val_task = load_split(args, source, "validation", args.eval_problems)
    n_eval = len(val_task) if args.eval_problems < 0 else min(args.eval_problems, len(val_task))
    probes = attention_probes(val_task, tokenizer, args.attn_probes, model.config.sequence_len)
    print0(
        f"rl: {args.source_stage}/{src_meta.get('tag')} step {src_meta.get('step')} -> rl/{tag}; "
        f"{source} problems: {len(train_task)} train, {n_eval} validation; {args.num_steps} "
        f"steps x {args.examples_per_step} questions x {args.num_samples} samples on {world} x "
        f"{device.type}"
    )

    # ---- optimizer, checkpoint, tracking
    optimizers = model.setup_optimizers(
        unembedding_lr=args.unembedding_lr,
        embedding_lr=args.embedding_lr,
        matrix_lr=args.matrix_lr,
        weight_decay=args.weight_decay,
        value_embed_lr=args.value_embed_lr,
    )
    ckpt_dir = checkpoint_dir(STAGE, tag)
    start_step, kept = resume(ckpt_dir, info, model, optimizers, args, src_meta)
    run_config = {
        **vars(args),
        "stage": STAGE,
        "tag": tag,
        "source_tag": src_meta.get("tag"),
        "source_step": src_meta.get("step"),
        "problem_source": source,
        "world_size": world,
        "device": str(device),
        "dtype": str(autodetect_dtype(device)),
        "model_config": asdict(model.config),
        "resumed_from": start_step,
    }
    tracker = make_tracker(args, STAGE, run_config)
    checkpoint_meta = static_checkpoint_meta(args, model, tokenizer, tag, src_meta)
    engine = Engine(model, tokenizer)
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    timer = StepTimer(device, start_step, args.num_steps, kept["train_time"], kept["timed_steps"])
    last_eval = {}

    # ---- the loop: `step` = RL steps already taken
    step = start_step
    while True:
        last = step == args.num_steps
        if last or step == start_step or _every(args.eval_every, step):
            last_eval = evaluate(engine, tokenizer, val_task, n_eval, args)
            if kept["first_acc"] is None:
                kept["first_acc"] = last_eval["rl/acc"]
            kept["best_acc"] = max(kept["best_acc"] or 0.0, last_eval["rl/acc"])
            tracker.log(last_eval, step=step)
            print0(f"step {step:04d}/{args.num_steps} | eval " + _format(last_eval))
        measure, heatmaps = attention_due(args, step, last)
        if measure and rank == 0 and probes:
            out_dir = report_dir(base_dir, args.run)
            metrics = attention_metrics(model, tokenizer, probes, step, heatmaps, out_dir)
            tracker.log(metrics, step=step)
        if last:
            break

        timer.start()
        t0 = time.time()
        questions = step_questions(args, step, rank, world)
        groups = rollout(engine, tokenizer, train_task, questions, step, args, letter_ids)
        rollout_s = time.time() - t0
        rewards = torch.tensor([[c.reward for c in group] for group in groups])
        adv, zero_signal = rl.group_advantages(rewards, args.adv_std_norm)
        moved = diagnose(model, ref_model, groups, questions, args, letter_ids, pad_id)
        lrm = warmdown_multiplier(step, args.num_steps, args.warmdown_ratio)
        set_lr(optimizers, args.init_lr_frac * lrm)
        update = train_step(
            model, ref_model, optimizers, groups, adv, zero_signal, args, info, pad_id
        )
        timer.stop()
        step += 1

        stop_if_not_finite(update["grad_norm"], "the gradient norm", step, ckpt_dir)
        metrics = step_metrics(groups, zero_signal, update, moved, rollout_s, args, info)
        metrics["rl/lr"] = args.matrix_lr * args.init_lr_frac * lrm
        metrics["rl/lrm"] = lrm
        metrics["rl/step_time_s"] = timer.last
        metrics["rl/format_bonus"] = rl.format_bonus(
            args.format_reward, args.format_anneal_steps, step - 1
        )
        tracker.log(metrics, step=step)
        print_step(step, metrics, args, timer.last)
        if step == args.num_steps or _every(args.save_every, step):
            kept.update(train_time=timer.total, timed_steps=timer.count)
            meta = {**checkpoint_meta, "stats": kept, "eval": last_eval}
            save(ckpt_dir, step, model, optimizers, meta, rank, args.keep_last, {})

    # ---- summary and report
    summary = {
        "final/acc": last_eval.get("rl/acc"),
        "final/first_acc": kept["first_acc"],
        "final/best_acc": kept["best_acc"],
        "final/steps": args.num_steps,
        "final/train_time_s": timer.total,
    }
    if f"rl/pass@{args.eval_samples}" in last_eval:
        summary[f"final/pass@{args.eval_samples}"] = last_eval[f"rl/pass@{args.eval_samples}"]
    tracker.summary(summary)
    tracker.finish()
    if rank == 0:
        n_train = len(train_task)
        write_report(
            base_dir, args, src_meta, tag, source, n_train, n_eval, kept, last_eval, timer, info
        )
    cleanup_distributed()
    return {
        "acc": last_eval.get("rl/acc"),
        "first_acc": kept["first_acc"],
        "ckpt_dir": str(ckpt_dir),
        **last_eval,
    }


if __name__ == "__main__":
    main()
