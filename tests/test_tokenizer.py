"""Tokenizer: round-trips, specials never parsed from text, chat masks, save/load, training."""

import collections
import json

import numpy as np
import pytest
import regex
import tiktoken
import tiktoken.load
import torch

from nanochat.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    Tokenizer,
    get_token_bytes,
    get_tokenizer,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "A train travels 120 km in 2 hours; what is its speed? Answer: 60 km/h.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))\n",
    "Café, naïve, façade — déjà vu. 日本語のテキスト。 Привет, мир!",
    "emoji: 😀👍🏽 👨‍👩‍👧 and spaces:    \t\t  end",
    "aaaaaa bbbb aaaaaa 1234567890 3.14159",
]

ROUND_TRIP = CORPUS + [
    "",
    " ",
    "\n",
    "\n\n\n",
    "   leading and trailing   ",
    "\t\ttabs\r\nwindows",
    "ñ",
    "🤖",
    "👨‍👩‍👧‍👦",
    "mixed 中文 and English 😀 \u200b zero width",
    "\x00\x01 control \x7f",
    "<|bos|>",
    "<|user_start|>hello<|user_end|>",
    "<|not_special|>",
    "\ud7ff\ue000",
]


def reference_ranks(texts, vocab_size, pattern=SPLIT_PATTERN):
    """Tiny pure-Python BPE trainer (same semantics as rustbpe): weighted chunk pairs, highest count
    wins, ties to the smallest pair, merged left to right. Only for building test vocabularies."""
    chunks = collections.Counter(c for t in texts for c in regex.findall(pattern, t))
    words = {tuple(c.encode("utf-8")): n for c, n in chunks.items()}
    vocab = {i: bytes([i]) for i in range(256)}
    for new_id in range(256, vocab_size):
        pairs = collections.Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged
    return {b: i for i, b in vocab.items()}


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})


@pytest.fixture(scope="module")
def bpe_tok():
    return Tokenizer(SPLIT_PATTERN, reference_ranks(CORPUS, 400))


# ---------------------------------------------------------------------- vocabulary and encoding
def test_specials_follow_merges(byte_tok, bpe_tok):
    for tok in (byte_tok, bpe_tok):
        n = len(tok.get_mergeable_ranks())
        assert tok.get_vocab_size() == n + len(SPECIAL_TOKENS)
        assert tok.get_special_tokens() == SPECIAL_TOKENS
        assert [tok.encode_special(s) for s in SPECIAL_TOKENS] == list(
            range(n, n + len(SPECIAL_TOKENS))
        )
        assert tok.get_bos_token_id() == n
    assert bpe_tok.get_vocab_size() == 400 + len(SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="unknown special token"):
        byte_tok.encode_special("<|eos|>")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(byte_tok, bpe_tok, text):
    for tok in (byte_tok, bpe_tok):
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i < len(tok.get_mergeable_ranks()) for i in ids)  # never a special id
    assert len(byte_tok.encode(text)) == len(text.encode("utf-8"))


def test_merges_compress(byte_tok, bpe_tok):
    text = CORPUS[0]
    assert len(bpe_tok.encode(text)) < len(byte_tok.encode(text)) / 2
    assert bpe_tok.id_to_token(bpe_tok.encode("the")[0]) in ("t", "th", "the")


@pytest.mark.parametrize("name", SPECIAL_TOKENS)
def test_special_text_is_never_parsed(bpe_tok, name):
    special_id = bpe_tok.encode_special(name)
    for text in (name, f"hello {name} world", name * 3):
        ids = bpe_tok.encode(text)
        assert special_id not in ids
        assert all(i < len(bpe_tok.get_mergeable_ranks()) for i in ids)
        assert bpe_tok.decode(ids) == text
    assert bpe_tok.encode([name])[0] == bpe_tok.encode(name)  # batch path too
    # and a user message containing it renders as text inside the user turn
    ids, _ = bpe_tok.render_conversation(
        {"messages": [{"role": "user", "content": name}, {"role": "assistant", "content": "ok"}]}
    )
    assert ids.count(special_id) == (
        1
        if name
        in ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>")
        else 0
    )


def test_encode_prepend_append_and_batch(bpe_tok):
    bos = bpe_tok.get_bos_token_id()
    end = bpe_tok.encode_special("<|assistant_end|>")
    ids = bpe_tok.encode("hello", prepend="<|bos|>", append=end)
    assert ids[0] == bos and ids[-1] == end and bpe_tok.decode(ids[1:-1]) == "hello"
    batch = bpe_tok.encode(["a b", "", "c"], prepend=bos)
    assert batch == [[bos] + bpe_tok.encode("a b"), [bos], [bos] + bpe_tok.encode("c")]
    assert bpe_tok("a b") == bpe_tok.encode("a b")
    with pytest.raises(ValueError, match="special token"):
        bpe_tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match="prepend/append"):
        bpe_tok.encode("x", append=10**9)
    with pytest.raises(TypeError, match="item 1"):
        bpe_tok.encode(["ok", 3])
    with pytest.raises(TypeError):
        bpe_tok.encode(b"bytes")
    with pytest.raises(ValueError, match="cannot decode id"):
        bpe_tok.decode([10**9])


def test_encode_array_equals_encode(bpe_tok):
    """The loader's int32 path gives encode()'s ids, special-token text included (plain text)."""
    bos = bpe_tok.get_bos_token_id()
    for text in ("hello world, 12345 tokens", "", "a <|bos|> b <|assistant_end|>", "Ünï 😀\n\n"):
        arr = bpe_tok.encode_array(text, prepend="<|bos|>")
        assert arr.dtype == np.int32 and arr.tolist() == bpe_tok.encode(text, prepend=bos)
        assert bpe_tok.encode_array(text).tolist() == bpe_tok.encode(text)


def test_bad_ranks_rejected():
    full = {bytes([i]): i for i in range(256)}
    with pytest.raises(ValueError, match="single bytes"):
        Tokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(255)})
    with pytest.raises(ValueError, match="0..256"):
        Tokenizer(SPLIT_PATTERN, {**full, b"ab": 300})
    with pytest.raises(ValueError, match="twice"):
        Tokenizer(SPLIT_PATTERN, list(full.items()) + [(b"a", 256)])
    with pytest.raises(ValueError, match="missing"):
        Tokenizer(SPLIT_PATTERN, full, {"<|bos|>": 256})
    # rustbpe hands back a list of (bytes, rank) pairs: accepted as is
    assert Tokenizer(SPLIT_PATTERN, list(full.items())).get_vocab_size() == 265


# ---------------------------------------------------------------------- chat rendering
def two_turn():
    return {
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "It is 6."},
        ],
        "extra": "ignored",
    }


def test_render_two_turn_exact(bpe_tok):
    t = bpe_tok
    S = t.encode_special
    ids, mask = t.render_conversation(two_turn())
    e = t.encode
    expected = (
        [S("<|bos|>"), S("<|user_start|>")]
        + e("What is 2+2?")
        + [S("<|user_end|>"), S("<|assistant_start|>")]
        + e("4")
        + [S("<|assistant_end|>"), S("<|user_start|>")]
        + e("And 3+3?")
        + [S("<|user_end|>"), S("<|assistant_start|>")]
        + e("It is 6.")
        + [S("<|assistant_end|>")]
    )
    assert ids == expected
    assert len(mask) == len(ids)
    # mask positions by hand: first answer "4" (+ end), second answer "It is 6." (+ end)
    a1 = 2 + len(e("What is 2+2?")) + 2
    a2 = a1 + len(e("4")) + 1 + 1 + len(e("And 3+3?")) + 2
    ones = list(range(a1, a1 + len(e("4")) + 1)) + list(range(a2, a2 + len(e("It is 6.")) + 1))
    assert [i for i, m in enumerate(mask) if m] == ones
    assert ids[ones[-1]] == S("<|assistant_end|>") and mask[-1] == 1
    # exactly what the assistant says, decoded back
    assert (
        t.decode([i for i, m in zip(ids, mask) if m])
        == "4<|assistant_end|>It is 6.<|assistant_end|>"
    )


def test_render_byte_level_positions(byte_tok):
    ids, mask = byte_tok.render_conversation(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    )
    # bos user_start h i user_end assistant_start y o assistant_end
    assert ids == [256, 257, ord("h"), ord("i"), 258, 259, ord("y"), ord("o"), 260]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_render_system_merged_and_tool_parts(bpe_tok):
    t = bpe_tok
    S = t.encode_special
    conv = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Compute 12*7"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me compute. "},
                    {"type": "python", "text": "12*7"},
                    {"type": "python_output", "text": "84"},
                    {"type": "text", "text": " The answer is 84."},
                ],
            },
        ]
    }
    ids, mask = t.render_conversation(conv)
    merged = {
        "messages": [{"role": "user", "content": "Be terse.\n\nCompute 12*7"}, conv["messages"][2]]
    }
    assert (ids, mask) == t.render_conversation(merged)
    e = t.encode
    prefix = (
        [S("<|bos|>"), S("<|user_start|>")]
        + e("Be terse.\n\nCompute 12*7")
        + [S("<|user_end|>"), S("<|assistant_start|>")]
    )
    body = [
        (e("Let me compute. "), 1),
        ([S("<|python_start|>")] + e("12*7") + [S("<|python_end|>")], 1),
        ([S("<|output_start|>")] + e("84") + [S("<|output_end|>")], 0),
        (e(" The answer is 84."), 1),
        ([S("<|assistant_end|>")], 1),
    ]
    assert ids == prefix + [i for seg, _ in body for i in seg]
    assert mask == [0] * len(prefix) + [m for seg, m in body for _ in seg]
    assert not any(
        "system" in name for name in SPECIAL_TOKENS
    )  # no system token: merged into the user turn


def test_render_truncates(bpe_tok):
    ids, mask = bpe_tok.render_conversation(two_turn())
    short_ids, short_mask = bpe_tok.render_conversation(two_turn(), max_tokens=7)
    assert short_ids == ids[:7] and short_mask == mask[:7]
    with pytest.raises(ValueError, match="max_tokens"):
        bpe_tok.render_conversation(two_turn(), max_tokens=0)


def test_render_for_completion(bpe_tok):
    t = bpe_tok
    conv = two_turn()
    prompt = t.render_for_completion(conv)
    full, mask = t.render_conversation(conv)
    last_answer = t.encode("It is 6.") + [t.encode_special("<|assistant_end|>")]
    assert prompt == full[: len(full) - len(last_answer)]
    assert prompt[-1] == t.encode_special("<|assistant_start|>")
    assert sum(mask[len(prompt) :]) == len(last_answer)
    single = {
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"},
        ]
    }
    S = t.encode_special
    assert t.render_for_completion(single) == (
        [S("<|bos|>"), S("<|user_start|>")]
        + t.encode("sys\n\nq")
        + [S("<|user_end|>"), S("<|assistant_start|>")]
    )
    with pytest.raises(ValueError, match="end with the assistant"):
        t.render_for_completion({"messages": [{"role": "user", "content": "q"}]})


BAD_CONVERSATIONS = {
    "not a dict": ["user", "hi"],
    "no messages key": {"msgs": []},
    "empty messages": {"messages": []},
    "message not a dict": {"messages": ["hello"]},
    "unknown role": {"messages": [{"role": "bot", "content": "hi"}]},
    "starts with assistant": {"messages": [{"role": "assistant", "content": "hi"}]},
    "two users in a row": {
        "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    },
    "system not first": {
        "messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]
    },
    "system alone": {"messages": [{"role": "system", "content": "s"}]},
    "empty user content": {
        "messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "x"}]
    },
    "empty assistant content": {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]
    },
    "empty parts list": {
        "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": []}]
    },
    "bad part type": {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": [{"type": "image", "text": "x"}]},
        ]
    },
    "content not str": {"messages": [{"role": "user", "content": 42}]},
    "missing content": {"messages": [{"role": "user"}]},
    "python part in user": {
        "messages": [{"role": "user", "content": [{"type": "python", "text": "1"}]}]
    },
}


@pytest.mark.parametrize("case", list(BAD_CONVERSATIONS))
def test_malformed_conversations_raise(bpe_tok, case):
    with pytest.raises(ValueError) as info:
        bpe_tok.render_conversation(BAD_CONVERSATIONS[case])
    assert len(str(info.value)) > 15  # a message a user can act on, not a bare assert
    if case not in ("not a dict",):
        with pytest.raises(ValueError):
            bpe_tok.render_for_completion(BAD_CONVERSATIONS[case])


# ---------------------------------------------------------------------- save / load
def test_save_load_identical(bpe_tok, tmp_path, monkeypatch):
    monkeypatch.setenv(
        "TIKTOKEN_CACHE_DIR", ""
    )  # tiktoken would otherwise cache even a local file in /tmp
    d = bpe_tok.save(tmp_path / "tok")
    assert {p.name for p in d.iterdir()} == {
        "tokenizer.tiktoken",
        "tokenizer.json",
        "token_bytes.pt",
    }
    loaded = Tokenizer.load(d)
    assert loaded.get_vocab_size() == bpe_tok.get_vocab_size()
    assert loaded.get_mergeable_ranks() == bpe_tok.get_mergeable_ranks()
    assert loaded.special_tokens == bpe_tok.special_tokens and loaded.get_pattern() == SPLIT_PATTERN
    for text in ROUND_TRIP:
        assert loaded.encode(text) == bpe_tok.encode(text)
    assert loaded.render_conversation(two_turn()) == bpe_tok.render_conversation(two_turn())
    # the ranks file is tiktoken's own format
    assert (
        tiktoken.load.load_tiktoken_bpe(str(d / "tokenizer.tiktoken"))
        == bpe_tok.get_mergeable_ranks()
    )
    # saving again over an existing dir works and leaves no temp files
    bpe_tok.save(d)
    assert not [p for p in d.iterdir() if p.name.startswith(".")]


def test_load_detects_damage(bpe_tok, tmp_path):
    d = bpe_tok.save(tmp_path / "tok")
    ranks = d / "tokenizer.tiktoken"
    ranks.write_bytes(ranks.read_bytes() + b"Zm9v 999\n")
    with pytest.raises(ValueError, match="does not match"):
        Tokenizer.load(d)
    bpe_tok.save(d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(d)
    (d / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="scripts.tok_train"):
        Tokenizer.load(d)


def test_get_tokenizer_and_token_bytes(bpe_tok, base_dir):
    with pytest.raises(FileNotFoundError, match="python -m scripts.tok_train"):
        get_tokenizer()
    bpe_tok.save(base_dir / "tokenizer")
    tok = get_tokenizer()
    assert tok.encode(CORPUS[0]) == bpe_tok.encode(CORPUS[0])
    tb = get_token_bytes("cpu")
    assert tb.shape == (tok.get_vocab_size(),) and tb.dtype == torch.int32
    assert tb[:256].tolist() == [1] * 256
    assert tb[tok.get_bos_token_id() :].tolist() == [0] * len(SPECIAL_TOKENS)
    for tid in range(tok.get_vocab_size() - len(SPECIAL_TOKENS)):
        assert tb[tid] == len(tok.enc.decode_single_token_bytes(tid))
    # bytes of a text == sum of token_bytes over its ids (what bits-per-byte relies on)
    text = CORPUS[3]
    assert int(tb[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    # a dir without token_bytes.pt still works (derived from the ranks)
    (base_dir / "tokenizer" / "token_bytes.pt").unlink()
    assert torch.equal(get_token_bytes(), tb)
    meta = json.loads((base_dir / "tokenizer" / "tokenizer.json").read_text())
    assert meta["vocab_size"] == tok.get_vocab_size() and meta["num_merges"] == 400 - 256


# ---------------------------------------------------------------------- training with rustbpe
def test_train_too_small_vocab():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train_from_iterator(iter(CORPUS), 260)


def test_train_from_iterator_vocab_and_merges():
    vocab_size = 300
    tok = Tokenizer.train_from_iterator(iter(CORPUS * 3), vocab_size)
    assert tok.get_vocab_size() == vocab_size
    assert tok.get_bos_token_id() == vocab_size - len(SPECIAL_TOKENS)
    # same merges as the reference trainer
    assert tok.get_mergeable_ranks() == reference_ranks(
        CORPUS * 3, vocab_size - len(SPECIAL_TOKENS)
    )
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|bos|>") != [tok.get_bos_token_id()]


def test_train_accepts_generator_and_saves(tmp_path):
    def gen():
        for i in range(200):
            yield f"document {i}: " + CORPUS[i % len(CORPUS)]

    tok = Tokenizer.train_from_iterator(gen(), 512)
    assert tok.get_vocab_size() == 512
    loaded = Tokenizer.load(tok.save(tmp_path / "t"))
    assert loaded.encode(CORPUS[2]) == tok.encode(CORPUS[2])
