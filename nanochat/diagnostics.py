"""How the policy moves during RL: the numbers behind the rl/* and attn/* metrics.

All of them come from the models: the policy's side and the reference's through the same function,
`completion_logits` (one no-grad forward per group, the prompt shared through a KV cache, fp32
logits), so that before the first update the two sides are identical in any dtype; attention
entropy from `attention_entropy` on fixed probes.

- The answer letter of a completion is the token after its last "Answer:"
  (`answer_letter_position`). At that position the five letter tokens, as the tokenizer writes them
  after "Answer:" (" A" .. " E"), are the choice the model makes; restricting the logits to them
  gives a 5-way distribution.
- letter KL: KL(policy || reference) between those two 5-way distributions.
- letter margin: policy logit of the correct letter minus the largest of the other four (> 0: the
  model prefers the right letter at the moment it commits).
- sequence KL: sum over a completion's sampled tokens of log pi - log pi_ref (an unbiased estimate
  of KL(pi || pi_ref) over whole sequences, since the tokens were drawn from pi), and the k3 form
  sum(exp(r) - 1 - r) with r = log pi_ref - log pi (always >= 0, lower variance).
- attention entropy: per layer, the entropy of each head's attention distribution at each query
  position, averaged (gpt.AttentionEntropy reduces inside the attention computation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanochat.gpt import AttentionEntropy
from nanochat.mc_eval import LetterScorer
from tasks.aqua import ANSWER_PREFIX, AQUA_LETTERS

ANSWER_BYTES = ANSWER_PREFIX.encode()


def letter_token_ids(tokenizer) -> list[int] | None:
    """Ids of " A" .. " E", the letter tokens that follow "Answer:", or None when a letter is not
    one token after "Answer:" in this tokenizer (then the letter diagnostics are off)."""
    scorer = LetterScorer(tokenizer)
    return scorer.letter_ids if scorer.single else None


def answer_letter_position(ids: list[int], tokenizer, letter_ids: list[int]) -> int | None:
    """Index in `ids` (a completion) of the letter token after its last "Answer:", or None when
    there is no "Answer:" or what follows it is not one of the letter tokens."""
    pieces = [tokenizer.enc.decode_single_token_bytes(t) for t in ids]
    text = b"".join(pieces)
    start = text.rfind(ANSWER_BYTES)
    if start < 0:
        return None
    target = start + len(ANSWER_BYTES)  # the letter's byte: first non-space after the colon
    while text[target : target + 1] == b" ":
        target += 1
    offset = 0
    for i, piece in enumerate(pieces):
        if offset + len(piece) > target:  # token i holds that byte
            return i if ids[i] in letter_ids else None
        offset += len(piece)
    return None


@torch.no_grad()
def completion_logits(
    model, prompt: list[int], completions: list[list[int]], pad_id: int
) -> torch.Tensor:
    """Float logits (k, longest, V): row i, position j predicts token j of completions[i] (all of
    them continue the same prompt). The prompt is forwarded once and its keys/values shared by the
    k rows (a KV cache), so a group of samples costs one prompt plus its completions, not k whole
    sequences. Shorter rows are padded at the end; their extra positions are garbage, to be masked
    by the caller."""
    device = next(model.parameters()).device
    longest = max(len(c) for c in completions)
    cache = model.new_kv_cache(1, len(prompt) + longest)
    first = model(torch.tensor([prompt], device=device), kv_cache=cache)[:, -1:]  # predicts token 0
    first = first.expand(len(completions), 1, first.size(-1))
    if longest == 1:
        return first.float()
    cache = cache.repeat_batch(len(completions))
    rest = torch.tensor(
        [c[:-1] + [pad_id] * (longest - len(c)) for c in completions], device=device
    )
    return torch.cat([first, model(rest, kv_cache=cache)], dim=1).float()


def letter_kl(
    policy_logits: torch.Tensor, ref_logits: torch.Tensor, letter_ids: list[int]
) -> torch.Tensor:
    """(N,) KL(policy || reference) over the five letters, from full-vocabulary logits (N, V)."""
    logp = F.log_softmax(policy_logits[:, letter_ids].float(), dim=-1)
    logq = F.log_softmax(ref_logits[:, letter_ids].float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def letter_margin(
    policy_logits: torch.Tensor, letter_ids: list[int], correct: torch.Tensor
) -> torch.Tensor:
    """(N,) logit of the correct letter (index 0-4 in `correct`) minus the best other one."""
    letters = policy_logits[:, letter_ids].float()
    right = letters.gather(1, correct[:, None]).squeeze(1)
    others = letters.scatter(1, correct[:, None], float("-inf")).max(-1).values
    return right - others


def sequence_kl(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per completion (rows of (N, T) log-probs of the sampled tokens, mask 1 on completion tokens):
    (sum of log pi - log pi_ref, sum of k3 = exp(r) - 1 - r), with r = log pi_ref - log pi."""
    mask = mask.float()
    diff = (logp - ref_logp) * mask
    r = (ref_logp - logp) * mask
    return diff.sum(-1), ((r.exp() - 1.0 - r) * mask).sum(-1)


def letter_counts(predictions: list[str | None]) -> dict[str, int]:
    """{"A": n, ..., "E": n, "none": n}: the letters the completions chose (None = no letter)."""
    counts = {letter: 0 for letter in AQUA_LETTERS}
    counts["none"] = 0
    for pred in predictions:
        counts[pred if pred in AQUA_LETTERS else "none"] += 1
    return counts


@torch.no_grad()
def attention_entropy(model, probes: list[list[int]], keep_probs: bool = False):
    """Mean attention entropy per layer over the probe token sequences (one forward each), and, with
    keep_probs, the first probe's attention probabilities per layer (n_head, T, T) for heatmaps."""
    device = next(model.parameters()).device
    totals, weights, first_probs = None, 0, []
    for i, ids in enumerate(probes):
        capture = AttentionEntropy(keep_probs=keep_probs and i == 0)
        model(torch.tensor([ids], device=device), attn_capture=capture)
        layer_means = torch.tensor(capture.per_layer())
        totals = layer_means * len(ids) if totals is None else totals + layer_means * len(ids)
        weights += len(ids)
        if capture.probs:
            first_probs = capture.probs
    return (totals / weights).tolist(), first_probs


def save_heatmaps(
    probs_per_layer: list[torch.Tensor],
    labels: list[str],
    out_dir,
    step: int,
    prefix: str = "heatmap_rl",
) -> list:
    """One PNG per layer (attention averaged over heads, queries down, keys across) -> the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for layer, probs in enumerate(probs_per_layer):
        fig, ax = plt.subplots(figsize=(5, 4.5))
        # square-root colour scale: most weight sits on a few keys, the rest would all look black
        scale = matplotlib.colors.PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
        image = ax.imshow(probs.float().mean(0).numpy(), cmap="viridis", norm=scale, aspect="auto")
        ax.set_title(
            f"layer {layer} attention, mean over heads, sqrt scale (step {step})", fontsize=9
        )
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        if len(labels) <= 48:  # token labels stay readable on short probes only
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=5)
            ax.set_yticks(range(len(labels)), labels, fontsize=5)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"{prefix}_layer_{layer}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths
