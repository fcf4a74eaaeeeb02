"""Checkpoints: atomic save, completeness, keep-last-N, truncation fallback, weights_only, and the
RNG round-trip."""

import json
import random
import warnings

import numpy as np
import pytest
import torch

from nanochat import checkpoint as ck


def _model_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)}


def _optim_states():
    # the shape of an AdamW state_dict after one step, built by hand: opt.step() would import
    # torch._dynamo
    state = {
        0: {"step": torch.tensor(1.0), "exp_avg": torch.randn(3, 3), "exp_avg_sq": torch.rand(3, 3)}
    }
    groups = [
        {"lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.0, "initial_lr": 0.01, "params": [0]}
    ]
    return [{"state": state, "param_groups": groups}]


def _save(d, step, keep_last=2, **kw):
    return ck.save_checkpoint(
        d,
        step,
        _model_state(step),
        _optim_states(),
        {"model_config": {"n": 1}},
        keep_last=keep_last,
        **kw,
    )


def test_roundtrip_weights_only(tmp_path):
    d = tmp_path / "ck"
    out = _save(d, 5, rank_state={"loader": {"epoch": 1}})
    assert out.name == "step_000005"
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "model.pt", "optim_rank0.pt"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["step"] == 5 and meta["world_size"] == 1
    assert set(meta["files"]) == {"model.pt", "optim_rank0.pt"}
    assert meta["files"]["model.pt"]["size"] == (out / "model.pt").stat().st_size
    assert meta["rank_state"] == [{"loader": {"epoch": 1}}]
    model_state, optim, meta2 = ck.load_checkpoint(d, load_optimizer=True)
    assert torch.equal(model_state["w"], _model_state(5)["w"])
    assert optim[0]["state"][0]["step"].item() == 1
    assert meta2 == meta
    # weights_only=True is what we use: it must also load with the strict loader directly
    torch.load(out / "model.pt", weights_only=True)


def test_meta_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        ck.save_checkpoint(tmp_path, 1, _model_state(), None, {"bad": object()})
    assert not (tmp_path / "step_000001").exists()


def test_keep_last_n(tmp_path):
    d = tmp_path / "ck"
    for step in (10, 20, 30, 40):
        _save(d, step, keep_last=2)
    assert sorted(p.name for p in d.iterdir()) == ["step_000030", "step_000040"]
    assert ck.find_last_step(d) == 40
    _save(d, 50, keep_last=None)
    assert sorted(p.name for p in d.iterdir()) == ["step_000030", "step_000040", "step_000050"]
    assert all(ck._verify(p)[0] for p in d.iterdir())


def test_crash_mid_save_and_truncation_fall_back(tmp_path):
    d = tmp_path / "ck"
    _save(d, 1, keep_last=5)
    _save(d, 2, keep_last=5)
    # crash during step 3: model written (to its tmp name), meta.json never written
    s3 = d / "step_000003"
    s3.mkdir()
    (s3 / "model.pt.tmp123").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="no meta.json"):
        assert ck.find_last_step(d) == 2
    # step 2's model truncated on disk after the fact -> step 1
    m = d / "step_000002" / "model.pt"
    size0 = m.stat().st_size
    m.write_bytes(m.read_bytes()[:100])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ck.find_last_step(d) == 1
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "no meta.json (save never finished)",
        f"model.pt has 100 bytes, meta.json says {size0} (truncated?)",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_state, _, meta = ck.load_checkpoint(d)
    assert meta["step"] == 1 and torch.equal(model_state["w"], _model_state(1)["w"])
    # same size but garbage contents: the zip directory check catches it
    m.write_bytes(b"\0" * size0)
    with pytest.warns(UserWarning, match="not a readable torch file"):
        assert ck.find_last_step(d) == 1
    # the next save prunes the broken leftovers but keeps what is complete
    _save(d, 4, keep_last=2)
    assert sorted(p.name for p in d.iterdir()) == ["step_000001", "step_000004"]
    # re-saving a step whose earlier save was killed clears the stale temp files
    (d / "step_000004" / "optim_rank0.pt.tmp999").write_bytes(b"partial")
    _save(d, 4, keep_last=2)
    assert sorted(p.name for p in (d / "step_000004").iterdir()) == [
        "meta.json",
        "model.pt",
        "optim_rank0.pt",
    ]


def test_resave_same_step_and_missing_optimizer_shard(tmp_path):
    d = tmp_path / "ck"
    _save(d, 7)
    _save(d, 7)  # re-saving after a resume overwrites in place
    assert ck.find_last_step(d) == 7
    with pytest.raises(FileNotFoundError, match="world_size=1"):
        ck.load_checkpoint(d, load_optimizer=True, rank=1)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        ck.load_checkpoint(tmp_path / "empty")
    assert ck.find_last_step(tmp_path / "nothing") is None


def test_clean_state_dict():
    sd = {"_orig_mod.a.w": 1, "module._orig_mod.b": 2, "c": 3}
    assert ck.clean_state_dict(sd) == {"a.w": 1, "b": 2, "c": 3}


def test_rng_roundtrip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = ck.save_rng_state()
    json.dumps(state)  # JSON-able, so it can live in meta.json
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck.restore_rng_state(json.loads(json.dumps(state)))
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_load_model_roundtrip(tmp_path, base_dir, monkeypatch):
    gpt = pytest.importorskip("nanochat.gpt")
    tok_mod = pytest.importorskip("nanochat.tokenizer")
    tok = tok_mod.Tokenizer(tok_mod.SPLIT_PATTERN, {bytes([i]): i for i in range(256)})
    monkeypatch.setattr(tok_mod, "get_tokenizer", lambda directory=None: tok)
    torch.manual_seed(0)
    cfg = gpt.GPTConfig(
        sequence_len=16,
        vocab_size=tok.get_vocab_size(),
        n_layer=1,
        n_head=2,
        n_kv_head=1,
        n_embd=16,
    )
    model = gpt.GPT(cfg)
    with torch.no_grad():  # c_proj starts at zero; make the test sensitive to every weight
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    # state from a "compiled" model: keys carry _orig_mod.
    state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    meta = {"model_config": cfg.__dict__}
    ck.save_checkpoint(ck.checkpoint_dir("base", "d1"), 3, state, None, meta)
    loaded, tokenizer, meta2 = ck.load_model("base", device="cpu")
    assert tokenizer is tok and meta2["step"] == 3 and not loaded.training
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(idx), loaded(idx))
    with pytest.raises(SystemExit, match="no checkpoints"):  # one line for the user, no traceback
        ck.load_model("sft")


def _two_rank_worker(rank, world_size, d, port):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        optim = [{"state": {}, "param_groups": [], "rank": torch.tensor([rank])}]
        ck.save_checkpoint(
            d,
            1,
            _model_state(1),
            optim,
            {"model_config": {}},
            rank=rank,
            rank_state={"loader": rank * 10},
        )
    finally:
        dist.destroy_process_group()


def test_two_rank_save_gloo(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tmp_path / "ck"
    mp.spawn(_two_rank_worker, args=(2, str(d), port), nprocs=2, join=True)
    meta = json.loads((d / "step_000001" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert set(meta["files"]) == {"model.pt", "optim_rank0.pt", "optim_rank1.pt"}
    assert meta["rank_state"] == [{"loader": 0}, {"loader": 10}]
    for r in (0, 1):
        _, optim, _ = ck.load_checkpoint(d, load_optimizer=True, rank=r)
        assert optim[0]["rank"].item() == r


def test_load_model_refuses_another_tokenizer(base_dir):
    """A checkpoint records the tokenizer it was trained with; a tokenizer retrained in its place
    since (another run, another vocabulary) is refused in one line instead of feeding the model
    foreign ids."""
    gpt = pytest.importorskip("nanochat.gpt")
    tok_mod = pytest.importorskip("nanochat.tokenizer")
    byte_ranks = {bytes([i]): i for i in range(256)}
    first = tok_mod.Tokenizer(tok_mod.SPLIT_PATTERN, byte_ranks)
    first.save(tok_mod.tokenizer_dir())
    first = tok_mod.get_tokenizer()
    cfg = gpt.GPTConfig(
        sequence_len=16,
        vocab_size=first.get_vocab_size(),
        n_layer=1,
        n_head=2,
        n_kv_head=1,
        n_embd=16,
    )
    meta = {"model_config": cfg.__dict__, "tokenizer": tok_mod.tokenizer_record(first)}
    assert meta["tokenizer"]["dir"] == "tokenizer"  # relative: a fetched base dir still resolves
    ck.save_checkpoint(ck.checkpoint_dir("base", "d1"), 1, gpt.GPT(cfg).state_dict(), None, meta)
    _, tokenizer, _ = ck.load_model("base", device="cpu")
    assert tokenizer.fingerprint() == first.fingerprint()

    # same vocabulary size, other merges: ids would silently mean other tokens
    swapped = {**byte_ranks, b"a": 98, b"b": 97}
    tok_mod.Tokenizer(tok_mod.SPLIT_PATTERN, swapped).save(tok_mod.tokenizer_dir())
    with pytest.raises(SystemExit, match="trained with another tokenizer .* retrained since"):
        ck.load_model("base", device="cpu")

    # a checkpoint that records no tokenizer: a vocabulary larger than the model's is still refused
    bigger = tok_mod.Tokenizer(tok_mod.SPLIT_PATTERN, {**byte_ranks, b"ab": 256})
    bigger.save(tok_mod.tokenizer_dir())
    ck.save_checkpoint(
        ck.checkpoint_dir("base", "old"),
        1,
        gpt.GPT(cfg).state_dict(),
        None,
        {"model_config": cfg.__dict__},
    )
    with pytest.raises(
        SystemExit,
        match=f"has {bigger.get_vocab_size()} tokens but the model only {cfg.vocab_size}",
    ):
        ck.load_model("base", tag="old", device="cpu")
