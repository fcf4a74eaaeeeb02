"""scripts.tok_train and scripts.tok_eval end to end, on a small local corpus in a temp base dir."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken

from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_tokenizer
from nanochat.tracking import read_jsonl
from scripts import tok_eval, tok_train

REPO = Path(__file__).resolve().parents[1]

WORDS = (
    "the a of to and in is was for on that with as by at from it train speed hour distance "
    "profit percent ratio number average sum price cost rate time work pipe tank boat stream "
    "answer option question rationale therefore hence let us find total value equal minus plus"
).split()


def make_docs(n_docs: int, seed: int) -> list[str]:
    """Deterministic pseudo-text: sentences of common words, numbers, some Unicode and code."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        sentences = []
        for _ in range(rng.randint(3, 12)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            if rng.random() < 0.5:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 9999)))
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ";"]))
        if i % 7 == 0:
            sentences.append("Café 日本語 😀 — naïve.")
        if i % 5 == 0:
            sentences.append("def f(x):\n    return x * 2\n")
        docs.append(" ".join(sentences))
    return docs


def write_corpus(data_dir: Path, train_docs=900, val_docs=60) -> None:
    """Local parquet shards in the pretraining format (a `text` column); the last is the val
    split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data_dir.mkdir(parents=True, exist_ok=True)
    docs = make_docs(train_docs, seed=0)
    half = len(docs) // 2
    for k, chunk in enumerate([docs[:half], docs[half:], make_docs(val_docs, seed=1)]):
        pq.write_table(
            pa.table({"text": chunk}), data_dir / f"shard_{k:05d}.parquet", row_group_size=100
        )


def run_script(module: str, *args: str, base: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def save_small_tokenizer(base: Path) -> Tokenizer:
    """A byte-level tokenizer with a few handmade merges, for tok_eval tests without training."""
    ranks = {bytes([i]): i for i in range(256)}
    for tok in (b"th", b"he", b"the", b" the", b"in", b"an", b"  "):
        ranks[tok] = len(ranks)
    tok = Tokenizer(SPLIT_PATTERN, ranks)
    tok.save(base / "tokenizer")
    return tok


# ---------------------------------------------------------------------- end to end (subprocess)
def test_tok_train_then_eval_on_local_corpus(tmp_path, base_dir):
    data = tmp_path / "shards"
    write_corpus(data)
    res = run_script(
        "scripts.tok_train",
        "--source",
        "dir",
        "--data-dir",
        str(data),
        "--vocab-size",
        "512",
        "--max-chars",
        "200000",
        "--no-wandb",
        base=base_dir,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "[tok_train] done: vocab 512" in res.stdout and "chars/s" in res.stdout

    tok_dir = base_dir / "tokenizer"
    assert {"tokenizer.tiktoken", "tokenizer.json", "token_bytes.pt"} <= {
        p.name for p in tok_dir.iterdir()
    }
    tok = get_tokenizer()
    assert tok.get_vocab_size() == 512
    assert tok.get_bos_token_id() == 512 - len(SPECIAL_TOKENS)
    meta = json.loads((tok_dir / "tokenizer.json").read_text())["meta"]
    assert 0 < meta["train_chars"] <= 200_000 and meta["train_docs"] > 0 and meta["source"] == "dir"
    text = make_docs(1, seed=123)[0]
    assert tok.decode(tok.encode(text)) == text
    assert (
        len(tok.encode(text)) < len(text.encode("utf-8")) / 2.5
    )  # merges learned from this corpus
    assert (
        (base_dir / "report" / "local" / "tokenizer.md")
        .read_text()
        .startswith("## Tokenizer training")
    )
    rows = read_jsonl(base_dir / "runs" / "local" / "tok_train.jsonl")
    assert any(
        r.get("vocab_size") == 512 and r.get("train_chars") == meta["train_chars"] for r in rows
    )

    res = run_script(
        "scripts.tok_eval",
        "--source",
        "dir",
        "--data-dir",
        str(data),
        "--download-timeout",
        "20",
        "--no-wandb",
        base=base_dir,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    section = (base_dir / "report" / "local" / "tok_eval.md").read_text()
    for name in ("prose", "code", "math", "val", "all"):
        assert f"| {name} |" in section
        assert any(line.startswith(name) for line in res.stdout.splitlines())
    # online: GPT-2/GPT-4 columns; offline: a clear note saying why they are missing
    assert ("ours vs gpt4" in section) or ("comparison skipped" in section and "network" in section)
    rows = read_jsonl(base_dir / "runs" / "local" / "tok_eval.jsonl")
    metrics = next(r for r in rows if "bytes_per_token/all" in r)
    assert (
        metrics["bytes_per_token/val"] > 2.5
    )  # the val split is the same kind of text as training


def test_tok_train_bad_source_fails_clearly(tmp_path, base_dir):
    empty = tmp_path / "nothing"
    empty.mkdir()
    for data_dir in (empty, tmp_path / "missing"):
        with pytest.raises(SystemExit) as info:
            tok_train.main(
                [
                    "--source",
                    "dir",
                    "--data-dir",
                    str(data_dir),
                    "--vocab-size",
                    "300",
                    "--no-wandb",
                ]
            )
        assert "cannot read the training text" in str(info.value) and str(data_dir) in str(
            info.value
        )
    assert not (base_dir / "tokenizer").exists()


def test_scripts_help(capsys):
    for script in (tok_train, tok_eval):
        with pytest.raises(SystemExit) as info:
            script.main(["--help"])
        assert info.value.code == 0
        assert "--source" in capsys.readouterr().out


# ---------------------------------------------------------------------- in-process pieces
def test_tok_train_flag_validation(capsys):
    for bad in (
        ["--vocab-size", "abc"],
        ["--vocab-size", "200"],
        ["--max-chars", "-5"],
        ["--doc-cap", "1.5"],
        ["--source", "web"],
    ):
        with pytest.raises(SystemExit) as info:
            tok_train.main(bad)
        assert info.value.code == 2
    assert tok_train.count_int("2e9") == 2_000_000_000 and tok_train.count_int("65_536") == 65536


def test_progress_iterator_caps(capsys):
    docs = ["x" * 50, "y" * 5, "z" * 50, "w" * 50, "never read"]
    it = tok_train.ProgressIterator(iter(docs), max_chars=60, doc_cap=20, every_s=0.0)
    out = list(it)
    # each doc capped at 20 chars; the last one cut so the total is exactly max_chars
    assert out == ["x" * 20, "y" * 5, "z" * 20, "w" * 15]
    assert it.chars == 60 and it.num_docs == 4
    assert "chars/s" in capsys.readouterr().out


def test_tok_eval_offline_note(base_dir, monkeypatch, capsys):
    save_small_tokenizer(base_dir)

    def offline(name, timeout_s):
        return None, "ConnectionError: no network"

    monkeypatch.setattr(tok_eval, "load_baseline", offline)
    tok_eval.main(["--val-chars", "0", "--no-wandb"])
    out = capsys.readouterr().out
    assert (
        "gpt2 comparison skipped" in out and "gpt4 comparison skipped" in out and "network" in out
    )
    section = (base_dir / "report" / "local" / "tok_eval.md").read_text()
    assert "| math |" in section and "comparison skipped" in section and "ours vs" not in section


def test_tok_eval_with_baselines(base_dir, monkeypatch, capsys):
    tok = save_small_tokenizer(base_dir)
    byte_level = tiktoken.Encoding(
        "bytes",
        pat_str=SPLIT_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={},
    )
    monkeypatch.setattr(tok_eval, "load_baseline", lambda name, timeout_s: (byte_level, None))
    tok_eval.main(["--val-chars", "0", "--run", "evalrun", "--no-wandb"])
    section = (base_dir / "report" / "evalrun" / "tok_eval.md").read_text()
    assert (
        "ours vs gpt2" in section
        and "ours vs gpt4" in section
        and "comparison skipped" not in section
    )
    rows = read_jsonl(base_dir / "runs" / "evalrun" / "tok_eval.jsonl")
    m = next(r for r in rows if "bytes_per_token/prose" in r)
    assert m["gpt2/bytes_per_token/prose"] == pytest.approx(
        1.0
    )  # byte-level: exactly 1 byte per token
    prose = tok_eval.SAMPLES["prose"]
    assert m["bytes_per_token/prose"] == pytest.approx(len(prose.encode()) / len(tok.encode(prose)))
    assert m["bytes_per_token/prose"] > 1.0


def test_tok_eval_without_tokenizer_says_what_to_run(base_dir):
    with pytest.raises(SystemExit, match="scripts.tok_train"):
        tok_eval.main(["--no-wandb"])


def test_max_digits_sets_the_number_chunking(base_dir):
    # synthetic corpus: numbers up to a few hundred; with 3-digit chunks "120" can become one token
    for digits, max_tokens_for_120 in ((3, 1), (2, 2)):
        tok_train.main(
            [
                "--source",
                "synthetic",
                "--vocab-size",
                "1500",
                "--max-chars",
                "400000",
                "--max-digits",
                str(digits),
                "--no-wandb",
            ]
        )
        tok = get_tokenizer()
        assert rf"\p{{N}}{{1,{digits}}}" in tok.pattern
        pieces = [tok.decode([i]) for i in tok.encode("A) 120 apples")]
        assert len([p for p in pieces if p.strip().isdigit()]) == max_tokens_for_120, pieces
    with pytest.raises(SystemExit):
        tok_train.main(["--max-digits", "4"])
