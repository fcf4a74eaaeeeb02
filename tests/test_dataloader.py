"""DataLoader: BOS-aligned best-fit packing, exact resume from state_dict, disjoint rank shards."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat import dataset as ds
from nanochat.dataloader import DataLoader
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer


@pytest.fixture(scope="module")
def tok():
    # a real (tiktoken-backed) byte-level tokenizer: 256 byte tokens and the specials, untrained
    return Tokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})


def _docs(n, seed=0):
    import random

    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "x", "y=3", "sum", "of", "the", "ratio"]
    return [
        f"doc{seed}-{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        for i in range(n)
    ]


def _write_corpus(d, n_files=3, docs_per_file=60, row_group_size=10):
    d.mkdir(parents=True, exist_ok=True)
    all_docs = []
    for f in range(n_files):
        docs = _docs(docs_per_file, seed=f)
        pq.write_table(
            pa.table({"text": docs}), d / f"part_{f:03d}.parquet", row_group_size=row_group_size
        )
        all_docs.append(docs)
    return all_docs


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_rows_are_bos_aligned_and_whole_documents(tmp_path, tok):
    docs = _write_corpus(tmp_path / "c")
    train_docs = set(docs[0] + docs[1])
    loader = DataLoader(
        tok, batch_size=4, seq_len=64, split="train", data_dir=tmp_path / "c", buffer_size=8
    )
    assert loader.source == "dir"
    bos = tok.get_bos_token_id()
    n_whole = 0
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (4, 64) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        assert (x[:, 0] == bos).all()  # every row starts a document
        for row in torch.cat([x, y[:, -1:]], dim=1).tolist():
            # split the row at BOS: each piece is a whole document, or (the last piece) a
            # cropped prefix of one
            starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
            for a, b in zip(starts, starts[1:]):
                text = tok.decode(row[a + 1 : b])
                if text in train_docs:
                    n_whole += 1
                else:
                    assert b == len(row) and any(d.startswith(text) for d in train_docs), text
    assert n_whole > 20


@pytest.mark.parametrize("buffer_size", [1, 8])
def test_exact_resume_across_epochs(tmp_path, tok, buffer_size):
    _write_corpus(tmp_path / "c", n_files=2, docs_per_file=30)
    kw = dict(
        batch_size=3, seq_len=48, split="train", data_dir=tmp_path / "c", buffer_size=buffer_size
    )
    ref = DataLoader(tok, **kw)
    reference = _take(ref, 40)  # 30 train docs: many epochs
    assert ref.epoch >= 2
    for k in (0, 1, 7, 23):
        a = DataLoader(tok, **kw)
        _take(a, k)
        state = json.loads(json.dumps(a.state_dict()))  # must survive meta.json
        assert state["batches"] == k
        b = DataLoader(tok, **kw, state=state)
        for (x0, y0), (x1, y1) in zip(reference[k : k + 10], _take(b, 10)):
            assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_resume_refuses_other_world_size_or_data(tmp_path, tok):
    _write_corpus(tmp_path / "c")
    a = DataLoader(tok, 2, 16, "train", data_dir=tmp_path / "c")
    a.next_batch()
    with pytest.raises(ValueError, match="world_size"):
        DataLoader(
            tok, 2, 16, "train", rank=0, world_size=2, data_dir=tmp_path / "c", state=a.state_dict()
        )
    _write_corpus(tmp_path / "c", n_files=4)
    with pytest.raises(ValueError, match="fingerprint"):
        DataLoader(tok, 2, 16, "train", data_dir=tmp_path / "c", state=a.state_dict())


def _rank_docs(units):
    return [d for u in units for d in ds.load_unit(u)]


@pytest.mark.parametrize(
    "row_group_size", [10, 1000]
)  # train = 12 row groups; or 1 (< 2 ranks: split by doc)
def test_two_ranks_disjoint_and_complete(tmp_path, tok, row_group_size):
    docs = _write_corpus(
        tmp_path / "c", n_files=2, docs_per_file=120, row_group_size=row_group_size
    )
    _, units = ds.list_units("train", "dir", tmp_path / "c")
    r0 = _rank_docs(ds.shard_units(units, 0, 2))
    r1 = _rank_docs(ds.shard_units(units, 1, 2))
    assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(docs[0])
    assert r0 and r1
    # fewer units than ranks: each unit is split by document
    _, val_units = ds.list_units("val", "dir", tmp_path / "c")
    v = (
        [_rank_docs(ds.shard_units(val_units, r, 3)) for r in range(3)]
        if len(val_units) < 3
        else None
    )
    if v is not None:
        assert sorted(v[0] + v[1] + v[2]) == sorted(docs[1]) and all(v)
    # the loaders themselves read disjoint documents
    bos = tok.get_bos_token_id()
    seen = []
    for rank in (0, 1):
        loader = DataLoader(tok, 1, 4000, "train", rank=rank, world_size=2, data_dir=tmp_path / "c")
        row = torch.cat(loader.next_batch(), dim=1)[0].tolist()
        pieces = [tok.decode(p) for p in _split_at(row, bos)]
        seen.append({p.split(":")[0] for p in pieces})
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def _split_at(row, bos):
    out, cur = [], None
    for t in row:
        if t == bos:
            if cur:
                out.append(cur)
            cur = []
        elif cur is not None:
            cur.append(t)
    return out[:-1]  # drop the possibly cropped last piece


def test_val_loader_and_device(tmp_path, tok):
    _write_corpus(tmp_path / "c")
    loader = DataLoader(tok, 2, 32, "val", data_dir=tmp_path / "c", device="cpu")
    x, y = loader.next_batch()
    assert x.device.type == "cpu" and x.is_contiguous() and y.is_contiguous()


def test_synthetic_source_resume(tok, monkeypatch):
    pytest.importorskip("tasks.synthetic_aqua")
    monkeypatch.setattr(ds, "SYN_TRAIN_UNITS", 3)
    kw = dict(batch_size=2, seq_len=256, split="train", source="synthetic", buffer_size=16)
    ref = DataLoader(tok, **kw)
    reference = _take(ref, 8)
    a = DataLoader(tok, **kw)
    _take(a, 5)
    b = DataLoader(tok, **kw, state=a.state_dict())
    assert all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(reference[5:], _take(b, 3)))
