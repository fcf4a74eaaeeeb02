"""Batched sampling with the KV cache: N continuations of each of P prompts in one decode batch.

RL rollouts use `Engine.generate_multi`; `generate_batch` is the one-prompt case (chat_eval's
pass@k, chat_cli, samples) and `stream` yields one sample's tokens as they come. `generate_nocache`
samples the same tokens with full forwards: the reference the KV cache is tested against.
"""

from __future__ import annotations

from contextlib import contextmanager
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
    # With entropies=True: per generated token, the entropy (nats) of the distribution it was drawn
    # from, at temperature 1 before top-k/top-p (the policy's own), from the logits the step has.
    entropies: list[list[float]] | None = None


# Randomness: counter-based. Row r of a batch run with `seed` draws, at decoding step t, one uniform
# number u = hash(row_seed(seed, r), t) (a few integer ops on the device, for all rows at once), and
# samples its token by inverting the CDF of its filtered distribution at u (in fp64, so that every
# token's interval is its probability up to fp32 round-off: an exact draw). A row's tokens then
# depend only on (model, prompt, seed, row, sampling settings): not on num_samples, the other
# prompts of the batch or when other rows stop. num_samples=2 reproduces the first two rows of
# num_samples=8, and a prompt sampled in a batch of 8 prompts gives the tokens it gets alone (up to
# float round-off in the logits, which only matters when u falls within round-off of an interval's
# edge).
# (Until issue 27 each row had its own torch.Generator and drew a uniform vector per step for
# Gumbel-max: the same distribution, other random streams, one call per row per step.)

_M32 = 0xFFFFFFFF


def row_seed(seed: int, row: int) -> int:
    """Seed of row `row` of a batch run with `seed` (a simple mix: rows and seeds don't collide)."""
    return (int(seed) * 1_000_003 + int(row) * 7_919 + 12_345) % (2**63 - 1)


def row_keys(seeds: list[int], num_samples: int, device) -> torch.Tensor:
    """(P * num_samples, 2) int64: the low and high 32 bits of each row's seed, prompt-major (row
    p * num_samples + i has row_seed(seeds[p], i))."""
    keys = []
    for seed in seeds:
        for i in range(num_samples):
            s = row_seed(seed, i)
            keys.append([s & _M32, (s >> 32) & _M32])
    return torch.tensor(keys, dtype=torch.long, device=device)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix (xorshift-multiply rounds) of int64 tensors in [0, 2^32).
    The multipliers are below 2^31, so no product leaves int64: no overflow on any backend."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def step_uniforms(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """(N, S) fp64 uniforms in [0, 1), 53 random bits each: row i's at each of the decoding steps
    `steps` (S,), from its key keys[i] (N, 2). Computed for every step at once, before decoding."""
    row = _hash32(_hash32(keys[:, 0]) ^ keys[:, 1])[:, None]
    a = _hash32(row ^ _hash32((steps[None, :] * 0x9E3779B1 + 0x68E31DA4) & _M32))
    b = _hash32(a ^ 0x5BD1E995)
    return (a * 2**21 + (b >> 11)).double() * 2.0**-53


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
    logits: torch.Tensor,
    uniforms: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    probs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next ids (N,) from float logits (N, V), row i at uniform uniforms[i]: one batched op set.
    probs: softmax(logits) when the caller has it (plain sampling then reuses it)."""
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    if probs is None or not (temperature == 1.0 and top_k is None and top_p is None):
        probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    # Inverse CDF: token j owns [cdf[j-1], cdf[j]); filtered tokens own empty intervals. The sum in
    # fp64 keeps each interval's length the token's fp32 probability (an fp32 cumsum over a 65k
    # vocabulary would distort the small ones).
    cdf = torch.cumsum(probs, dim=-1, dtype=torch.float64)
    picked = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)
    return picked.clamp_(max=logits.size(-1) - 1)


@contextmanager
def last_position_logits(model):
    """Inside it, the model's lm_head sees only the last position: a prefill computes (B, 1, V)
    logits instead of (B, T, V), all that sampling reads (a hook, so gpt.forward stays as is)."""
    handle = model.lm_head.register_forward_pre_hook(lambda _m, args: (args[0][:, -1:],))
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------
# The compiled decode step (GPU): static shapes, so torch.compile runs every step of a rollout with
# one graph. The batch stays whole (finished rows keep decoding, masked out), the cache has one
# length for the whole rollout (a multiple of CACHE_BUCKET), the position of the new token is a
# tensor, not a Python int, and attention reads the whole cache under a mask.


CACHE_BUCKET = 64


class _StaticCache:
    """A KVCache's buffers seen as a fixed-length cache: insert() writes the new token's keys and
    values at slot `pos` (a 0-d tensor) and returns every slot; the mask hides the unwritten ones.
    It speaks the two methods CausalSelfAttention calls on a cache."""

    def __init__(self, kv: torch.Tensor, pos: torch.Tensor):
        self.kv, self.pos = kv, pos

    def get_pos(self):
        return self.pos  # unused on the masked attention path

    def insert(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        slot = self.pos.view(1)
        self.kv[layer_idx, 0].index_copy_(2, slot, k.to(self.kv.dtype))
        self.kv[layer_idx, 1].index_copy_(2, slot, v.to(self.kv.dtype))
        return self.kv[layer_idx, 0], self.kv[layer_idx, 1]


def static_decode_step(
    model, ids: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor, pad: torch.Tensor
) -> torch.Tensor:
    """fp32 logits (B, V) of the tokens ids (B, 1) at cache slot pos, every shape fixed by the
    batch and the cache length. pad (B,): the left padding of each row. GPT.forward's trunk and
    head with a KVCache, its position and mask written as tensors for torch.compile."""
    positions = (pos - pad).clamp(min=0)[:, None]  # (B, 1): row b's slot s is position s - pad[b]
    cos_sin = model.cos[0, positions], model.sin[0, positions]  # (B, 1, 1, D/2)
    slots = torch.arange(kv.size(4), device=ids.device)
    mask = ((slots[None, :] >= pad[:, None]) & (slots[None, :] <= pos))[:, None, None, :]
    x = model.hidden_states(ids, cos_sin, _StaticCache(kv, pos), None, mask)
    return model._head_logits(x[:, -1, :], model.autocast_args(ids.device))


def compiled_decode_step(device: torch.device):
    """static_decode_step compiled by inductor, once per shape (batch, cache bucket). No CUDA graphs
    (mode reduce-overhead) yet: the step writes into the cache, an input that CUDA graphs would copy
    or refuse unless it lives at a static address; that, and the speed-up, need a GPU to verify."""
    return torch.compile(static_decode_step, dynamic=False)


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
    entropies: bool = False,
    use_cache: bool = True,
    stats: dict | None = None,
    step_fn=None,
):
    """Yield (rows, next_ids, logprobs, entropy, live) once per decoding step, as device tensors
    over the current decode batch: rows (B,) indices into the P * num_samples batch (prompt-major),
    the sampled ids (B,), their log-probs (B,), their entropies (B,) or None, and live (B,)
    bool: the row was still running at this step (a row stops after a stop token; later tokens of a
    stopped row that has not left the batch yet are not its). Nothing waits for the device except
    one transfer per step, the stop flags, after the yield. use_cache=False forwards every row's
    whole sequence at each step (one prompt only). stats["steps"] counts decode steps (bench_rl).
    step_fn: static_decode_step or its compiled form: fixed shapes (no rows leave the batch, a cache
    of a CACHE_BUCKET multiple), else the model's own forward with a KVCache."""
    device = next(model.parameters()).device
    # every row's uniform for every step, drawn at once (see "Randomness" above)
    uniforms = step_uniforms(
        row_keys(seeds, num_samples, device), torch.arange(max_tokens, device=device)
    )
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
    static = step_fn is not None and use_cache
    if use_cache:
        length = longest + max_tokens
        if static:
            length = -(-length // CACHE_BUCKET) * CACHE_BUCKET
        cache = model.new_kv_cache(len(prompts), length)
        if any(pads) or static:
            cache.pad = torch.tensor(pads, dtype=torch.long, device=device)
    with last_position_logits(model):
        logits = model(ids, kv_cache=cache)[:, -1, :]
    if num_samples > 1:
        logits = logits.repeat_interleave(num_samples, dim=0)
        if use_cache:
            cache = cache.repeat_batch(num_samples)
        else:
            ids = ids.repeat_interleave(num_samples, dim=0)
    if static:
        pos = torch.tensor(longest, device=device)  # the slot of the next token
    n = len(prompts) * num_samples
    rows = torch.arange(n, device=device)  # batch position -> row
    live = torch.ones(n, dtype=torch.bool, device=device)
    stops = torch.tensor(sorted(stop_tokens) or [-1], device=device)
    plain = temperature == 1.0 and top_k is None and top_p is None
    for step in range(max_tokens):
        logits = logits.float()
        logp = F.log_softmax(logits, dim=-1)
        # the plain sampler draws from these, and the entropy reads them
        probs = logp.exp() if plain or entropies else None
        next_ids = sample_next(logits, uniforms[:, step], temperature, top_k, top_p, probs)
        logprobs = logp.gather(1, next_ids[:, None]).squeeze(1)
        # a dot product per row: no second (rows, vocab) temporary (fresh pages cost more than math)
        entropy = -torch.linalg.vecdot(probs, logp) if entropies else None
        if stats is not None:
            stats["steps"] = stats.get("steps", 0) + 1
        yield rows, next_ids, logprobs, entropy, live
        live = live & ~torch.isin(next_ids, stops)
        if step + 1 == max_tokens:
            return
        flags = live.tolist()  # the step's one host sync: which rows still run
        running = sum(flags)
        if not running:
            return
        # Once at most half of the batch still runs, the finished rows leave it (their cache rows
        # are copied out), so the tail of long completions decodes a smaller batch.
        if running <= len(flags) // 2 and not static:
            keep = torch.nonzero_static(live, size=running).squeeze(1)  # no sync: size is known
            next_ids = next_ids.index_select(0, keep)
            if use_cache:
                cache = cache.keep_rows(keep)
            else:
                ids = ids.index_select(0, keep)
            rows, uniforms, live = rows[keep], uniforms[keep], live[keep]
        if static:
            logits = step_fn(model, next_ids[:, None], cache.kv, pos, cache.pad)
            pos += 1  # in place: the step reads it at the same address every time
        elif use_cache:
            # the cache holds everything before: feed only the new token
            logits = model(next_ids[:, None], kv_cache=cache)[:, -1, :]
        else:
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            with last_position_logits(model):
                logits = model(ids)[:, -1, :]


class Engine:
    def __init__(self, model, tokenizer, compile_decode: bool | None = None):
        """compile_decode: decode through the compiled static-shape step (compiled_decode_step);
        None = nanochat.compile's rule (on for CUDA, off on CPU, NANOCHAT_COMPILE=0/1 overrides).
        generate_multi / generate_batch use it; stream (the CLI) and generate_nocache stay eager."""
        self.model = model
        self.tokenizer = tokenizer
        if compile_decode is None:
            from nanochat.compile import compile_enabled

            compile_decode = compile_enabled(next(model.parameters()).device)
        self.step_fn = None
        if compile_decode:
            if getattr(model, "compute_dtype", None) is None:
                # resolved outside the graph, as maybe_compile does (it reads os.environ)
                model.compute_dtype = model.get_compute_dtype()
            self.step_fn = compiled_decode_step(next(model.parameters()).device)
        # None, or a dict in which decode_steps counts its decode steps (bench_rl)
        self.stats: dict | None = None
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
        self, prompts, seeds, num_samples, max_tokens, temperature, top_k, top_p, entropies, fn=None
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
            entropies=entropies,
            stats=self.stats,
            step_fn=fn,
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
        entropies: bool = False,
    ) -> list[GenerationResult]:
        """num_samples continuations of each prompt, decoded in one batch; one result per prompt.
        seeds[p] seeds prompt p's rows (default: 42 for every prompt); entropies: see the result's
        `entropies`."""
        seeds = list(seeds) if seeds is not None else [42] * len(prompts)
        if len(seeds) != len(prompts):
            raise ValueError(f"generate: {len(prompts)} prompts but {len(seeds)} seeds")
        self._check_args(prompts, num_samples, max_tokens, temperature, top_k, top_p)
        was_training = self.model.training
        self.model.eval()
        n = len(prompts) * num_samples
        device = next(self.model.parameters()).device
        # Every step's tokens are written into device buffers (no host sync); they come to the host
        # once, at the end. A row's tokens are the first lengths[row] of its buffer row.
        # (step, row) layout: each step fills one contiguous line.
        ids = torch.zeros(max_tokens, n, dtype=torch.long, device=device)
        lps = torch.zeros(max_tokens, n, device=device)
        ents = torch.zeros(max_tokens, n, device=device) if entropies else None
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        try:
            steps = self._decode(
                prompts,
                seeds,
                num_samples,
                max_tokens,
                temperature,
                top_k,
                top_p,
                entropies,
                self.step_fn,
            )
            for step, (rows, next_ids, logprobs, entropy, live) in enumerate(steps):
                ids[step].index_copy_(0, rows, next_ids)
                lps[step].index_copy_(0, rows, logprobs)
                if ents is not None:
                    ents[step].index_copy_(0, rows, entropy)
                lengths.index_add_(0, rows, live.long())
        finally:
            self.model.train(was_training)
        # one transfer for everything (fp64 holds the ids, the fp32 log-probs and logits exactly)
        T = max_tokens
        parts = [lengths[:, None], ids.T, lps.T]
        parts += [ents.T] if ents is not None else []
        host = torch.cat([part.double() for part in parts], dim=1).tolist()
        lengths = [int(row[0]) for row in host]
        seqs = [[int(t) for t in row[1 : 1 + k]] for row, k in zip(host, lengths)]
        lps = [row[1 + T : 1 + T + k] for row, k in zip(host, lengths)]
        if ents is not None:
            ents = [row[1 + 2 * T : 1 + 2 * T + k] for row, k in zip(host, lengths)]
        done = [bool(seq) and seq[-1] in self.stop_tokens for seq in seqs]
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
                    entropies=[ents[i] for i in rows] if ents is not None else None,
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
            for _, next_ids, _, _, _ in steps:  # one row: live until the generator ends
                yield int(next_ids[0])
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
    for rows, next_ids, _, _, live in steps:
        for row, tok, running in zip(rows.tolist(), next_ids.tolist(), live.tolist()):
            if running:
                out[row].append(tok)
    return out
