"""Batched sampling with the KV cache: N continuations of each of P prompts in one decode batch.

RL rollouts use `Engine.generate_multi`; `generate_batch` is the one-prompt case (chat_eval's
pass@k, chat_cli, samples) and `stream` yields one sample's tokens as they come. `generate_nocache`
samples the same tokens with full forwards: the reference the KV cache is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class GenerationResult:
    # The generated ids only, not the prompt. A row that stopped on <|assistant_end|> or <|bos|>
    # keeps that stop token as its last id: RL must be able to reward stopping (and SFT trains on
    # <|assistant_end|> too). A row cut off by max_tokens just ends, with finished False.
    sequences: list[list[int]]
    # 1 for every token the model sampled. Every generated token is sampled today (no tool forces
    # tokens in), so these are all ones; RL reads them so it never has to guess where gradients go.
    masks: list[list[int]]
    # log p(token | prefix) at temperature 1, before top-k/top-p: log_softmax of a plain forward,
    # the quantity an RL loss recomputes in training mode (ratio = exp(new - old)). With temperature
    # 0 or top-k/top-p the token was drawn from another distribution than these describe.
    logprobs: list[list[float]]
    finished: list[bool] = field(default_factory=list)  # stopped on a stop token (not max_tokens)
    prompt_len: int = 0
    # With watch_ids: per row, per generated token, the logits of the watched ids at the step that
    # sampled it (RL reads the five answer-letter logits there, at no extra forward).
    watched: list[list[list[float]]] | None = None


# Randomness: every row has its own torch.Generator, seeded from (seed, row index within its
# prompt), and draws one uniform vector per step while it runs. A row's tokens then depend only on
# (model, prompt, seed, row, sampling settings): not on num_samples, the other prompts of the batch
# or when other rows stop. num_samples=2 reproduces the first two rows of num_samples=8, and a
# prompt sampled in a batch of 8 prompts gives the tokens it gets alone (up to float round-off in
# the logits, which only matters at exact ties).


def row_seed(seed: int, row: int) -> int:
    """Seed of row `row` of a batch run with `seed` (a simple mix: rows and seeds don't collide)."""
    return (int(seed) * 1_000_003 + int(row) * 7_919 + 12_345) % (2**63 - 1)


def row_generators(seeds: list[int], num_samples: int, device) -> list[torch.Generator]:
    """Generators of the rows of a P x num_samples batch, prompt-major (row p * num_samples + i)."""
    gens = []
    for seed in seeds:
        for i in range(num_samples):
            g = torch.Generator(device=device)
            g.manual_seed(row_seed(seed, i))
            gens.append(g)
    return gens


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """logits (N, V) / temperature, with tokens outside top-k and the top-p nucleus set to -inf."""
    logits = logits / temperature
    vocab = logits.size(-1)
    if top_k is not None and 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p: the top token stays
        drop_sorted = (cum - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, gens: list, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """Next ids (N,) from float logits (N, V), one generator per row."""
    # Every row draws its uniform vector even when greedy, so its random stream is the same
    # whatever the decoding mode.
    noise = torch.stack(
        [torch.rand(logits.size(-1), generator=g, device=logits.device) for g in gens]
    )
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    scaled = filter_logits(logits, temperature, top_k, top_p)
    # Gumbel-max: argmax(logits / T + Gumbel noise) is an exact draw from softmax(logits / T)
    gumbel = -torch.log(-torch.log(noise.clamp_(min=1e-20, max=1.0 - 1e-7)))
    return torch.argmax(scaled + gumbel, dim=-1)


@torch.inference_mode()
def decode_steps(
    model,
    prompts: list[list[int]],
    seeds: list[int],
    num_samples: int,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_tokens: set[int],
    pad_id: int,
    watch_ids: list[int] | None = None,
    use_cache: bool = True,
):
    """Yield (rows, next_ids, logprobs, watched) once per decoding step, as lists, for the rows
    still running (indices into the P * num_samples batch, prompt-major). A row stops after a stop
    token. use_cache=False forwards every row's whole sequence at each step (one prompt only)."""
    device = next(model.parameters()).device
    gens = row_generators(seeds, num_samples, device)
    longest = max(len(tokens) for tokens in prompts)
    # Prefill the P prompts once, right-aligned (left padding), then share each prompt's keys and
    # values across its N rows. The pad token's value does not matter: no query ever sees it.
    pads = [longest - len(tokens) for tokens in prompts]
    if not use_cache and any(pads):
        raise ValueError("decoding without a cache takes prompts of one length")
    ids = torch.tensor(
        [[pad_id] * pad + tokens for pad, tokens in zip(pads, prompts)], device=device
    )
    cache = None
    if use_cache:
        cache = model.new_kv_cache(len(prompts), longest + max_tokens)
        if any(pads):
            cache.pad = torch.tensor(pads, dtype=torch.long, device=device)
    logits = model(ids, kv_cache=cache)[:, -1, :]
    if num_samples > 1:
        logits = logits.repeat_interleave(num_samples, dim=0)
        if use_cache:
            cache = cache.repeat_batch(num_samples)
        else:
            ids = ids.repeat_interleave(num_samples, dim=0)
    rows = list(range(len(prompts) * num_samples))  # batch position -> row
    stopped = [False] * len(rows)  # per batch position
    for step in range(max_tokens):
        logits = logits.float()
        next_ids = sample_next(logits, gens, temperature, top_k, top_p)
        logprobs = F.log_softmax(logits, dim=-1).gather(1, next_ids[:, None]).squeeze(1)
        ids_list = next_ids.tolist()
        lp_list = logprobs.tolist()
        watched = logits[:, watch_ids].tolist() if watch_ids else None
        live = [b for b in range(len(rows)) if not stopped[b]]
        yield (
            [rows[b] for b in live],
            [ids_list[b] for b in live],
            [lp_list[b] for b in live],
            [watched[b] for b in live] if watched else None,
        )
        for b in live:
            stopped[b] = ids_list[b] in stop_tokens
        running = [b for b in range(len(rows)) if not stopped[b]]
        if not running or step + 1 == max_tokens:
            return
        # Once at most half of the batch still runs, the finished rows leave it (their cache rows
        # are copied out), so the tail of long completions decodes a smaller batch.
        if len(running) <= len(rows) // 2:
            keep = torch.tensor(running, device=device)
            next_ids = next_ids.index_select(0, keep)
            if use_cache:
                cache = cache.keep_rows(keep)
            else:
                ids = ids.index_select(0, keep)
            rows = [rows[b] for b in running]
            gens = [gens[b] for b in running]
            stopped = [False] * len(rows)
        if use_cache:
            # the cache holds everything before: feed only the new token
            logits = model(next_ids[:, None], kv_cache=cache)[:, -1, :]
        else:
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            logits = model(ids)[:, -1, :]


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.stop_tokens = {
            tokenizer.encode_special("<|assistant_end|>"),
            tokenizer.get_bos_token_id(),
        }

    def without_stop(self, seq: list[int]) -> list[int]:
        """A generated row's ids minus the stop token it ended on (the text the model wrote)."""
        return seq[:-1] if seq and seq[-1] in self.stop_tokens else seq

    def _check_args(self, prompts, num_samples, max_tokens, temperature, top_k, top_p):
        if not prompts:
            raise ValueError("generate: no prompts given")
        if any(not tokens for tokens in prompts):
            raise ValueError("generate: a prompt is empty (it must at least contain <|bos|>)")
        if num_samples < 1:
            raise ValueError(f"generate: num_samples must be >= 1, got {num_samples}")
        if max_tokens < 0:
            raise ValueError(f"generate: max_tokens must be >= 0, got {max_tokens}")
        if temperature < 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"generate: top_k must be >= 1 or None, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p}")
        # the rotary table reaches past the training context (quality there is the model's problem)
        limit = getattr(self.model, "rotary_seq_len", self.model.config.sequence_len)
        longest = max(len(tokens) for tokens in prompts)
        if longest + max_tokens > limit:
            raise ValueError(
                f"generate: prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's position limit {limit}; shorten the prompt or lower max_tokens"
            )

    def _decode(
        self, prompts, seeds, num_samples, max_tokens, temperature, top_k, top_p, watch_ids
    ):
        return decode_steps(
            self.model,
            prompts,
            seeds,
            num_samples,
            max_tokens,
            temperature,
            top_k,
            top_p,
            stop_tokens=self.stop_tokens,
            pad_id=self.tokenizer.get_bos_token_id(),
            watch_ids=watch_ids,
        )

    def generate_multi(
        self,
        prompts: list[list[int]],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seeds: list[int] | None = None,
        watch_ids: list[int] | None = None,
    ) -> list[GenerationResult]:
        """num_samples continuations of each prompt, decoded in one batch; one result per prompt.
        seeds[p] seeds prompt p's rows (default: 42 for every prompt); watch_ids: see `watched`."""
        seeds = list(seeds) if seeds is not None else [42] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        self._check_args(prompts, num_samples, max_tokens, temperature, top_k, top_p)
        was_training = self.model.training
        self.model.eval()
        n = len(prompts) * num_samples
        seqs = [[] for _ in range(n)]
        lps = [[] for _ in range(n)]
        watched = [[] for _ in range(n)] if watch_ids else None
        done = [False] * n
        try:
            steps = self._decode(
                prompts, seeds, num_samples, max_tokens, temperature, top_k, top_p, watch_ids
            )
            for rows, ids_list, lp_list, watch_list in steps:  # only the rows still running
                for k, (row, tok, lp) in enumerate(zip(rows, ids_list, lp_list)):
                    if watched is not None:
                        watched[row].append(watch_list[k])
                    seqs[row].append(tok)
                    lps[row].append(lp)
                    done[row] = tok in self.stop_tokens
        finally:
            self.model.train(was_training)
        results = []
        for p, tokens in enumerate(prompts):
            rows = range(p * num_samples, (p + 1) * num_samples)
            results.append(
                GenerationResult(
                    sequences=[seqs[i] for i in rows],
                    masks=[[1] * len(seqs[i]) for i in rows],
                    logprobs=[lps[i] for i in rows],
                    finished=[done[i] for i in rows],
                    prompt_len=len(tokens),
                    watched=[watched[i] for i in rows] if watched is not None else None,
                )
            )
        return results

    def generate_batch(
        self,
        tokens: list[int],
        num_samples: int = 1,
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 42,
    ) -> GenerationResult:
        """Sample num_samples continuations of one prompt."""
        return self.generate_multi(
            [tokens], num_samples, max_tokens, temperature, top_k, top_p, seeds=[seed]
        )[0]

    def stream(
        self,
        tokens: list[int],
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 42,
    ):
        """Yield the ids of one sample as they are decoded (for the CLI), stop token included."""
        self._check_args([tokens], 1, max_tokens, temperature, top_k, top_p)
        was_training = self.model.training
        self.model.eval()
        try:
            steps = self._decode([tokens], [seed], 1, max_tokens, temperature, top_k, top_p, None)
            for _, ids_list, _, _ in steps:
                yield ids_list[0]
        finally:
            self.model.train(was_training)


def generate_nocache(
    model,
    tokens: list[int],
    num_samples: int = 1,
    max_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 42,
    stop_tokens: set[int] | None = None,
) -> list[list[int]]:
    """Reference decoder without a KV cache: a full forward of every row's sequence at each step.

    It runs decode_steps, the Engine's sampling, with the cache switched off, so with the same seed
    it produces the same tokens (up to float ties) exactly when the cache computes the same logits;
    used by the tests and by scripts/bench_engine.py as the baseline.
    """
    out = [[] for _ in range(num_samples)]
    steps = decode_steps(
        model,
        [tokens],
        [seed],
        num_samples,
        max_tokens,
        temperature,
        top_k,
        top_p,
        stop_tokens=stop_tokens or set(),
        pad_id=0,  # unused: one prompt, no padding
        use_cache=False,
    )
    for rows, ids_list, _, _ in steps:
        for row, tok in zip(rows, ids_list):
            out[row].append(tok)
    return out
