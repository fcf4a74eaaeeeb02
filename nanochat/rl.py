"""GRPO-style RL updates: group advantages, per-token loss weights, the clipped policy loss, and
the update that strings them together over micro-batches and ranks.

Rollouts (nanochat/rollouts.py) and rewards (the task's) come in; one or more optimizer steps go
out. Each piece is small enough to test against hand-computed values; the loss equals Hugging Face
TRL's GRPO losses (dapo / grpo / dr_grpo for token / sequence / constant) on identical tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nanochat import diagnostics
from nanochat.optim import clip_grad_norm_, overlap_grad_sync


def group_advantages(
    rewards: torch.Tensor, std_norm: bool, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """rewards (P, G) -> (advantages (P, G), zero_signal (P,) bool).

    Advantage = reward - group mean; with std_norm, divided by the group's sample standard
    deviation (Bessel's n - 1, as TRL's GRPOTrainer and verl compute it) + 1e-4. A group whose
    rewards are all equal has zero advantage everywhere: it carries no learning signal, and is
    flagged."""
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
        # The sample std (n - 1) rather than the population std: the advantages then equal TRL's
        # and verl's, so their scale (and clip behaviour) carries over; for G samples the two
        # differ by sqrt(G / (G - 1)), 1.22x at G = 3.
        adv = adv / (rewards.std(dim=1, keepdim=True, correction=1) + 1e-4)
    return adv.masked_fill(zero_signal[:, None], 0.0), zero_signal


def token_weights(
    mask: torch.Tensor, kind: str, global_tokens: float, global_seqs: float, max_new_tokens: int
) -> torch.Tensor:
    """Per-token loss weights (N, T) that make the summed loss over the GLOBAL batch a mean:

    token:    1 / (trained completion tokens in the global batch)  -- every token counts the same
    sequence: 1 / (its completion's length * completions)          -- every completion the same
    constant: 1 / (completions * max_new_tokens)                   -- Dr. GRPO: no length bias

    global_seqs counts every completion of the global batch, also those the mask leaves out
    (--mask-truncated): they add zero, as in TRL, so "constant" stays a constant and "sequence" is
    the mean over all completions."""
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


def batch_tensors(rows, pad_id: int, device, mask_truncated: bool):
    """inputs (B, T), targets (B, T) with -1 off the completion, completion mask (B, T) and the
    mask of tokens that train (the completion mask, minus truncated ones with mask_truncated)."""
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


def loss_normalisers(rows, mask_truncated: bool, info) -> tuple[float, float]:
    """(trained completion tokens, completions) of the GLOBAL batch.

    Every completion counts, zero-signal ones too: they carry zero advantage, so a batch that is
    mostly solved takes a proportionally smaller step. Counting over all ranks (not per rank or per
    micro-batch) makes the loss the same mean however the batch is split. mask_truncated takes the
    truncated completions' tokens out of the token count only (see token_weights)."""
    kept = [c for c in rows if c.finished or not mask_truncated]
    counts = torch.tensor(
        [float(sum(c.length for c in kept)), float(len(rows))],
        dtype=torch.float64,
        device=info.device,
    )
    if info.is_ddp:
        dist.all_reduce(counts)
    return counts[0].item(), counts[1].item()


def policy_update(model, ref_model, optimizers, groups, adv, zero_signal, cfg, info, pad_id):
    """The cfg.ppo_epochs optimizer steps on one rollout batch -> this rank's statistics, by name:
    clipped / clip_tokens (sums), the sampler-vs-trainer log-prob gap and its token count,
    grad_norm, skipped (no group on any rank had a signal)."""
    device = info.device
    stats = {"clipped": 0.0, "clip_tokens": 0.0, "logprob_gap": 0.0, "gap_tokens": 0.0}
    stats.update(grad_norm=0.0, skipped=False)
    rows = [c for group in groups for c in group]
    row_adv = adv.flatten().tolist()
    # Zero-signal groups have zero advantage everywhere: no forward/backward unless the KL penalty
    # applies to them too.
    trained = [
        i for i in range(len(rows)) if cfg.kl_coef > 0 or not zero_signal[i // cfg.num_samples]
    ]
    size = cfg.device_batch_size
    batches = [trained[k : k + size] for k in range(0, len(trained), size)]
    global_tokens, global_seqs = loss_normalisers(rows, cfg.mask_truncated, info)
    anything = torch.tensor([float(len(trained))], device=device)
    if info.is_ddp:
        dist.all_reduce(anything)
    if anything.item() == 0:  # every group on every rank is zero-signal: no update at all
        stats["skipped"] = True
        return stats

    first_pass = {}  # per micro-batch: old (and reference) log-probs for the later epochs
    for epoch in range(cfg.ppo_epochs):
        for b, idx in enumerate(batches):
            sub = [rows[i] for i in idx]
            x, y, comp, train_mask = batch_tensors(sub, pad_id, device, cfg.mask_truncated)
            logp = -model(x, y, loss_reduction="none")  # log p of each target, 0 off the completion
            if epoch == 0:
                ref_logp = None
                if cfg.kl_coef > 0:
                    with torch.no_grad():
                        ref_logp = -ref_model(x, y, loss_reduction="none")
                gap, tokens = diagnostics.sampler_gap(logp.detach(), sub, comp)
                stats["logprob_gap"] += gap
                stats["gap_tokens"] += tokens
                # The first pass is on-policy: old log-probs = these, detached, so the ratio is 1.
                first_pass[b] = (logp.detach(), ref_logp)
            old_logp, ref_logp = first_pass[b]
            weights = token_weights(
                train_mask, cfg.loss_norm, global_tokens, global_seqs, cfg.max_new_tokens
            )
            a = torch.tensor([row_adv[i] for i in idx], device=device)
            loss, clipped = policy_loss(
                logp, old_logp, a, weights, cfg.clip_eps, cfg.clip_eps_high, cfg.kl_coef, ref_logp
            )
            if b == len(batches) - 1:  # the last backward sends the gradients as they complete
                overlap_grad_sync(optimizers)
            # the optimizers average gradients over ranks, so * world makes it the global sum
            (loss * info.world_size).backward()
            if epoch > 0:  # on the first pass the ratio is exactly 1: nothing can be clipped
                stats["clipped"] += clipped.sum().item()
                stats["clip_tokens"] += train_mask.sum().item()
        grad_norm = clip_grad_norm_(optimizers, cfg.grad_clip if cfg.grad_clip > 0 else None)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        stats["grad_norm"] = float(grad_norm)
    return stats
