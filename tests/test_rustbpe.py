"""rustbpe against a pure-Python reference trainer, tiktoken, and bad input.

The reference below is the spec: byte-level BPE over the distinct regex chunks weighted by their
counts; each round counts every consecutive pair (overlaps included), the highest count wins with
ties to the smallest (left, right), the winner becomes id 256 + round and is merged left to right,
non-overlapping, everywhere. It splits with the `regex` module (a third, independent regex engine),
so it also cross-checks rustbpe's hand-written GPT-4 splitter.
"""

import random
from collections import Counter

import pytest
import regex
import tiktoken

import rustbpe

# the exact string the crate's hand-written splitter recognises
GPT4 = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
NANOCHAT = GPT4.replace(r"\p{N}{1,3}", r"\p{N}{1,2}")


def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_merges(texts, vocab_size, pattern=GPT4):
    chunks = Counter(c for t in texts for c in regex.findall(pattern, t) if c)
    words = [[list(c.encode("utf-8")), n] for c, n in chunks.items()]
    merges = []
    for r in range(vocab_size - 256):
        counts = Counter()
        for ids, n in words:
            for p in zip(ids, ids[1:]):
                counts[p] += n
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        for w in words:
            w[0] = merge(w[0], best, 256 + r)
        merges.append(best)
    return merges


def train(texts, vocab_size, **kw):
    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, **kw)
    return tok


def to_tiktoken(tok):
    ranks = dict(tok.get_mergeable_ranks())
    assert len(ranks) == tok.get_vocab_size(), "token bytes must be unique"
    return tiktoken.Encoding(
        name="rustbpe-test", pat_str=tok.get_pattern(), mergeable_ranks=ranks, special_tokens={}
    )


def ascii_prose(seed, n_words=1500):
    rng = random.Random(seed)
    vocab = (
        "the of and to in is it that was he for on are as with his they at be this from have or "
        "by one had not but what all were when we there can an your which their said if do will "
        "each about how up out them then she many some so these would other into has more her two "
        "like him see time could no make than first been its who now people my made over did down "
        "only way find use may water long little very after words called just where most know"
    ).split()
    out = []
    for _ in range(n_words):
        w = rng.choice(vocab)
        r = rng.random()
        if r < 0.05:
            w = w.capitalize() + rng.choice([".", ",", "!", "?", "'s", "'ll", "'VE", ";"])
        elif r < 0.08:
            w = str(rng.randint(0, 10 ** rng.randint(1, 9)))
        out.append(w)
        out.append(rng.choice([" ", " ", " ", " ", "\n", "  ", "\t", "\n\n"]))
    return "".join(out)


UNICODE = [
    "Ünïcödé façade naïve café — “quotes” and ‘apostrophes’ – dashes…",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "emoji 🚀🔥🚀🔥 family 👨‍👩‍👧 flags 🇫🇷🇩🇪 and more 🚀",
    "Ελληνικά και русский текст, עברית ועربية مع ١٢٣٤٥ أرقام",
    "combining e\u0301\u0301 marks, ſ long s, Kelvin \u212a, nbsp\u00a0here\u3000there",
]
DIGITS = ["1234567890 12 123 1234 12345 3.14159 2024-01-31 007 ٣٤٥ ½ ⅔ Ⅻ " * 3]
WHITESPACE = [
    "a  b   c    d\n\n\ne\r\n\r\nf \t\tg\n   \n  h   ",
    "   leading",
    "trailing   ",
    "\n\n\n",
    " \n \n ",
]
REPEATS = [
    "aaaaaa",
    "aaaaaaa aaaaaaaa aaa aa a",
    "abababab ababab",
    "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
    "xyxyxyxyx",
]
CODE = [
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\nclass A(B):\n\tpass\r\n" * 2,
    "if (a && b) { x += 1; } else { y -= 2; } /* c */ // d\n",
]


@pytest.mark.parametrize(
    "name,texts,vocab_size",
    [
        ("ascii", [ascii_prose(0), ascii_prose(1)], 256 + 300),
        ("unicode", UNICODE * 3, 256 + 250),
        ("digits", DIGITS, 256 + 60),
        ("whitespace", WHITESPACE * 4, 256 + 40),
        ("repeats", REPEATS, 256 + 40),
        ("code", CODE, 256 + 120),
        (
            "mixed",
            [ascii_prose(2, 400)] + UNICODE + DIGITS + WHITESPACE + REPEATS + CODE,
            256 + 400,
        ),
    ],
)
def test_merges_match_reference(name, texts, vocab_size):
    tok = train(texts, vocab_size)
    ref = reference_merges(texts, vocab_size)
    assert tok.get_merges() == ref
    assert tok.get_vocab_size() == 256 + len(ref)


def test_ties_go_to_smallest_pair():
    # Every pair occurs once: merges come in ascending (left, right) order.
    texts = ["cd", "ab", "ef", "xb"]
    tok = train(texts, 256 + 10)
    assert tok.get_merges() == [(97, 98), (99, 100), (101, 102), (120, 98)]
    assert tok.get_merges() == reference_merges(texts, 256 + 10)


def test_overlapping_pairs_are_counted_weighted():
    # "aaa" holds two overlapping (a,a) pairs; weight 3 -> 6, beats "bc" x 5.
    texts = ["aaa"] * 3 + ["bc"] * 5
    tok = train(texts, 257)
    assert tok.get_merges() == [(97, 97)] == reference_merges(texts, 257)


def test_early_stop_when_no_pair_left():
    tok = train(["abc", "abc"], 1000)
    assert tok.get_merges() == [(97, 98), (256, 99)]
    assert tok.get_vocab_size() == 258
    ranks = tok.get_mergeable_ranks()
    assert [r for _, r in ranks] == list(range(258))
    assert ranks[257] == (b"abc", 257)


@pytest.mark.parametrize("pattern", [NANOCHAT, r"\S+|\s+", r"[a-z]+|[^a-z]"])
def test_custom_patterns_match_reference(pattern):
    texts = [ascii_prose(3, 600)] + DIGITS + UNICODE[:2]
    tok = train(texts, 256 + 150, pattern=pattern)
    assert tok.get_pattern() == pattern
    assert tok.get_merges() == reference_merges(texts, 256 + 150, pattern)


def test_fast_splitter_equals_regex_engine():
    # the GPT-4 pattern wrapped in a group is the same regex, but bypasses the hand-written
    # splitter
    texts = [ascii_prose(4, 800)] + UNICODE + DIGITS + WHITESPACE + REPEATS + CODE
    fast = train(texts, 256 + 300)
    slow = train(texts, 256 + 300, pattern="(?:" + GPT4 + ")")
    assert fast.get_merges() == slow.get_merges()
    for t in texts:
        assert fast.encode(t) == slow.encode(t)


def test_buffer_size_does_not_change_result():
    texts = [ascii_prose(5, 300) for _ in range(3)] + UNICODE + REPEATS
    a = train(texts, 256 + 200, buffer_size=1)
    b = train(texts, 256 + 200, buffer_size=3)
    c = train(texts, 256 + 200)
    assert a.get_merges() == b.get_merges() == c.get_merges()


def test_defaults_and_untrained():
    tok = rustbpe.Tokenizer()
    assert tok.get_pattern() == GPT4 == rustbpe.GPT4_PATTERN
    assert tok.get_vocab_size() == 256
    assert tok.encode("hi!") == [104, 105, 33]
    ranks = tok.get_mergeable_ranks()
    assert ranks[0] == (b"\x00", 0) and ranks[255] == (b"\xff", 255)


def test_tiktoken_encodes_identically():
    train_texts = [ascii_prose(6), ascii_prose(7)] + UNICODE + DIGITS + WHITESPACE + REPEATS + CODE
    tok = train(train_texts, 256 + 500)
    enc = to_tiktoken(tok)
    probe = train_texts + [
        ascii_prose(99, 300),  # unseen text
        "Hello, World! It's a TEST of unseen Tokens: 9876543210 🚀",
        "",
        " ",
        "\n",
        "a",
        "日本",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "<|bos|> special tokens are plain text here",
    ]
    for t in probe:
        ids = tok.encode(t)
        assert ids == enc.encode_ordinary(t), t
        assert enc.decode(ids) == t
    assert tok.batch_encode(probe) == [enc.encode_ordinary(t) for t in probe]
    assert tok.batch_encode([]) == []


def test_tiktoken_identical_with_custom_pattern():
    texts = [ascii_prose(8, 800)] + UNICODE
    tok = train(texts, 256 + 200, pattern=NANOCHAT)
    enc = to_tiktoken(tok)
    for t in texts + ["12345678 digits in pairs"]:
        assert tok.encode(t) == enc.encode_ordinary(t)


# ------------------------------------------------------------------------------------------------
# Bad input: clear Python exceptions, never a crash; the tokenizer stays usable.


def test_vocab_size_too_small():
    with pytest.raises(ValueError, match="vocab_size must be >= 256"):
        rustbpe.Tokenizer().train_from_iterator(iter(["abc"]), 255)


def test_non_string_item():
    with pytest.raises(TypeError, match=r"item 1 is int, expected str"):
        rustbpe.Tokenizer().train_from_iterator(iter(["abc", 3, "def"]), 300)
    with pytest.raises(TypeError, match="expected str"):
        rustbpe.Tokenizer().train_from_iterator([b"bytes"], 300)


def test_not_iterable():
    with pytest.raises(TypeError, match="expected an iterable of str"):
        rustbpe.Tokenizer().train_from_iterator(42, 300)


def test_invalid_pattern():
    with pytest.raises(ValueError, match="invalid split pattern"):
        rustbpe.Tokenizer().train_from_iterator(iter(["abc"]), 300, pattern="(unclosed")


def test_bad_buffer_size():
    with pytest.raises(ValueError, match="buffer_size"):
        rustbpe.Tokenizer().train_from_iterator(iter(["abc"]), 300, buffer_size=0)


def test_raising_iterator_propagates_and_keeps_state():
    tok = train(["hello hello hello"], 260)
    before = tok.get_merges()

    def gen():
        yield "some text"
        raise RuntimeError("boom from the data loader")

    with pytest.raises(RuntimeError, match="boom from the data loader"):
        tok.train_from_iterator(gen(), 300)
    assert tok.get_merges() == before
    assert tok.encode("hello") == to_tiktoken(tok).encode_ordinary("hello")


def test_encode_bad_input():
    tok = rustbpe.Tokenizer()
    with pytest.raises(TypeError, match="expected str"):
        tok.encode(5)
    with pytest.raises(TypeError, match="item 1 is"):
        tok.batch_encode(["ok", None])


def test_lone_surrogate_is_an_exception():
    with pytest.raises(UnicodeEncodeError):
        rustbpe.Tokenizer().train_from_iterator(iter(["ok", "bad \ud800"]), 300)
