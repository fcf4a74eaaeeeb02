"""GPT model: depth dial, param counts, losses, attention capture vs SDPA, KV-cache decoding."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanochat.compile import maybe_compile
from nanochat.gpt import GPT, GPTConfig, KVCache, config_from_depth

TINY = dict(sequence_len=32, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def tiny_model(seed=0, **overrides):
    """Tiny fp32 model whose zero-initialised output projections are made non-zero, so attention
    and the MLP actually shape the logits (a zero c_proj would make cache bugs invisible)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    model.compute_dtype = torch.float32
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.1)
            block.mlp.c_proj.weight.normal_(std=0.1)
            if block.attn.ve_gate is not None:  # a gate that differs per token and head
                block.attn.ve_gate.weight.normal_(std=0.5)
        model.lm_head.weight.normal_(std=0.1)
        for table in model.value_embeds.values():  # tables start at zero: give them values
            table.weight.normal_(std=1.0)
    return model.eval()


# ---------------------------------------------------------------------------- depth dial and sizes


@pytest.mark.parametrize(
    "depth,n_embd,n_head,lo,hi",
    [
        (8, 512, 4, 85e6, 100e6),  # 92.3M with the 64K vocab (58.7M with a 32K vocab)
        (12, 768, 6, 175e6, 195e6),  # 185.6M
        (20, 1280, 10, 540e6, 580e6),  # 561.0M  (the ~560M of the user's table)
        (26, 1664, 13, 1.0e9, 1.15e9),  # 1.08B   (~1.1B)
    ],
)
def test_depth_dial_builds_and_param_counts(depth, n_embd, n_head, lo, hi):
    config = config_from_depth(depth, vocab_size=65536)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (
        depth,
        n_embd,
        n_head,
        n_head,
    )
    with torch.device("meta"):  # no memory, no init: counting only
        model = GPT(config)
    # the budget count (what the counts above name) leaves out the value-embedding tables
    n = model.num_budget_params()
    assert lo < n < hi, f"d{depth}: {n / 1e6:.1f}M params"
    ve_layers = depth // 2  # every second layer, counted back from the last
    gates = ve_layers * 32 * n_head
    assert n == depth * 12 * n_embd**2 + 2 * 65536 * n_embd + gates
    assert model.num_params() == n + ve_layers * 65536 * n_embd
    head_dim = n_embd // n_head
    assert (
        model.estimate_flops() == 6 * (n - 65536 * n_embd) + 12 * depth * n_head * head_dim * 2048
    )


def test_d8_with_32k_vocab_is_about_60m():
    with torch.device("meta"):
        model = GPT(config_from_depth(8, vocab_size=32768))
    assert 55e6 < model.num_budget_params() < 62e6


def test_config_from_depth_rules():
    with pytest.raises(ValueError, match="depth"):
        config_from_depth(0, vocab_size=256)
    assert (config_from_depth(1, vocab_size=256).n_head) == 1  # 64 wide: one head of 64
    d7 = config_from_depth(
        7, vocab_size=256
    )  # 448 // 128 = 3 does not divide 448 -> 2 heads of 224
    assert (d7.n_embd, d7.n_head, d7.n_kv_head) == (448, 2, 2)
    for depth in range(1, 33):
        c = config_from_depth(depth, vocab_size=256)
        assert c.n_embd % c.n_head == 0 and (c.n_embd // c.n_head) % 2 == 0


def test_gqa_config_validation():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPT(GPTConfig(**{**TINY, "n_kv_head": 3}))


# -------------------------------------------------------------------------------- init and forward


def test_init_is_nanochat_style_and_initial_loss_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    for block in model.transformer.h:
        assert (
            block.attn.c_proj.weight.abs().sum() == 0 and block.mlp.c_proj.weight.abs().sum() == 0
        )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(m.bias is not None for m in model.modules() if isinstance(m, torch.nn.Linear))
    x = torch.randint(0, 256, (2, 16))
    loss = model(x, x)
    assert abs(loss.item() - math.log(256)) < 0.05  # lm_head std 0.001 -> near-uniform predictions


def test_meta_then_to_empty_then_init_weights():
    with torch.device("meta"):
        model = GPT(GPTConfig(**TINY))
    model.to_empty(device="cpu")
    model.init_weights()
    ref = GPT(GPTConfig(**TINY))
    assert torch.equal(model.cos, ref.cos) and torch.equal(model.sin, ref.sin)
    logits = model(torch.randint(0, 256, (1, 8)))
    assert torch.isfinite(logits).all()


def test_logits_fp32_softcapped_and_loss_reductions():
    model = tiny_model()
    x = torch.randint(0, 256, (2, 12))
    y = torch.randint(0, 256, (2, 12))
    y[0, :5] = -1
    logits = model(x)
    assert logits.shape == (2, 12, 256) and logits.dtype == torch.float32
    assert logits.abs().max() <= model.config.softcap
    ref_mean = F.cross_entropy(logits.view(-1, 256), y.view(-1), ignore_index=-1)
    torch.testing.assert_close(model(x, y), ref_mean)
    torch.testing.assert_close(model(x, y, loss_reduction="sum"), ref_mean * (y != -1).sum())
    per_tok = model(x, y, loss_reduction="none")
    assert per_tok.shape == (2, 12)
    assert (per_tok[0, :5] == 0).all()
    torch.testing.assert_close(per_tok.sum() / (y != -1).sum(), ref_mean)
    with pytest.raises(ValueError, match="loss_reduction"):
        model(x, y, loss_reduction="avg")


def test_per_token_losses_without_grad_go_a_chunk_of_rows_at_a_time(monkeypatch):
    import nanochat.gpt as gpt

    model = tiny_model()
    x = torch.randint(0, 256, (3, 12))
    y = torch.randint(0, 256, (3, 12))
    y[1, 4:] = -1
    full = model(x, y, loss_reduction="none")  # with grad: the plain full-logits path
    head, chunks = model._head_logits, []
    monkeypatch.setattr(model, "_head_logits", lambda h, ac: chunks.append(h.shape) or head(h, ac))
    monkeypatch.setattr(gpt, "HEAD_CHUNK_ROWS", 8)
    with torch.no_grad():
        per_token = model(x, y, loss_reduction="none")
    # 36 rows, 8 at a time: the logits of all 36 never exist at once
    assert [tuple(c) for c in chunks] == [(8, 64)] * 4 + [(4, 64)]
    assert per_token.shape == (3, 12) and (per_token[1, 4:] == 0).all()
    torch.testing.assert_close(per_token, full.detach())


@pytest.mark.parametrize("softcap", [15.0, 0.0])
def test_chunked_head_loss_equals_full_logits_loss_and_grads(softcap):
    """The scalar losses never build the (rows, vocab) logits; loss and every gradient are the same
    as through the full logits (several chunks, ignored targets, with and without the softcap)."""
    from nanochat.gpt import chunked_head_loss

    torch.manual_seed(0)
    h = torch.randn(10, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (10,))
    t[[2, 7]] = -1
    z = h @ w.t()
    ref = F.cross_entropy(
        softcap * torch.tanh(z / softcap) if softcap else z, t, ignore_index=-1, reduction="sum"
    )
    ref_gh, ref_gw = torch.autograd.grad(ref * 0.3, (h, w))
    out = chunked_head_loss(
        h, w, t, softcap, torch.float32, chunk=3
    )  # 4 chunks, the last one short
    gh, gw = torch.autograd.grad(out * 0.3, (h, w))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gh, ref_gh)
    torch.testing.assert_close(gw, ref_gw)

    # through the model: the chunked path against the plain one, "mean" and "sum", every parameter
    x, y = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    y[0, :5] = -1
    for reduction in ("mean", "sum"):
        grads = []
        for chunked in (True, False):
            model = tiny_model(softcap=softcap).train()
            model.chunked_loss = chunked
            loss = model(x, y, loss_reduction=reduction)
            loss.backward()
            grads.append((loss.detach(), [p.grad for p in model.parameters()]))
        torch.testing.assert_close(grads[0][0], grads[1][0])
        for a, b in zip(grads[0][1], grads[1][1]):
            torch.testing.assert_close(a, b)


def test_all_ignored_targets_give_zero_loss_with_graph():
    model = tiny_model().train()
    x = torch.randint(0, 256, (2, 8))
    loss = model(x, torch.full((2, 8), -1))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0


def test_bf16_compute_puts_the_residual_stream_and_lookups_in_bf16(monkeypatch):
    # The fp32 tables' rows are cast on lookup: an fp32 embedding would keep the whole residual
    # stream (and what autograd saves along it) fp32 under autocast, twice the activation memory.
    model = tiny_model(value_embed_every=1).train()
    model.compute_dtype = None
    monkeypatch.setenv("NANOCHAT_DTYPE", "bf16")  # CPU autocast, as CUDA's bf16
    seen = []
    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, args[5].dtype)))
        block.register_forward_hook(lambda mod, args, out: seen.append((out.dtype,)))
    x = torch.randint(0, 256, (2, 16))
    model(x, x).backward()
    assert seen == [(torch.bfloat16, torch.bfloat16), (torch.bfloat16,)] * model.config.n_layer
    # the master weights and their gradients stay fp32, and the gradient reaches the tables
    for p in (model.transformer.wte.weight, *(t.weight for t in model.value_embeds.values())):
        assert p.dtype == p.grad.dtype == torch.float32 and p.grad[x.unique()].abs().sum() > 0


def test_bf16_compute_keeps_fp32_params_and_logits(monkeypatch):
    model = tiny_model(value_embed_every=1)
    x = torch.randint(0, 256, (2, 16))
    ref = model(x)
    model.compute_dtype = None
    monkeypatch.setenv(
        "NANOCHAT_DTYPE", "bf16"
    )  # autodetect honours the override (CPU autocast here)
    assert model.get_compute_dtype() == torch.bfloat16
    sdpa, dtypes = F.scaled_dot_product_attention, []
    monkeypatch.setattr(
        F,
        "scaled_dot_product_attention",
        lambda q, k, v, **kw: dtypes.append((q.dtype, v.dtype)) or sdpa(q, k, v, **kw),
    )
    out = model(x)
    # the fp32 value-embedding tables must not pull attention out of bf16
    assert dtypes == [(torch.bfloat16, torch.bfloat16)] * model.config.n_layer
    assert out.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
    assert (out - ref).abs().max() < 0.25 and not torch.equal(out, ref)
    # bf16 cache decode runs and stays close to the bf16 full forward
    kv = model.new_kv_cache(2, 32)
    assert kv.dtype == torch.bfloat16
    steps = [model(x[:, :10], kv_cache=kv)] + [
        model(x[:, t : t + 1], kv_cache=kv) for t in range(10, 16)
    ]
    assert (torch.cat(steps, 1) - out).abs().max() < 0.25


# ------------------------------------------------------------------------------- attention capture


@pytest.mark.parametrize(
    "n_kv_head, value_embed_every", [(4, 0), (2, 0), (1, 0), (2, 1)]
)  # MHA, GQA, MQA
def test_explicit_attention_matches_sdpa(n_kv_head, value_embed_every):
    model = tiny_model(n_kv_head=n_kv_head, value_embed_every=value_embed_every)
    x = torch.randint(0, 256, (2, 20))
    ref = model(x)
    capture = []
    out = model(x, attn_capture=capture)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(capture) == model.config.n_layer
    for probs in capture:
        assert probs.shape == (2, 4, 20, 20) and probs.dtype == torch.float32
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 20))
        assert (probs.triu(diagonal=1) == 0).all()  # causal


def test_attention_capture_with_kv_cache_has_offset_mask():
    model = tiny_model()
    x = torch.randint(0, 256, (1, 12))
    full_capture = []
    model(x, attn_capture=full_capture)
    kv = model.new_kv_cache(1, 32)
    model(x[:, :8], kv_cache=kv)
    capture = []
    model(x[:, 8:], kv_cache=kv, attn_capture=capture)
    assert capture[0].shape == (1, 4, 4, 12)
    torch.testing.assert_close(capture[1], full_capture[1][:, :, 8:, :], atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("n_kv_head, value_embed_every", [(4, 0), (2, 0), (2, 1), (4, 2)])
def test_kv_cache_decode_matches_full_forward(n_kv_head, value_embed_every):
    model = tiny_model(n_kv_head=n_kv_head, value_embed_every=value_embed_every)
    x = torch.randint(0, 256, (2, 24))
    full = model(x)
    kv = model.new_kv_cache(batch_size=2, seq_len=32)
    outs = [model(x[:, :9], kv_cache=kv)]  # prefill
    assert kv.get_pos() == 9
    for t in range(9, 24):  # token-by-token decode
        outs.append(model(x[:, t : t + 1], kv_cache=kv))
    assert kv.get_pos() == 24
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_chunked_prefill_uses_offset_causal_mask():
    model = tiny_model()
    x = torch.randint(0, 256, (2, 20))
    full = model(x)
    kv = KVCache(2, model.config.n_kv_head, 32, 16, model.config.n_layer, "cpu", torch.float32)
    chunks = [model(x[:, a:b], kv_cache=kv) for a, b in [(0, 5), (5, 12), (12, 13), (13, 20)]]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


def test_kv_cache_repeat_batch_prefill_once_sample_many():
    model = tiny_model()
    prompt = torch.randint(0, 256, (1, 10))
    kv = model.new_kv_cache(batch_size=1, seq_len=32)
    model(prompt, kv_cache=kv)
    kv3 = kv.repeat_batch(3)
    assert kv3.batch_size == 3 and kv3.get_pos() == 10 and kv.batch_size == 1
    nxt = torch.tensor([[1], [2], [3]])
    out = model(nxt, kv_cache=kv3)[:, -1]
    full = model(torch.cat([prompt.expand(3, -1), nxt], 1))[:, -1]
    torch.testing.assert_close(out, full, atol=1e-5, rtol=1e-5)
    assert kv.get_pos() == 10  # the original cache is untouched


def test_kv_cache_overflow_and_shape_errors():
    model = tiny_model()
    kv = model.new_kv_cache(batch_size=1, seq_len=8)
    model(torch.randint(0, 256, (1, 8)), kv_cache=kv)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.randint(0, 256, (1, 1)), kv_cache=kv)
    with pytest.raises(ValueError, match="KVCache was built"):
        model(torch.randint(0, 256, (2, 1)), kv_cache=model.new_kv_cache(batch_size=1, seq_len=8))


# ----------------------------------------------------------------------------------- compile switch


def test_maybe_compile_switch(monkeypatch):
    model = tiny_model()
    monkeypatch.delenv("NANOCHAT_COMPILE", raising=False)
    assert maybe_compile(model, "cpu") is model  # off on CPU by default
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    assert maybe_compile(model, "cuda") is model  # env switches the CUDA default off
    assert maybe_compile(model, "cuda", enabled=False) is model
    monkeypatch.setenv("NANOCHAT_COMPILE", "yes")
    with pytest.raises(ValueError, match="NANOCHAT_COMPILE"):
        maybe_compile(model, "cpu")
    # a stand-in for torch.compile: importing dynamo costs seconds and only the switch is tested
    calls = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: calls.append((m, kw)) or "compiled")
    monkeypatch.setenv("NANOCHAT_COMPILE", "1")
    model.compute_dtype = None
    assert maybe_compile(model, "cpu") == "compiled" and calls == [(model, {"dynamic": False})]
    assert model.compute_dtype == torch.float32  # resolved before compiling, outside the graph
    monkeypatch.delenv("NANOCHAT_COMPILE")
    assert maybe_compile(model, "cpu", enabled=True) == "compiled"


# -------------------------------------------------------------------------------- value embeddings


def test_value_embeddings_sit_on_every_kth_layer_from_the_last_and_change_the_output():
    cfg = dict(TINY, n_layer=5)
    plain, every2 = tiny_model(**cfg), tiny_model(**cfg, value_embed_every=2)
    assert list(plain.value_embeds) == [] and list(every2.value_embeds) == ["0", "2", "4"]
    assert [b.attn.ve_gate is not None for b in every2.transformer.h] == [
        True,
        False,
        True,
        False,
        True,
    ]
    kv_dim = TINY["n_kv_head"] * TINY["n_embd"] // TINY["n_head"]
    extra = 3 * (256 * kv_dim + 32 * TINY["n_kv_head"])  # three tables and three gates
    assert every2.num_params() - plain.num_params() == extra
    # lookups cost no matmul FLOPs: only the three tiny gates count
    assert every2.estimate_flops() - plain.estimate_flops() == 6 * 3 * 32 * TINY["n_kv_head"]
    x = torch.randint(0, 256, (2, 16))
    assert not torch.allclose(plain(x), every2(x))
    # the gate is 2 sigmoid(W x): exactly 1 at init; the tables start at zero, so a fresh model
    # computes what the model without them does
    fresh = GPT(GPTConfig(**cfg, value_embed_every=2))
    assert all(
        (b.attn.ve_gate.weight == 0).all()
        for b in fresh.transformer.h
        if b.attn.ve_gate is not None
    )
    assert all((t.weight == 0).all() for t in fresh.value_embeds.values())


def test_value_embedding_rows_of_tokens_never_seen_stay_zero():
    """The chat special tokens never occur in pretraining: their rows must stay zero (no noise in
    the values when fine-tuning first shows them), while the rows of the tokens trained on move."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, value_embed_every=1))
    model.compute_dtype = torch.float32
    opts = model.setup_optimizers()
    x = torch.randint(0, 128, (2, 16))  # ids 128..255 never occur
    model.train()
    for _ in range(3):
        model(x, x).backward()
        for opt in opts:
            opt.step()
        model.zero_grad(set_to_none=True)
    seen = torch.zeros(256, dtype=torch.bool)
    seen[x.unique()] = True
    for table in model.value_embeds.values():
        assert (table.weight[seen].abs().sum(dim=1) > 0).all()
        assert (table.weight[~seen] == 0).all()


def test_value_embedding_tables_train_with_the_embedding_rule_and_gates_with_muon():
    model = tiny_model(value_embed_every=1)
    adam, muon = model.setup_optimizers()
    embedding_group = next(
        g for g in adam.param_groups if any(p is model.transformer.wte.weight for p in g["params"])
    )
    assert all(
        any(t.weight is p for p in embedding_group["params"]) for t in model.value_embeds.values()
    )
    muon_params = {id(p) for g in muon.param_groups for p in g["params"]}
    assert all(id(b.attn.ve_gate.weight) in muon_params for b in model.transformer.h)
    x = torch.randint(0, 256, (2, 16))
    model.train()
    model(x, x).backward()
    for opt in (adam, muon):
        opt.step()
    assert all(
        t.weight.grad is not None and t.weight.grad.abs().sum() > 0
        for t in model.value_embeds.values()
    )


def test_checkpoints_from_before_value_embeddings_still_load(base_dir):
    """meta.json of an older model has no value_embed_every: it loads as the model it was (none)."""
    from dataclasses import asdict

    import nanochat.checkpoint as ck
    from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer, tokenizer_record

    tok = Tokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})
    tok.save(base_dir / "tokenizer")
    cfg = GPTConfig(**dict(TINY, vocab_size=tok.get_vocab_size()))
    old_config = {k: v for k, v in asdict(cfg).items() if k != "value_embed_every"}
    ck.save_checkpoint(
        ck.checkpoint_dir("base", "old"),
        1,
        GPT(cfg).state_dict(),
        None,
        {"model_config": old_config, "tokenizer": tokenizer_record(tok)},
    )
    model, _, _ = ck.load_model("base", "old", device="cpu")
    assert model.config.value_embed_every == 0 and not model.value_embeds


def test_the_training_loss_sends_only_rows_with_a_target_through_the_head(monkeypatch):
    """Mid-training and SFT rows are mostly prompt and padding (targets -1): on CPU those rows
    skip the lm_head matmuls. Loss and gradients are those of the plain path (test above)."""
    from nanochat import gpt

    rows_seen = []
    real = gpt.chunked_head_loss

    def spy(h, *args, **kwargs):
        rows_seen.append(h.size(0))
        return real(h, *args, **kwargs)

    monkeypatch.setattr(gpt, "chunked_head_loss", spy)
    model = tiny_model().train()
    x, y = torch.randint(0, 256, (2, 12)), torch.randint(0, 256, (2, 12))
    y[0, :9] = -1
    y[1, 3:] = -1
    model(x, y).backward()
    assert rows_seen == [6]
    model(x, torch.randint(0, 256, (2, 12))).backward()  # pretraining: every row has a target
    assert rows_seen == [6, 24]
