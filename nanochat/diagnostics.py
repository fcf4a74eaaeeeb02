"""How the policy moves during RL: the numbers behind the rl/* and attn/* metrics.

`Diagnostics` is the entry point: built once with the frozen reference, the task and a few probe
conversations, it measures each step's rollouts (`measure`) and the policy's attention
(`attention`), and returns named metrics. The update reports one more, the sampler-vs-trainer
log-prob gap, through `sampler_gap` (it needs the training forward's log-probs).

All of them come from the models: the policy's side and the reference's through the same function,
`completion_logits` (one no-grad forward per group, the prompt shared through a KV cache, fp32
logits), so that before the first update the two sides are identical in any dtype; attention
entropy from `attention_entropy` on fixed probes. The task supplies what a multiple-choice answer
is (task.letters, task.answer_prefix, task.predicted_letter, conversation["answer"]): the library
knows no task.

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
from nanochat.tracking import Histogram, Image


def letter_token_ids(tokenizer) -> list[int] | None:
    """Ids of " A" .. " E", the letter tokens that follow "Answer:", or None when a letter is not
    one token after "Answer:" in this tokenizer (then the letter diagnostics are off)."""
    scorer = LetterScorer(tokenizer)
    return scorer.letter_ids if scorer.single else None


def answer_letter_position(
    ids: list[int], tokenizer, letter_ids: list[int], prefix: str = "Answer:"
) -> int | None:
    """Index in `ids` (a completion) of the letter token after its last `prefix`, or None when
    there is no prefix or what follows it is not one of the letter tokens."""
    pieces = [tokenizer.enc.decode_single_token_bytes(t) for t in ids]
    text = b"".join(pieces)
    start = text.rfind(prefix.encode())
    if start < 0:
        return None
    target = start + len(prefix.encode())  # the letter's byte: first non-space after the colon
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


def letter_counts(predictions: list[str | None], letters=("A", "B", "C", "D", "E")) -> dict:
    """{"A": n, ..., "E": n, "none": n}: the letters the completions chose (None = no letter)."""
    counts = {letter: 0 for letter in letters}
    counts["none"] = 0
    for pred in predictions:
        counts[pred if pred in letters else "none"] += 1
    return counts


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position (B, T), 0 where the target is -1."""
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten().clamp(min=0), reduction="none")
    return -nll.view(targets.shape) * (targets != -1)


def sampler_gap(logp: torch.Tensor, rows, completion_mask: torch.Tensor) -> tuple[float, int]:
    """(sum of |trainer log-prob - sampler log-prob| over the completion tokens, their number):
    how far the training forward's log-probs (logp (B, T), laid out as rl.batch_tensors lays
    them) are from those the engine sampled with (bf16 rounding, kernels, ...)."""
    engine_lp = torch.zeros_like(logp)
    for r, c in enumerate(rows):
        span = slice(c.prompt_len - 1, len(c.ids) - 1)
        engine_lp[r, span] = torch.tensor(c.logprobs, device=logp.device)
    gap = ((logp - engine_lp).abs() * completion_mask).sum().item()
    return gap, int(completion_mask.sum().item())


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


def _every(period: int, step: int) -> bool:
    return period > 0 and step % period == 0


class Diagnostics:
    """Every RL diagnostic of a run, measured from the models: build once, then per step
    `measure(model, rollouts)` and `attention(model, step, last, out_dir)`.

    cfg: diagnostics (on/off), kl_sample_frac, attn_every, attn_heatmap_every, attn_probes;
    ref_model: the frozen reference (None with diagnostics off); task: the multiple-choice task
    (letters, answer_prefix, predicted_letter); probe_task: where the attention probes come from."""

    def __init__(self, cfg, ref_model, tokenizer, task, probe_task, max_tokens: int, pad_id: int):
        self.cfg, self.ref_model, self.tokenizer, self.task = cfg, ref_model, tokenizer, task
        self.pad_id = pad_id
        self.letter_ids = letter_token_ids(tokenizer)
        n = min(cfg.attn_probes, len(probe_task))
        render = tokenizer.render_conversation
        self.probes = [render(probe_task[i], max_tokens=max_tokens)[0] for i in range(n)]

    def measure(self, model, rollouts) -> tuple[dict, dict]:
        """(sums, lists), both by name, of this rank's rollouts, the policy before this step's
        update: predicted-letter counts and answered completions (sums) always; with diagnostics
        on, per completion of the subsample, sequence KL and k3 to the reference, and where there
        is an answer letter, letter KL and margin (lists)."""
        letters = self.task.letters
        predictions = [
            self.task.predicted_letter(conv, c.text)
            for conv, group in zip(rollouts.conversations, rollouts.groups)
            for c in group
        ]
        counts = letter_counts(predictions, letters)
        sums = {f"letter_pred/{k}": float(v) for k, v in counts.items()}
        positions = [[self._letter_position(c) for c in group] for group in rollouts.groups]
        sums["answered"] = float(sum(p is not None for row in positions for p in row))
        lists = {"kl_seq": [], "kl_seq_k3": [], "kl_letter": [], "margin": []}
        if not self.cfg.diagnostics:
            return sums, {}
        stride = max(1, round(1.0 / self.cfg.kl_sample_frac))
        for q, conv, group, pos in zip(
            rollouts.questions, rollouts.conversations, rollouts.groups, positions
        ):
            if q % stride == 0:
                scored = self.score_group(model, group, pos, letters.index(conv["answer"]))
                for name, values in scored.items():
                    lists[name] += values
        return sums, lists

    def _letter_position(self, c) -> int | None:
        """Index in the completion (after the prompt) of its final answer-letter token."""
        if not self.letter_ids:
            return None
        # a finished completion ends with the stop token it sampled, which is not text
        body = c.ids[c.prompt_len : len(c.ids) - c.finished]
        prefix = self.task.answer_prefix
        return answer_letter_position(body, self.tokenizer, self.letter_ids, prefix)

    def score_group(self, model, group, positions, gold: int) -> dict:
        """Policy and reference score one group by the same prefill -> per completion, kl_seq and
        kl_seq_k3, and for those with a letter position (index after the prompt), kl_letter and
        margin against the gold letter (index into task.letters).

        Reading the policy's side off the rollout instead (the engine's one-token-at-a-time
        decode) would be free, but in bf16 the decode and a prefill round differently, and the KLs
        would show a policy "moving" at step 0 (0.03-0.08 nats of sequence KL at d2). Through one
        code path, at step 0 policy and reference are the same function of the same weights: both
        KLs are exactly 0 in any dtype. The sampler vs trainer mismatch stays measured, by
        rl/logprob_gap_mean (sampler_gap)."""
        prompt = group[0].ids[: group[0].prompt_len]
        completions = [c.ids[c.prompt_len :] for c in group]
        policy = completion_logits(model, prompt, completions, self.pad_id)
        ref = completion_logits(self.ref_model, prompt, completions, self.pad_id)
        width = ref.size(1)
        targets = torch.tensor(
            [c + [-1] * (width - len(c)) for c in completions], device=ref.device
        )
        # Sequence KL: the sampled tokens came from the policy, so summing log pi - log pi_ref over
        # them estimates KL(pi || pi_ref) of whole completions without enumerating the vocabulary.
        seq_kl, seq_k3 = sequence_kl(
            token_logprobs(policy, targets), token_logprobs(ref, targets), targets != -1
        )
        lists = {"kl_seq": seq_kl.tolist(), "kl_seq_k3": seq_k3.tolist()}
        lists.update(kl_letter=[], margin=[])
        lettered = [r for r, p in enumerate(positions) if p is not None]
        if not lettered:
            return lists
        # Letter KL: at the one token where the answer is decided, compare the two models' choice
        # among the five letters exactly (a 5-way distribution), not through a sampled estimate.
        at = (torch.tensor(lettered), torch.tensor([positions[r] for r in lettered]))
        policy_letters, ref_letters = policy[at], ref[at]
        golds = torch.full((len(lettered),), gold, device=ref.device)
        lists["kl_letter"] = letter_kl(policy_letters, ref_letters, self.letter_ids).tolist()
        lists["margin"] = letter_margin(policy_letters, self.letter_ids, golds).tolist()
        return lists

    def attention(self, model, step: int, last: bool, out_dir) -> dict:
        """attn/entropy_mean and attn/entropy/layer_<i> every attn_every steps and at the end; one
        heatmap per layer of probe 0 every attn_heatmap_every steps and at the end; {} when not
        due.

        Training runs the fused attention kernel, which never materialises attention
        probabilities; these probe forwards take the explicit path (attn_capture) on a few fixed
        validation conversations, so the curve follows the same inputs across steps."""
        heatmaps = last or _every(self.cfg.attn_heatmap_every, step)
        due = heatmaps or _every(self.cfg.attn_every, step)
        if not (self.cfg.diagnostics and due and self.probes):
            return {}
        per_layer, probs = attention_entropy(model, self.probes, keep_probs=heatmaps)
        out = {"attn/entropy_mean": sum(per_layer) / len(per_layer)}
        out.update({f"attn/entropy/layer_{i}": v for i, v in enumerate(per_layer)})
        if heatmaps and probs:
            labels = [self.tokenizer.id_to_token(t) for t in self.probes[0]]
            for i, path in enumerate(save_heatmaps(probs, labels, out_dir, step)):
                out[f"attn/heatmap/layer_{i}"] = Image(path, caption=f"layer {i}, step {step}")
        return out


def step_diagnostics(sums: dict, lists: dict, letters) -> dict:
    """The rl/* metrics of measure's (reduced) sums and lists."""
    n = sum(sums[f"letter_pred/{k}"] for k in (*letters, "none"))
    out = {f"rl/letter_pred_counts/{k}": sums[f"letter_pred/{k}"] for k in (*letters, "none")}
    out["rl/answered_frac"] = sums["answered"] / max(n, 1.0)
    if lists:
        out["rl/kl_sequence_mean"] = _mean(lists["kl_seq"])
        out["rl/kl_sequence_k3_mean"] = _mean(lists["kl_seq_k3"])
        out["rl/kl_letter_mean"] = _mean(lists["kl_letter"])
        out["rl/letter_margin_mean"] = _mean(lists["margin"])
        if lists["margin"]:
            out["rl/letter_margin_hist"] = Histogram(lists["margin"])
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
