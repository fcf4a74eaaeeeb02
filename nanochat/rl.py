"""GRPO-style RL pieces: rollout seeds, rewards, group advantages and the clipped policy loss.

scripts/chat_rl.py strings them together; each is small enough to test against hand-computed values.
"""

from __future__ import annotations

import re

import torch

from tasks.aqua import answer_letters

_FINAL_ANSWER = re.compile(r"(?:^|\n)Answer: [A-E]\s*\Z")


def rollout_seed(seed: int, step: int, question: int) -> int:
    """Sampling seed of one question's group: depends on (seed, step, global question index) only,
    so the rollouts of a step are the same whatever the number of ranks and across a resume. The
    engine then seeds sample i of the group from (this seed, i)."""
    mixed = int(seed) * 1_000_000_007 + int(step) * 2_654_435_761 + int(question) * 97_531
    return mixed % (2**62)


def correctness_reward(task, conversation: dict, completion: str) -> float:
    """1.0 when the task grades the completion right. A completion whose answer statements name two
    different letters ("Answer: B ... Answer: D") earns nothing: hedging must not pay."""
    if len(set(answer_letters(completion))) > 1:
        return 0.0
    return float(task.evaluate(conversation, completion))


def well_formed(completion: str, finished: bool) -> bool:
    """One "Answer: X" in the completion, on its final line, and the model stopped by itself."""
    return finished and completion.count("Answer:") == 1 and bool(_FINAL_ANSWER.search(completion))


def format_bonus(format_reward: float, anneal_steps: int, step: int) -> float:
    """The format bonus at `step`: format_reward, decaying linearly to 0 over anneal_steps (0: no
    decay)."""
    if anneal_steps <= 0:
        return format_reward
    return format_reward * max(0.0, 1.0 - step / anneal_steps)


def group_advantages(
    rewards: torch.Tensor, std_norm: bool, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (P, G) -> (advantages (P, G), zero_signal (P,) bool).

    Advantage = reward - group mean (divided by the group std with std_norm). A group whose rewards
    are all equal has zero advantage everywhere: it carries no learning signal, and is flagged."""
    # GRPO's baseline: the G samples of one question are compared with each other, not with a
    # learned value function. What is better than its siblings is pushed up, what is worse down,
    # and the question's difficulty (the group mean) cancels out.
    mean = rewards.mean(dim=1, keepdim=True)
    adv = rewards - mean
    zero_signal = (rewards.max(dim=1).values - rewards.min(dim=1).values) <= eps
    if std_norm:
        # Dividing by the std scales every group to unit size, so questions that are nearly solved
        # or nearly hopeless (small std) get as large a push as open ones; off by default, as Dr.
        # GRPO recommends.
        adv = adv / (rewards.std(dim=1, keepdim=True, unbiased=False) + 1e-4)
    return adv.masked_fill(zero_signal[:, None], 0.0), zero_signal


def token_weights(
    mask: torch.Tensor, kind: str, global_tokens: float, global_seqs: float, max_new_tokens: int
) -> torch.Tensor:
    """Per-token loss weights (N, T) that make the summed loss over the GLOBAL batch a mean:

    token:    1 / (completion tokens in the global batch)   -- every token counts the same
    sequence: 1 / (its completion's length * completions)   -- every completion counts the same
    constant: 1 / (completions * max_new_tokens)            -- Dr. GRPO: no length bias at all"""
    # Why the choice matters: with "sequence" a token of a short completion weighs more than one of
    # a long completion, so wrong answers are pushed down less per token the longer they ramble
    # (the length bias Dr. GRPO points out). "token" removes that but couples every completion's
    # weight to the batch's total length; "constant" divides by a number fixed before sampling.
    mask = mask.float()
    if kind == "token":
        return mask / max(global_tokens, 1.0)
    if kind == "sequence":
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * max(global_seqs, 1.0))
    if kind == "constant":
        return mask / (max(global_seqs, 1.0) * max_new_tokens)
    raise ValueError(f"loss normaliser must be token, sequence or constant, got {kind!r}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    weights: torch.Tensor,
    clip_eps: float,
    clip_eps_high: float,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The clipped surrogate (PPO/GRPO) with an optional k3 KL penalty, summed with `weights`.

    logp/old_logp/ref_logp (N, T): log-probs of the sampled tokens; adv (N,) per completion. On the
    first pass over a batch old_logp is logp.detach(): the ratio is exactly 1 and the gradient is
    the plain policy gradient adv * grad log pi. Returns (loss, clipped (N, T) bool: the tokens
    whose ratio was clipped)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped = ratio * a
    # Clipping: once a token's probability has moved more than eps away from where the batch was
    # sampled, the clipped term is constant and its gradient is zero, so later passes over the
    # same batch cannot keep pushing it. Taking the minimum keeps the pessimistic of the two, so
    # the clip only ever removes gain, never a penalty. eps_high > eps (DAPO) leaves unlikely good
    # tokens more room to grow.
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    if kl_coef > 0.0:
        # k3 = exp(r) - 1 - r with r = log ref - log pi: an estimate of KL(pi || ref) from the
        # sampled tokens alone that is never negative.
        r = ref_logp - logp
        per_token = per_token + kl_coef * (r.exp() - 1.0 - r)
    was_clipped = (clipped < unclipped) & (weights > 0)
    return (per_token * weights).sum(), was_clipped
