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

import bisect
import itertools
import math

import torch
import torch.nn.functional as F

from nanochat.gpt import AttentionEntropy
from nanochat.mc_eval import LetterScorer
from nanochat.tracking import Histogram, Image, Table


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


def locate(ids: list[int], tokenizer, texts: list[str]) -> list[tuple[int, int] | None]:
    """Token spans [start, end) of each text in the decoded ids, searched in order (each after the
    previous one's end), or None for a text not found: where the question, the options and the
    answer sit in a prompt, for attention shares and heatmap ticks."""
    pieces = [tokenizer.enc.decode_single_token_bytes(t) for t in ids]
    ends = list(itertools.accumulate(len(piece) for piece in pieces))  # byte end of each token
    data = b"".join(pieces)
    spans, cursor = [], 0
    for text in texts:
        start = data.find(text.encode(), cursor) if text else -1
        if start < 0:
            spans.append(None)
            continue
        cursor = start + len(text.encode())
        first = bisect.bisect_right(ends, start)  # the token holding byte `start`
        last = bisect.bisect_left(ends, cursor)  # the token holding the text's last byte
        spans.append((first, last + 1))
    return spans


class ResidualAt:
    """A residual_capture that keeps, per layer, only the rows' residual stream at one position
    each (n, n_embd), fp32: what the logit lens reads, without keeping whole activations."""

    def __init__(self, rows: list[int], positions: list[int], device):
        self.rows = torch.tensor(rows, device=device)
        self.positions = torch.tensor(positions, device=device)
        self.layers: list[torch.Tensor] = []

    def append(self, x: torch.Tensor) -> None:
        self.layers.append(x[self.rows, self.positions].float())


class AttentionShares:
    """An attn_capture that keeps, per layer, only how the rows' query at one position each splits
    its attention (mean over heads) among key spans: (n, spans) shares, given span masks
    (spans, Tk) over the keys (cached ones first). At most one layer's probabilities are alive."""

    def __init__(self, rows: list[int], positions: list[int], span_masks: torch.Tensor):
        device = span_masks.device
        self.rows = torch.tensor(rows, device=device)
        self.positions = torch.tensor(positions, device=device)
        self.masks = span_masks.float()
        self.layers: list[torch.Tensor] = []

    def append(self, probs: torch.Tensor) -> None:  # (B, n_head, Tq, Tk)
        at = probs[self.rows, :, self.positions].mean(1)  # (n, Tk)
        self.layers.append(at @ self.masks.T)


@torch.no_grad()
def completion_logits(
    model,
    prompt: list[int],
    completions: list[list[int]],
    pad_id: int,
    attn_capture=None,
    residual_capture=None,
) -> torch.Tensor:
    """Float logits (k, longest, V): row i, position j predicts token j of completions[i] (all of
    them continue the same prompt). The prompt is forwarded once and its keys/values shared by the
    k rows (a KV cache), so a group of samples costs one prompt plus its completions, not k whole
    sequences. Shorter rows are padded at the end; their extra positions are garbage, to be masked
    by the caller. The captures see the completions' forward only (position j of it predicts
    token j + 1; its keys are the prompt's, then the completions')."""
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
    logits = model(
        rest, kv_cache=cache, attn_capture=attn_capture, residual_capture=residual_capture
    )
    return torch.cat([first, logits], dim=1).float()


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
    spans: list[tuple[str, int, int]],
    out_dir,
    step: int,
    prefix: str = "heatmap_rl",
) -> list:
    """One PNG per layer (attention averaged over heads, queries down, keys across) -> the paths.

    spans: (label, start, end) token ranges (the question, each option, the completion, the answer
    position), marked on both axes: a tick labelled at each span's start and a thin line at its
    edges, so one can see whether the answer looks at the options."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    starts = [start for _, start, _ in spans]
    labels = [label for label, _, _ in spans]
    for layer, probs in enumerate(probs_per_layer):
        fig, ax = plt.subplots(figsize=(6, 5.4))
        # square-root colour scale: most weight sits on a few keys, the rest would all look black
        scale = matplotlib.colors.PowerNorm(gamma=0.5, vmin=0.0, vmax=1.0)
        image = ax.imshow(probs.float().mean(0).numpy(), cmap="viridis", norm=scale, aspect="auto")
        ax.set_title(
            f"layer {layer} attention, mean over heads, sqrt scale (step {step})", fontsize=9
        )
        ax.set_xlabel("key (token position; spans start at the ticks)")
        ax.set_ylabel("query")
        ax.set_xticks(starts, labels, rotation=90, fontsize=7)
        ax.set_yticks(starts, labels, fontsize=7)
        # the span edges: thin lines across the whole map, one collection per axis
        edges = sorted({edge - 0.5 for _, start, end in spans for edge in (start, end)})
        size = probs.size(-1) - 0.5
        style = dict(colors="white", linewidth=0.4, alpha=0.6)
        ax.vlines(edges, -0.5, size, **style)
        ax.hlines(edges, -0.5, size, **style)
        fig.colorbar(image, ax=ax, fraction=0.046)
        fig.tight_layout()
        path = out_dir / f"{prefix}_layer_{layer}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def weight_drift(model, ref_model) -> dict[str, float]:
    """Per transformer layer, and for the embeddings and lm_head, the relative distance of the
    policy's weights from the reference's: ||W - W_ref|| / ||W_ref|| with the Frobenius norms
    taken over all of the group's matrices together (sqrt of the summed squares), so a layer's
    figure weighs each matrix by its size. Keys: rl/weight_drift/layer_<i>, .../embedding (the token
    and value embeddings), .../lm_head."""
    moved: dict[str, float] = {}
    ref = dict(ref_model.named_parameters())
    for name, param in model.named_parameters():
        if name.startswith("transformer.h."):
            group = f"rl/weight_drift/layer_{name.split('.')[2]}"
        elif name.startswith("lm_head"):
            group = "rl/weight_drift/lm_head"
        else:  # transformer.wte, value_embeds.*
            group = "rl/weight_drift/embedding"
        diff, base = moved.get(group, (0.0, 0.0))
        r = ref[name].detach().float()
        step = (param.detach().float() - r).pow(2).sum().item()
        moved[group] = (diff + step, base + r.pow(2).sum().item())
    return {group: math.sqrt(d) / max(math.sqrt(b), 1e-12) for group, (d, b) in moved.items()}


def entropy_summary(values: list[float], high: float = 1.0) -> dict[str, float]:
    """mean, median, 90th percentile and the share above `high` nats of token entropies."""
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    return {
        "rl/token_entropy_mean": t.mean().item(),
        "rl/token_entropy_p50": t.quantile(0.5).item(),
        "rl/token_entropy_p90": t.quantile(0.9).item(),
        "rl/high_entropy_frac": (t > high).double().mean().item(),
    }


def _every(period: int, step: int) -> bool:
    return period > 0 and step % period == 0


# The spans the answer position's attention is split over, and their metrics' names.
ANSWER_SHARES = {
    "gold_option": "attn/answer_to/gold_option",
    "other_options": "attn/answer_to/other_options",
    "completion": "attn/answer_to/completion",
    "prompt_rest": "attn/answer_to/prompt_rest",
}
SPANS = tuple(ANSWER_SHARES)


class Diagnostics:
    """Every RL diagnostic of a run, measured from the models: build once, then per step
    `measure(model, rollouts, step)`, and `attention(model, step, last, out_dir)`,
    `weight_drift(model)` and `samples(...)` at their cadences.

    cfg: diagnostics (on/off), kl_sample_frac, attn_every, attn_heatmap_every, attn_probes;
    ref_model: the frozen reference (None with diagnostics off); task: the multiple-choice task
    (letters, answer_prefix, predicted_letter, prompt_parts); probe_task: where the attention
    probes come from."""

    def __init__(self, cfg, ref_model, tokenizer, task, probe_task, max_tokens: int, pad_id: int):
        self.cfg, self.ref_model, self.tokenizer, self.task = cfg, ref_model, tokenizer, task
        self.pad_id = pad_id
        self.letter_ids = letter_token_ids(tokenizer)
        n = min(cfg.attn_probes, len(probe_task))
        self.probe_convs = [probe_task[i] for i in range(n)]
        render = tokenizer.render_conversation
        self.probes = [render(conv, max_tokens=max_tokens)[0] for conv in self.probe_convs]

    def measure(self, model, rollouts, step: int) -> tuple[dict, dict]:
        """(sums, lists), both by name, of this rank's rollouts, the policy before this step's
        update: predicted-letter counts and answered completions (sums) always; with diagnostics
        on, the sampled tokens' entropies, and per completion of the subsample the KLs to the
        reference, and where there is an answer letter its margin, letter KL, logit-lens margins
        per layer (policy and reference) and, every attn_every steps, where it looks (lists)."""
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
        if not self.cfg.diagnostics:
            return sums, {}
        lists = {"token_entropy": [e for c in rollouts.rows() for e in c.entropies or ()]}
        stride = max(1, round(1.0 / self.cfg.kl_sample_frac))
        look = _every(self.cfg.attn_every, step)
        for q, conv, group, pos in zip(
            rollouts.questions, rollouts.conversations, rollouts.groups, positions
        ):
            if q % stride == 0:
                scored = self.score_group(model, group, pos, conv, attention=look)
                for name, values in scored.items():
                    lists.setdefault(name, []).extend(values)
        return sums, lists

    def _letter_position(self, c) -> int | None:
        """Index in the completion (after the prompt) of its final answer-letter token."""
        if not self.letter_ids:
            return None
        # a finished completion ends with the stop token it sampled, which is not text
        body = c.ids[c.prompt_len : len(c.ids) - c.finished]
        prefix = self.task.answer_prefix
        return answer_letter_position(body, self.tokenizer, self.letter_ids, prefix)

    def score_group(self, model, group, positions, conv: dict, attention: bool = False) -> dict:
        """Policy and reference score one group by the same prefill -> lists by name: per
        completion kl_seq and kl_seq_k3; for those with an answer letter (positions: index in the
        completion, or None) kl_letter, margin (gold letter: conv["answer"]), and per layer i
        lens/layer_<i> and lens_ref/layer_<i>, the margin read through the logit lens at the
        position that emits the letter; with attention, answer_to/<span>/layer_<i>, the policy's
        attention shares of that position over SPANS.

        Both sides run the same code path (with attention, both take the explicit attention
        path), so at step 0 every policy-minus-reference figure is exactly 0 in any dtype. Reading
        the policy's side off the rollout instead (the engine's one-token-at-a-time decode) would
        be free, but in bf16 the decode and a prefill round differently, and the KLs would show a
        policy "moving" at step 0 (0.03-0.08 nats of sequence KL at d2). The sampler vs trainer
        mismatch stays measured, by rl/logprob_gap_mean (sampler_gap)."""
        prompt = group[0].ids[: group[0].prompt_len]
        completions = [c.ids[c.prompt_len :] for c in group]
        gold = self.task.letters.index(conv["answer"])
        # the lens and the attention shares read the query that emits the letter: completion
        # position p is predicted by position p - 1 of the completions' forward (p = 0, predicted
        # by the prompt's last position, is not captured)
        lettered = [r for r, p in enumerate(positions) if p is not None]
        probed = [r for r in lettered if positions[r] > 0]
        queries = [positions[r] - 1 for r in probed]
        device = next(model.parameters()).device
        sides = {}
        for side, m in (("policy", model), ("ref", self.ref_model)):
            residuals = ResidualAt(probed, queries, device) if probed else None
            shares = None
            if attention and probed:
                masks = self._span_masks(prompt, conv, max(map(len, completions)) - 1, device)
                shares = AttentionShares(probed, queries, masks)
            logits = completion_logits(m, prompt, completions, self.pad_id, shares, residuals)
            sides[side] = (logits, residuals, shares)
        policy, ref = sides["policy"][0], sides["ref"][0]
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
        if not lettered:
            return lists
        # Letter KL: at the one token where the answer is decided, compare the two models' choice
        # among the five letters exactly (a 5-way distribution), not through a sampled estimate.
        at = (torch.tensor(lettered), torch.tensor([positions[r] for r in lettered]))
        policy_letters, ref_letters = policy[at], ref[at]
        golds = torch.full((len(lettered),), gold, device=ref.device)
        lists["kl_letter"] = letter_kl(policy_letters, ref_letters, self.letter_ids).tolist()
        lists["margin"] = letter_margin(policy_letters, self.letter_ids, golds).tolist()
        if not probed:
            return lists
        # The logit lens: each layer's residual stream through the final norm and lm_head, the
        # five letters only; where along the depth the gold letter pulls ahead of the others.
        golds = torch.full((len(probed),), gold, device=ref.device)
        for side, name in (("policy", "lens"), ("ref", "lens_ref")):
            m = model if side == "policy" else self.ref_model
            for i, residual in enumerate(sides[side][1].layers):
                lens = m.lens_logits(residual, self.letter_ids)
                lists[f"{name}/layer_{i}"] = letter_margin(lens, list(range(5)), golds).tolist()
        shares = sides["policy"][2]
        for i, layer in enumerate(shares.layers if shares else []):
            for k, span in enumerate(SPANS):
                lists[f"answer_to/{span}/layer_{i}"] = layer[:, k].tolist()
        return lists

    def _span_masks(self, prompt, conv: dict, rest: int, device) -> torch.Tensor:
        """(len(SPANS), len(prompt) + rest) masks over the keys of the completions' forward: the
        gold option's text in the prompt, the other options', the completion's tokens, and the
        rest of the prompt (what no other span covers)."""
        parts = self.task.prompt_parts(conv)
        found = locate(prompt, self.tokenizer, [text for _, text in parts])
        masks = torch.zeros(len(SPANS), len(prompt) + rest, device=device)
        for (label, _), span in zip(parts, found):
            if span is not None and label in self.task.letters:
                masks[0 if label == conv["answer"] else 1, span[0] : span[1]] = 1.0
        masks[2, len(prompt) :] = 1.0
        masks[3, : len(prompt)] = 1.0 - masks[:2, : len(prompt)].amax(0)
        return masks

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
            spans = self.probe_spans(self.probe_convs[0], self.probes[0])
            for i, path in enumerate(save_heatmaps(probs, spans, out_dir, step)):
                out[f"attn/heatmap/layer_{i}"] = Image(path, caption=f"layer {i}, step {step}")
        return out

    def probe_spans(self, conv: dict, ids: list[int]) -> list[tuple[str, int, int]]:
        """(label, start, end) of the question, each option, the answer (the assistant's text)
        and its answer letter in a whole rendered conversation."""
        parts = self.task.prompt_parts(conv) + [("answer", conv["messages"][-1]["content"])]
        found = locate(ids, self.tokenizer, [text for _, text in parts])
        spans = [(label, *span) for (label, _), span in zip(parts, found) if span is not None]
        letter = None
        if self.letter_ids:
            prefix = self.task.answer_prefix
            letter = answer_letter_position(ids, self.tokenizer, self.letter_ids, prefix)
        if letter is not None:
            spans.append(("letter", letter, letter + 1))
        return spans

    def weight_drift(self, model) -> dict:
        """rl/weight_drift/layer_<i>, /embedding, /lm_head ({} with diagnostics off)."""
        if not self.cfg.diagnostics or self.ref_model is None:
            return {}
        return dict(sorted(weight_drift(model, self.ref_model).items()))

    def samples(self, rollouts, adv: torch.Tensor, step: int, rows: int = 8) -> dict:
        """rl/samples: a table of a few of this rank's completions of the step (question, text,
        letter, reward, advantage): groups with a learning signal first (what the update pushes
        up and down), at most 4 distinct texts of each, `rows` in all."""
        order = sorted(range(len(rollouts.groups)), key=lambda g: not bool(adv[g].abs().sum()))
        data = []
        for g in order:
            if len(data) >= rows:  # the letters of the groups left out are not worth reading
                break
            q, conv, group = rollouts.questions[g], rollouts.conversations[g], rollouts.groups[g]
            seen = set()
            for i, c in enumerate(group):
                if c.text in seen or len(seen) == 4:
                    continue
                seen.add(c.text)
                letter = self.task.predicted_letter(conv, c.text) or ""
                data.append([step, q, c.text, letter, c.reward, float(adv[g, i])])
        columns = ["step", "question", "text", "letter", "reward", "advantage"]
        return {"rl/samples": Table(columns, data[:rows], file="rl_samples.jsonl")}


def step_diagnostics(sums: dict, lists: dict, letters) -> dict:
    """The rl/* and attn/answer_to/* metrics of measure's (reduced) sums and lists."""
    n = sum(sums[f"letter_pred/{k}"] for k in (*letters, "none"))
    out = {f"rl/letter_pred_counts/{k}": sums[f"letter_pred/{k}"] for k in (*letters, "none")}
    out["rl/answered_frac"] = sums["answered"] / max(n, 1.0)
    if not lists:
        return out
    out["rl/kl_sequence_mean"] = _mean(lists.get("kl_seq", []))
    out["rl/kl_sequence_k3_mean"] = _mean(lists.get("kl_seq_k3", []))
    out["rl/kl_letter_mean"] = _mean(lists.get("kl_letter", []))
    out["rl/letter_margin_mean"] = _mean(lists.get("margin", []))
    if lists.get("margin"):
        out["rl/letter_margin_hist"] = Histogram(lists["margin"])
    out.update(entropy_summary(lists.get("token_entropy", [])))
    for name, values in sorted(lists.items()):
        if name.startswith("lens/"):
            out["rl/lens_margin/" + name[5:]] = _mean(values)
        elif name.startswith("lens_ref/"):
            out["rl/lens_margin_ref/" + name[9:]] = _mean(values)
    for span, metric in ANSWER_SHARES.items():  # per layer, and averaged over the layers
        layers = [k for k in lists if k.startswith(f"answer_to/{span}/layer_")]
        for key in layers:
            out[f"{metric}/{key.rsplit('/', 1)[1]}"] = _mean(lists[key])
        if layers:
            out[metric] = sum(_mean(lists[k]) for k in layers) / len(layers)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
