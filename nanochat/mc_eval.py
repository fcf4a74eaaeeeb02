"""Scoring a chat model on AQuA-style multiple choice: one implementation for chat_eval and chat_rl.

- generative: decode a rationale for each problem (greedy, and optionally k samples) and read the
  letter its answer statement names (tasks.aqua.extract_letter).
- categorical: no rationale. "Answer:" is put right after the prompt and the five continuations
  " A" .. " E" are compared; a batch of prompts goes through one forward.

Each rank scores the problems rank, rank + world, ...; the per-problem results are summed over ranks
(each problem is filled in by exactly one rank), so every rank ends with the whole table.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.common import print0
from tasks.aqua import ANSWER_PREFIX, AQUA_LETTERS, extract_letter

NO_LETTER = len(AQUA_LETTERS)  # the sixth column of a confusion matrix: no letter found


def letter_index(letter: str | None) -> int:
    """0-4 for A-E, NO_LETTER for anything else (None included)."""
    return AQUA_LETTERS.index(letter) if letter in AQUA_LETTERS else NO_LETTER


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _my_batches(task, tokenizer, n: int, batch_prompts: int, progress: str | None):
    """This rank's share of the first n problems, batch_prompts at a time: (indices, conversations,
    prompts) per batch; with `progress`, rank 0 prints a line after each batch."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    mine = list(range(rank, n, world))
    started = time.time()
    for start in range(0, len(mine), batch_prompts):
        chunk = mine[start : start + batch_prompts]
        convs = [task[i] for i in chunk]
        yield chunk, convs, [tokenizer.render_for_completion(conv) for conv in convs]
        if progress:
            done = (start + len(chunk)) * world
            print0(f"  {progress}: {done}/{n} problems, {time.time() - started:.0f}s")


def _sum_over_ranks(table: torch.Tensor) -> list[list[int]]:
    """The per-problem table summed over ranks, as one list per column."""
    if _distributed():
        dist.all_reduce(table)
    return table.long().T.tolist()


def letter_recall(gold: list[int], pred: list[int]) -> dict[str, float]:
    """For each gold letter X, the accuracy on the problems whose gold letter is X (the recall of
    X). A letter no problem has is left out rather than counted as 0."""
    recall = {}
    for index, letter in enumerate(AQUA_LETTERS):
        mine = [p for g, p in zip(gold, pred) if g == index]
        if mine:
            recall[letter] = sum(p == index for p in mine) / len(mine)
    return recall


def recall_std(recall: dict[str, float]) -> float:
    """Population standard deviation (divide by the number of letters, not n - 1) of the recalls of
    the letters that have problems: 0 when every letter is answered equally well, large when the
    model favours some letters. NaN when no letter has a problem."""
    if not recall:
        return float("nan")
    values = list(recall.values())
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


# ------------------------------------------------------------------------------------------------
# generative


@dataclass
class GenerativeResult:
    """Per problem (all ranks): gold letter 0-4, greedy letter 0-5 (NO_LETTER: none), greedy tokens
    generated (stop token included), and how many of the k samples named the gold letter."""

    gold: list[int]
    greedy: list[int]
    greedy_tokens: list[int]
    sample_hits: list[int]
    k: int  # samples per problem besides the greedy one (1: greedy only)
    texts: dict[int, str]  # this rank's greedy completions, by problem index

    @property
    def acc(self) -> float:
        return sum(g == p for g, p in zip(self.gold, self.greedy)) / max(len(self.gold), 1)

    @property
    def pass_at_k(self) -> float:
        return sum(h > 0 for h in self.sample_hits) / max(len(self.gold), 1)

    @property
    def sample_acc(self) -> float:
        return sum(self.sample_hits) / max(len(self.gold) * self.k, 1)

    @property
    def letter_recall(self) -> dict[str, float]:
        """Greedy accuracy per gold letter, {"A": ..., ...}; letters no problem has are left out."""
        return letter_recall(self.gold, self.greedy)

    @property
    def letter_recall_std(self) -> float:
        """Population std of letter_recall's values (over the letters that have problems)."""
        return recall_std(self.letter_recall)


@torch.no_grad()
def generative_eval(
    engine,
    tokenizer,
    task,
    n: int,
    max_tokens: int,
    batch_prompts: int,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    progress: str | None = None,
) -> GenerativeResult:
    """Greedy completions of the first n problems and, with num_samples > 1, that many samples at
    `temperature` (problem i seeded by seed + i, so any split over ranks draws the same samples).
    batch_prompts problems decode together; `progress` labels a progress line after each batch."""
    device = next(engine.model.parameters()).device
    # columns: gold, greedy letter, greedy tokens, sample hits
    table = torch.zeros(n, 4, dtype=torch.float64, device=device)
    texts = {}
    for chunk, convs, prompts in _my_batches(task, tokenizer, n, batch_prompts, progress):
        greedy = engine.generate_multi(prompts, 1, max_tokens, temperature=0.0)
        sampled = None
        if num_samples > 1:
            sampled = engine.generate_multi(
                prompts,
                num_samples,
                max_tokens,
                temperature=temperature,
                top_k=top_k,
                seeds=[seed + i for i in chunk],
            )
        for k, (i, conv) in enumerate(zip(chunk, convs)):
            text = tokenizer.decode(engine.without_stop(greedy[k].sequences[0]))
            texts[i] = text
            table[i, 0] = AQUA_LETTERS.index(conv["answer"])
            table[i, 1] = letter_index(extract_letter(text, conv.get("options")))
            table[i, 2] = len(greedy[k].sequences[0])
            if sampled is not None:
                for seq in sampled[k].sequences:
                    text = tokenizer.decode(engine.without_stop(seq))
                    table[i, 3] += extract_letter(text, conv.get("options")) == conv["answer"]
    return GenerativeResult(*_sum_over_ranks(table), k=num_samples, texts=texts)


# ------------------------------------------------------------------------------------------------
# categorical


def letter_continuations(tokenizer) -> tuple[list[int], list[list[int]]]:
    """(prefix ids, the five continuation ids) of "Answer: A" .. "Answer: E". When "Answer:" does
    not tokenise the same with a letter attached, the prefix is empty and each continuation is the
    whole line."""
    prefix = tokenizer.encode(ANSWER_PREFIX)
    lines = [tokenizer.encode(f"{ANSWER_PREFIX} {letter}") for letter in AQUA_LETTERS]
    if all(line[: len(prefix)] == prefix for line in lines):
        return prefix, [line[len(prefix) :] for line in lines]
    return [], lines


def forward_right_padded(model, rows: list[list[int]]) -> torch.Tensor:
    """Float logits (len(rows), longest, V) of rows of different lengths in one forward.

    The rows are padded at the END. Attention is causal, so a real token never looks at the padding
    after it, and every row's positions start at 0: the logits at a row's real positions are those
    of the row alone (to float round-off). Left padding would shift the rotary positions and need
    the KV cache's pad mask (gpt.KVCache.pad) to hide the pad slots; right padding needs nothing."""
    device = next(model.parameters()).device
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
    return model(ids.to(device))


# One forward's float32 logits stay under this, however many prompts are scored together: at a
# 65,536-token vocabulary a batch of 32 prompts of 300 tokens would otherwise hold 2.5 GB.
LOGITS_BUDGET_BYTES = 1 << 29


def forward_in_chunks(model, rows: list[list[int]]):
    """Yields (index of the chunk's first row, its right-padded logits) over chunks of `rows`
    whose (rows, longest, vocab) float32 logits fit LOGITS_BUDGET_BYTES."""
    longest = max(len(r) for r in rows)
    per_chunk = max(1, LOGITS_BUDGET_BYTES // (4 * longest * model.config.vocab_size))
    for start in range(0, len(rows), per_chunk):
        yield start, forward_right_padded(model, rows[start : start + per_chunk])


class LetterScorer:
    """Categorical scoring: the five continuations of the primed prefix "Answer:".

    When each continuation is a single token (the usual case: it is how "Answer: C" tokenises in the
    SFT targets) a prompt costs one row and the scores are the five letter log-probs at its last
    position; otherwise each continuation is a row of its own, scored by its summed log-prob."""

    def __init__(self, tokenizer):
        self.prefix_ids, self.conts = letter_continuations(tokenizer)
        self.single = bool(self.prefix_ids) and all(len(c) == 1 for c in self.conts)
        self.letter_ids = [c[0] for c in self.conts] if self.single else None

    @torch.no_grad()
    def scores(self, model, prompts: list[list[int]]) -> torch.Tensor:
        """(len(prompts), 5) log-probabilities of the five letters after each prompt."""
        if self.single:
            rows = [prompt + self.prefix_ids for prompt in prompts]
            scores = []
            for first, logits in forward_in_chunks(model, rows):
                n = logits.size(0)
                last = torch.tensor([len(r) - 1 for r in rows[first : first + n]])
                at_last = logits[torch.arange(n), last.to(logits.device)]
                scores.append(F.log_softmax(at_last, dim=-1)[:, self.letter_ids])
            return torch.cat(scores)
        rows = [p + self.prefix_ids + c for p in prompts for c in self.conts]
        scores = []
        for first, logits in forward_in_chunks(model, rows):
            for r in range(logits.size(0)):
                row, cont = rows[first + r], self.conts[(first + r) % len(self.conts)]
                start = len(row) - len(cont)  # the continuation's first token; its logits one back
                logp = F.log_softmax(logits[r, start - 1 : len(row) - 1], dim=-1)
                targets = torch.tensor(cont, device=logp.device)
                scores.append(logp.gather(1, targets[:, None]).sum())
        return torch.stack(scores).view(len(prompts), len(self.conts))

    def __call__(self, model, prompt_ids: list[int]) -> tuple[int, list[float]]:
        """One prompt -> (index of the chosen letter, per-letter log-prob scores)."""
        scores = self.scores(model, [prompt_ids])[0]
        return int(scores.argmax()), scores.tolist()


@torch.no_grad()
def categorical_eval(
    model, tokenizer, task, n: int, batch_prompts: int, progress: str | None = None
) -> tuple[list[int], list[int]]:
    """(gold letters 0-4, chosen letters 0-4) of the first n problems, over all ranks; batch_prompts
    problems go through each forward."""
    scorer = LetterScorer(tokenizer)
    device = next(model.parameters()).device
    table = torch.zeros(n, 2, dtype=torch.float64, device=device)  # gold, chosen
    for chunk, convs, prompts in _my_batches(task, tokenizer, n, batch_prompts, progress):
        chosen = scorer.scores(model, prompts).argmax(dim=-1).tolist()
        for i, conv, choice in zip(chunk, convs, chosen):
            table[i, 0] = AQUA_LETTERS.index(conv["answer"])
            table[i, 1] = choice
    gold, chosen = _sum_over_ranks(table)
    return gold, chosen
