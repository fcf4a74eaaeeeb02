"""RL rollouts: which questions a step asks, their prompts, the sampled groups and their rewards.

The task grades (`task.reward(conversation, completion, finished, format_bonus)` -> (reward,
correct)), so nothing here knows what a right answer looks like. Everything random depends on
(seed, step, global question number, sample) only: the same rollouts on any number of ranks and
after a resume.
"""

from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass

import torch


@dataclass
class Completion:
    ids: list[int]  # prompt + completion (ending with the stop token when the model stopped)
    prompt_len: int
    logprobs: list[float]  # the sampler's log-probs of the completion tokens
    finished: bool  # stopped by itself, not cut off by max_new_tokens
    text: str  # the completion as text, stop token left out
    reward: float
    correct: bool
    entropies: list[float] | None = None  # the sampler's entropy at each token (diagnostics on)

    @property
    def length(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass
class Rollouts:
    """One rank's share of a step: groups[i] are the completions of conversations[i], global
    question number questions[i]."""

    questions: list[int]
    conversations: list[dict]
    groups: list[list[Completion]]
    seconds: float = 0.0

    def rewards(self) -> torch.Tensor:
        """(questions, samples) rewards, the input of the group advantages."""
        return torch.tensor([[c.reward for c in group] for group in self.groups])

    def rows(self) -> list[Completion]:
        return [c for group in self.groups for c in group]


def step_questions(examples_per_step: int, step: int, rank: int, world: int) -> list[int]:
    """Global question numbers of this rank at `step`: each rank takes a contiguous share."""
    per_rank = examples_per_step // world
    first = step * examples_per_step + rank * per_rank
    return list(range(first, first + per_rank))


def question_index(seed: int, q: int, n: int) -> int:
    """Problem behind global question number q: each pass over the n problems is a fresh
    permutation."""
    epoch, pos = divmod(q, n)
    return _pass_order(seed, epoch, n)[pos]


@functools.lru_cache(maxsize=2)
def _pass_order(seed: int, epoch: int, n: int) -> list[int]:
    return random.Random(seed * 1_000_003 + epoch).sample(range(n), n)


def rollout_seed(seed: int, step: int, question: int) -> int:
    """Sampling seed of one question's group: depends on (seed, step, global question index) only,
    so the rollouts of a step are the same whatever the number of ranks and across a resume. The
    engine then seeds sample i of the group from (this seed, i)."""
    mixed = int(seed) * 1_000_000_007 + int(step) * 2_654_435_761 + int(question) * 97_531
    return mixed % (2**62)


def format_bonus(format_reward: float, anneal_steps: int, step: int) -> float:
    """The format bonus at `step`: format_reward, decaying linearly to 0 over anneal_steps (0: no
    decay)."""
    if anneal_steps <= 0:
        return format_reward
    return format_reward * max(0.0, 1.0 - step / anneal_steps)


def sample_rollouts(engine, task, step: int, cfg, rank: int, world: int) -> Rollouts:
    """Sample this rank's questions of `step` (cfg.num_samples completions each, decoded together)
    and score them with the task's reward."""
    t0 = time.time()
    tokenizer = engine.tokenizer
    questions = step_questions(cfg.examples_per_step, step, rank, world)
    convs = [task[question_index(cfg.seed, q, len(task))] for q in questions]
    prompts = [tokenizer.render_for_completion(conv) for conv in convs]
    seeds = [rollout_seed(cfg.seed, step, q) for q in questions]
    chunk = cfg.rollout_prompts or len(prompts)
    results = []
    for i in range(0, len(prompts), chunk):
        results += engine.generate_multi(
            prompts[i : i + chunk],
            num_samples=cfg.num_samples,
            max_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_k=cfg.top_k,
            top_p=cfg.top_p,
            seeds=seeds[i : i + chunk],
            entropies=cfg.diagnostics,
        )
    bonus = format_bonus(cfg.format_reward, cfg.format_anneal_steps, step)
    groups = []
    for conv, prompt, res in zip(convs, prompts, results):
        group = []
        entropies = res.entropies or [None] * len(res.sequences)
        for seq, lps, fin, ents in zip(res.sequences, res.logprobs, res.finished, entropies):
            # the stop token is trained on, but it is not text
            text = tokenizer.decode(engine.without_stop(seq))
            reward, correct = task.reward(conv, text, fin, bonus)
            ids = prompt + seq
            group.append(Completion(ids, len(prompt), lps, fin, text, reward, correct, ents))
        groups.append(group)
    return Rollouts(questions, convs, groups, seconds=time.time() - t0)
