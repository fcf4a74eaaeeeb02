"""Engine: KV-cache batched sampling against plain full forwards (tiny random model, CPU)."""

import pytest
import torch
import torch.nn.functional as F

from nanochat.engine import (
    Engine,
    decode_steps,
    filter_logits,
    generate_nocache,
    row_keys,
    sample_next,
    step_uniforms,
)
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer


@pytest.fixture(scope="module")
def tok():
    # bytes-only BPE (no merges): 256 + 9 specials, instant to build
    return Tokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})


def make_model(tok, seed=0, stop_boost=0.0):
    torch.manual_seed(seed)
    cfg = GPTConfig(
        sequence_len=128,
        vocab_size=tok.get_vocab_size(),
        n_layer=2,
        n_head=2,
        n_kv_head=1,
        n_embd=32,
    )
    model = GPT(cfg)
    with torch.no_grad():
        # a random init gives near-uniform logits (lm_head std 0.001); peaky ones rule out ties
        model.lm_head.weight.normal_(0.0, 0.5)
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0.0, 0.1)
            block.mlp.c_proj.weight.normal_(0.0, 0.1)
        if stop_boost:
            # a larger-norm row for <|assistant_end|>: it wins in some states, so rows stop at
            # various steps
            end = tok.encode_special("<|assistant_end|>")
            model.lm_head.weight[end] = torch.randn(cfg.n_embd) * 0.5 * stop_boost
    model.eval()
    return model


def prompt(tok, text="What is 2+2?"):
    return tok.render_for_completion(
        {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "x"}]}
    )


def test_greedy_equals_argmax_of_full_forwards(tok):
    model = make_model(tok)
    ids = prompt(tok)
    res = Engine(model, tok).generate_batch(ids, num_samples=1, max_tokens=20, temperature=0.0)
    seq = res.sequences[0]
    assert len(seq) >= 1
    # reference: no cache, the whole sequence forwarded every step
    cur = list(ids)
    ref = []
    with torch.no_grad():
        for _ in range(len(seq)):
            nxt = int(model(torch.tensor([cur]))[0, -1].argmax())
            ref.append(nxt)
            cur.append(nxt)
    assert seq == ref
    assert res.masks[0] == [1] * len(seq)


def test_logprobs_and_entropies_match_full_forward(tok):
    model = make_model(tok)
    ids = prompt(tok)
    res = Engine(model, tok).generate_multi(
        [ids], num_samples=3, max_tokens=12, temperature=1.3, top_k=20, seeds=[3], entropies=True
    )[0]
    for seq, lps, ents in zip(res.sequences, res.logprobs, res.entropies):
        assert len(seq) == len(lps) == len(ents)
        full = torch.tensor([ids + seq])
        with torch.no_grad():
            logits = model(full)[0].float()
        logp = F.log_softmax(logits, dim=-1)
        expected = [float(logp[len(ids) - 1 + t, tok_id]) for t, tok_id in enumerate(seq)]
        assert lps == pytest.approx(expected, abs=1e-4)
        # the entropy of the temperature-1 distribution, -sum p log p, before top-k
        at = logp[len(ids) - 1 : len(ids) - 1 + len(seq)]
        assert ents == pytest.approx((-(at.exp() * at).sum(-1)).tolist(), abs=1e-4)


def test_counter_based_sampling_draws_the_filtered_distribution():
    # 20,000 rows (distinct seeds) sample once from the same logits: the frequencies are the
    # probabilities after top-k, and the filtered tokens never come up
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.04, 0.01])
    n = 20_000
    logits = probs.log().expand(n, -1)
    uniforms = step_uniforms(row_keys(list(range(n)), 1, "cpu"), torch.arange(2))
    assert 0.49 < uniforms.mean() < 0.51 and not torch.equal(uniforms[:, 0], uniforms[:, 1])
    drawn = sample_next(logits, uniforms[:, 0], 1.0, 4, None)
    freq = torch.bincount(drawn, minlength=6).double() / n
    kept = probs[:4] / probs[:4].sum()
    assert (freq[:4] - kept).abs().max() < 4 * (0.25 / n) ** 0.5
    assert freq[4:].sum() == 0
    # greedy ignores the uniforms
    assert (sample_next(logits[:3], uniforms[:3, 0], 0.0, None, None) == 0).all()


def test_decode_makes_at_most_one_host_sync_per_step(tok):
    from scripts.bench_rl import count_host_syncs

    model = make_model(tok, stop_boost=3.0)
    eng = Engine(model, tok)
    prompts = [prompt(tok, "Hi"), prompt(tok, "What is 7 times 8?")]
    eng.stats = {}
    with count_host_syncs(torch.device("cpu")) as syncs:
        res = eng.generate_multi(prompts, num_samples=6, max_tokens=30, seeds=[3, 4])
    assert len({len(s) for r in res for s in r.sequences}) > 1  # rows stopped and left the batch
    assert eng.stats["steps"] == max(len(s) for r in res for s in r.sequences)
    assert 0 < syncs["syncs"] <= eng.stats["steps"]


def test_seed_reproduces_and_differs(tok):
    model = make_model(tok)
    eng = Engine(model, tok)
    ids = prompt(tok)
    a = eng.generate_batch(ids, num_samples=4, max_tokens=16, temperature=1.0, seed=7)
    b = eng.generate_batch(ids, num_samples=4, max_tokens=16, temperature=1.0, seed=7)
    c = eng.generate_batch(ids, num_samples=4, max_tokens=16, temperature=1.0, seed=8)
    assert a.sequences == b.sequences and a.logprobs == b.logprobs
    assert a.sequences != c.sequences
    assert len({tuple(s) for s in a.sequences}) > 1  # rows are different samples, not copies


def test_greedy_rows_identical(tok):
    model = make_model(tok)
    res = Engine(model, tok).generate_batch(
        prompt(tok), num_samples=3, max_tokens=10, temperature=0.0
    )
    assert res.sequences[0] == res.sequences[1] == res.sequences[2]


def test_rows_independent_of_batch_size_and_other_rows_stops(tok):
    # assistant_end made likely so rows stop at different steps
    model = make_model(tok, stop_boost=3.0)
    eng = Engine(model, tok)
    ids = prompt(tok)
    big = eng.generate_batch(ids, num_samples=8, max_tokens=30, temperature=1.0, seed=11)
    small = eng.generate_batch(ids, num_samples=3, max_tokens=30, temperature=1.0, seed=11)
    end = tok.encode_special("<|assistant_end|>")
    lengths = {len(s) for s in big.sequences}
    assert len(lengths) > 1, "test needs rows that stop at different steps"
    assert any(big.finished)
    assert small.sequences == big.sequences[:3]
    for seq, fin in zip(big.sequences, big.finished):
        assert (seq[-1] == end or seq[-1] == tok.get_bos_token_id()) == fin
        # nothing after the stop token, and the stop token is kept (RL learns to stop)
        assert all(t not in (end, tok.get_bos_token_id()) for t in seq[:-1])
        if not fin:
            assert len(seq) == 30


def test_cache_matches_nocache_reference_sampling(tok):
    model = make_model(tok)
    ids = prompt(tok)
    end = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    res = Engine(model, tok).generate_batch(
        ids, num_samples=4, max_tokens=15, temperature=0.8, top_p=0.9, seed=5
    )
    ref = generate_nocache(
        model,
        ids,
        num_samples=4,
        max_tokens=15,
        temperature=0.8,
        top_p=0.9,
        seed=5,
        stop_tokens=end,
    )
    assert res.sequences == ref


def test_nocache_decoding_refuses_ragged_prompts(tok):
    # without a cache there is no pad mask, so prompts of different lengths cannot share a batch
    steps = decode_steps(
        make_model(tok), [[1, 2, 3], [4]], [0, 0], 1, 4, 1.0, None, None, set(), 0, use_cache=False
    )
    with pytest.raises(ValueError, match="one length"):
        next(steps)


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k2 = filter_logits(logits, 1.0, 2, None)
    assert torch.isinf(k2[0, 2:]).all() and torch.isfinite(k2[0, :2]).all()
    p = filter_logits(
        logits, 1.0, None, 0.7
    )  # 0.5 < 0.7 -> keep second; 0.8 >= 0.7 -> drop the rest
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    p1 = filter_logits(logits, 1.0, None, 0.4)  # top token always survives
    assert torch.isfinite(p1[0, 0]) and torch.isinf(p1[0, 1:]).all()


def test_top_k_one_is_greedy(tok):
    model = make_model(tok)
    eng = Engine(model, tok)
    ids = prompt(tok)
    g = eng.generate_batch(ids, max_tokens=10, temperature=0.0)
    k1 = eng.generate_batch(ids, max_tokens=10, temperature=1.0, top_k=1, seed=123)
    assert g.sequences == k1.sequences


def test_stream_matches_batch_and_bad_args(tok):
    model = make_model(tok)
    eng = Engine(model, tok)
    ids = prompt(tok)
    streamed = list(eng.stream(ids, max_tokens=12, temperature=0.9, seed=2))
    batch = eng.generate_batch(ids, num_samples=1, max_tokens=12, temperature=0.9, seed=2)
    assert streamed == batch.sequences[0]
    with pytest.raises(ValueError, match="max_tokens"):
        eng.generate_batch(ids, max_tokens=10_000)
    with pytest.raises(ValueError, match="temperature"):
        eng.generate_batch(ids, temperature=-1)


def test_multi_prompt_batch_equals_one_prompt_at_a_time(tok):
    # ragged prompts (left padding in the cache), rows stopping at different steps
    model = make_model(tok, stop_boost=3.0)
    eng = Engine(model, tok)
    prompts = [
        prompt(tok, text)
        for text in ("What is 2+2?", "Hi", "A much longer question, with more words?")
    ]
    assert len({len(p) for p in prompts}) == 3
    seeds = [5, 17, 99]
    for temperature in (1.0, 0.0):
        batched = eng.generate_multi(
            prompts, num_samples=4, max_tokens=25, temperature=temperature, seeds=seeds
        )
        for p, seed, res in zip(prompts, seeds, batched):
            alone = eng.generate_batch(
                p, num_samples=4, max_tokens=25, temperature=temperature, seed=seed
            )
            assert res.sequences == alone.sequences
            assert res.finished == alone.finished and res.prompt_len == len(p)
            for a, b in zip(res.logprobs, alone.logprobs):
                assert a == pytest.approx(b, abs=1e-4)
    assert len({len(s) for r in batched for s in r.sequences}) > 1


def test_batch_with_finished_rows_dropped_matches_nocache_reference(tok):
    # rows stop at different steps, so the decode batch shrinks (KVCache.keep_rows) along the way
    model = make_model(tok, stop_boost=3.0)
    end = {tok.encode_special("<|assistant_end|>"), tok.get_bos_token_id()}
    prompts = [prompt(tok, "Hi"), prompt(tok, "What is 7 times 8?")]
    batched = Engine(model, tok).generate_multi(
        prompts, num_samples=6, max_tokens=30, temperature=1.0, seeds=[3, 4]
    )
    lengths = [len(s) for r in batched for s in r.sequences]
    assert min(lengths) * 2 < max(lengths), "test needs rows that stop well before others"
    for p, seed, res in zip(prompts, [3, 4], batched):
        ref = generate_nocache(
            model, p, num_samples=6, max_tokens=30, temperature=1.0, seed=seed, stop_tokens=end
        )
        assert res.sequences == ref


def test_left_padded_forward_matches_unpadded(tok):
    model = make_model(tok)
    short, long_ = prompt(tok, "Hi"), prompt(tok, "A longer prompt here")
    cache = model.new_kv_cache(2, len(long_) + 3)
    pad = len(long_) - len(short)
    cache.pad = torch.tensor([pad, 0])
    bos = tok.get_bos_token_id()
    with torch.no_grad():
        batched = model(torch.tensor([[bos] * pad + short, long_]), kv_cache=cache)
        step = model(torch.tensor([[7], [7]]), kv_cache=cache)[:, -1]
        alone = model(torch.tensor([short + [7]]))
    # pad queries see themselves: no NaN leaks into later layers
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched[0, pad:], alone[0, :-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step[0], alone[0, -1], atol=1e-4, rtol=1e-4)


def test_multi_prompt_bad_args(tok):
    eng = Engine(make_model(tok), tok)
    with pytest.raises(ValueError, match="seeds"):
        eng.generate_multi([prompt(tok)], seeds=[1, 2])
    with pytest.raises(ValueError, match="no prompts"):
        eng.generate_multi([])


def test_static_decode_step_eager_and_compiled_match_the_engine(tok):
    # The GPU's decode step (fixed batch, fixed cache length, position as a tensor), run eagerly and
    # compiled by inductor on CPU: the same tokens as the engine's eager decode and log-probs within
    # round-off. Ragged prompts (left padding), rows that stop early (they keep decoding, masked).
    from nanochat.engine import static_decode_step

    model = make_model(tok, stop_boost=3.0)
    prompts = [prompt(tok, "Hi"), prompt(tok, "What is 7 times 8?")]
    kw = dict(num_samples=3, max_tokens=12, temperature=1.0, seeds=[3, 4], entropies=True)
    plain = Engine(model, tok, compile_decode=False).generate_multi(prompts, **kw)
    assert len({len(s) for r in plain for s in r.sequences}) > 1
    static = Engine(model, tok, compile_decode=False)
    static.step_fn = static_decode_step
    compiled = Engine(model, tok, compile_decode=True)
    assert compiled.step_fn is not None and compiled.step_fn is not static_decode_step
    for engine in (static, compiled):
        for a, b in zip(engine.generate_multi(prompts, **kw), plain):
            assert a.sequences == b.sequences and a.finished == b.finished
            for x, y in zip(a.logprobs, b.logprobs):
                assert x == pytest.approx(y, abs=1e-4)
            for x, y in zip(a.entropies, b.entropies):
                assert torch.tensor(x) == pytest.approx(torch.tensor(y), abs=1e-4)
