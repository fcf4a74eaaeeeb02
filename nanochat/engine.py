"""Batched sampling with the KV cache.

`generate_multi` samples N continuations of each of P prompts in one batch of P x N rows: the P
prompts (of any lengths) are prefilled together, right-aligned with left padding (KVCache.pad), the
cache is expanded to N rows per prompt, and all rows decode together one token per step. RL rollouts
use it; `generate_batch` is the one-prompt case (chat_eval's pass@k, chat_cli, samples).

What a GenerationResult holds, per sample (row):
- sequences[i]: the generated token ids only (the prompt is not repeated). When the row stopped on
  <|assistant_end|> or <|bos|>, that stop token IS included as the last id: RL must be able to
  reward (and so learn) stopping, and the rendered training conversations also carry
  <|assistant_end|> with mask 1. A row cut off by max_tokens simply ends (finished[i] is False).
- masks[i]: 1 for every token the model sampled. All generated tokens are sampled today (there is no
  tool use that forces tokens in), so masks are all ones; the field exists so RL code never has to
  guess which tokens it may push gradients through.
- logprobs[i]: log p(token | prefix) under the model's own distribution at temperature 1, before
  temperature, top-k or top-p are applied, i.e. log_softmax(logits)[token] of a plain forward. This
  is the quantity an RL policy-gradient loss recomputes in training mode, so the two are directly
  comparable (ratio = exp(new - old)). Note that with temperature 0 (greedy) or top-k/top-p the
  token was drawn from a *different* distribution than these log-probs describe.
- watched[i] (only with watch_ids): per generated token, the logits of the watched ids at the step
  that sampled it (RL reads the policy's five answer-letter logits there, at no extra forward).

Randomness: sample i of a prompt with seed s has its own torch.Generator seeded from row_seed(s, i),
and every row draws a fresh uniform vector each step while it runs. So its
tokens depend only on (model, prompt, s, i, sampling settings): not on num_samples, not on the other
prompts in the batch and not on when other rows stop. Running with num_samples=2 reproduces the first
two rows of a num_samples=8 run, and a prompt sampled inside a batch of 8 prompts gives the same tokens
as that prompt alone (up to float round-off in the logits, which only matters at exact ties).
Sampling uses the Gumbel-max trick (argmax of logits/T + Gumbel noise), which draws exactly from
softmax(logits/T).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class GenerationResult:
    sequences: list[list[int]]  # generated ids per row (incl. the stop token when stopped)
    masks: list[list[int]]  # 1 = sampled by the model
    logprobs: list[list[float]]  # log p(token) at temperature 1, before top-k/top-p
    finished: list[bool] = field(
        default_factory=list
    )  # True: stopped on a stop token; False: hit max_tokens
    prompt_len: int = 0
    watched: list[list[list[float]]] | None = None  # per row, per token: logits of watch_ids


def row_seed(seed: int, row: int) -> int:
    """Seed of row `row` of a batch run with `seed` (a simple mix, so rows and seeds don't collide)."""
    return (int(seed) * 1_000_003 + int(row) * 7_919 + 12_345) % (2**63 - 1)


def filter_logits(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """Scale by temperature and mask (to -inf) tokens outside top-k and the top-p nucleus. logits: (N, V)."""
    logits = logits / temperature
    vocab = logits.size(-1)
    if top_k is not None and 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, gens: list, temperature: float, top_k: int | None, top_p: float | None
) -> torch.Tensor:
    """Next ids (N,) from float logits (N, V), one generator per row. Each row draws its uniform
    vector even when greedy, so a row's random stream does not depend on the decoding mode."""
    noise = torch.stack(
        [torch.rand(logits.size(-1), generator=g, device=logits.device) for g in gens]
    )
    if temperature == 0.0:
        return torch.argmax(logits, dim=-1)
    scaled = filter_logits(logits, temperature, top_k, top_p)
    # Gumbel-max: argmax(logits / T + Gumbel noise) is an exact draw from softmax(logits / T)
    gumbel = -torch.log(-torch.log(noise.clamp_(min=1e-20, max=1.0 - 1e-7)))
    return torch.argmax(scaled + gumbel, dim=-1)


def row_generators(seeds: list[int], num_samples: int, device) -> list[torch.Generator]:
    """Generators of the rows of a P x num_samples batch, prompt-major (row p * num_samples + i)."""
    gens = []
    for seed in seeds:
        for i in range(num_samples):
            g = torch.Generator(device=device)
            g.manual_seed(row_seed(seed, i))
            gens.append(g)
    return gens


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

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

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

    @torch.inference_mode()
    def _decode(
        self, prompts, seeds, num_samples, max_tokens, temperature, top_k, top_p, watch_ids=None
    ):
        """Yield (rows, next_ids, logprobs, watched) once per decoding step: the rows (indices into the
        P*N batch, prompt-major) still running, and their sampled ids, log-probs and (with watch_ids)
        logits of the watched ids, as lists. A row stops after a
        stop token; once at most half of the batch still runs, the finished rows are dropped from it
        (their cache rows are copied out), so the tail of long completions decodes a smaller batch."""
        device = self._device()
        gens = row_generators(seeds, num_samples, device)
        longest = max(len(tokens) for tokens in prompts)
        # Prefill the P prompts once, right-aligned (left padding), then share each prompt's keys and
        # values across its N rows. The pad token's value does not matter: no query ever sees it.
        cache = self.model.new_kv_cache(len(prompts), longest + max_tokens)
        pads = [longest - len(tokens) for tokens in prompts]
        if any(pads):
            cache.pad = torch.tensor(pads, dtype=torch.long, device=device)
        bos = self.tokenizer.get_bos_token_id()
        ids = torch.tensor(
            [[bos] * pad + tokens for pad, tokens in zip(pads, prompts)], device=device
        )
        logits = self.model(ids, kv_cache=cache)[:, -1, :]
        if num_samples > 1:
            cache = cache.repeat_batch(num_samples)
            logits = logits.repeat_interleave(num_samples, dim=0)
        rows = list(range(len(prompts) * num_samples))  # batch position -> row
        stopped = [False] * len(rows)  # per batch position
        for step in range(max_tokens):
            logits = logits.float()
            next_ids = sample_next(logits, gens, temperature, top_k, top_p)
            logprobs = F.log_softmax(logits, dim=-1).gather(1, next_ids[:, None]).squeeze(1)
            ids_list = next_ids.tolist()
            live = [b for b in range(len(rows)) if not stopped[b]]
            lp_list = logprobs.tolist()
            watched = logits[:, watch_ids].tolist() if watch_ids else None
            yield (
                [rows[b] for b in live],
                [ids_list[b] for b in live],
                [lp_list[b] for b in live],
                [watched[b] for b in live] if watched else None,
            )
            for b in live:
                stopped[b] = ids_list[b] in self.stop_tokens
            running = [b for b in range(len(rows)) if not stopped[b]]
            if not running or step + 1 == max_tokens:
                return
            if len(running) <= len(rows) // 2:
                keep = torch.tensor(running, device=device)
                cache, next_ids = cache.keep_rows(keep), next_ids.index_select(0, keep)
                rows, gens = [rows[b] for b in running], [gens[b] for b in running]
                stopped = [False] * len(rows)
            logits = self.model(next_ids[:, None], kv_cache=cache)[:, -1, :]

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
        """num_samples continuations of each prompt, all decoded in one batch; one result per prompt.
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
        """Sample num_samples continuations of one prompt (see the module docstring for the result)."""
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
        """Yield the token ids of one sample as they are decoded (for the CLI); stops after a stop token."""
        self._check_args([tokens], 1, max_tokens, temperature, top_k, top_p)
        was_training = self.model.training
        self.model.eval()
        try:
            for _, ids_list, _, _ in self._decode(
                [tokens], [seed], 1, max_tokens, temperature, top_k, top_p
            ):
                yield ids_list[0]
        finally:
            self.model.train(was_training)


@torch.inference_mode()
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
    """Reference decoder without a KV cache: the full forward of every row's whole sequence each step.

    Same sampling rule and per-row noise as Engine, so with the same seed it produces the same tokens
    (up to float ties); used by the tests and by scripts/bench_engine.py as the baseline.
    """
    device = next(model.parameters()).device
    stop_tokens = stop_tokens or set()
    gens = row_generators([seed], num_samples, device)
    ids = torch.tensor([tokens] * num_samples, dtype=torch.long, device=device)
    out = [[] for _ in range(num_samples)]
    done = [False] * num_samples
    for _ in range(max_tokens):
        next_ids = sample_next(model(ids)[:, -1, :].float(), gens, temperature, top_k, top_p)
        for i, t in enumerate(next_ids.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t in stop_tokens
        if all(done):
            break
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
    return out
