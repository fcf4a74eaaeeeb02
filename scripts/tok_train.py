"""Train the BPE tokenizer on the pretraining text and save it to <base>/tokenizer.

    uv run python -m scripts.tok_train               # 2B chars of the default source, vocab 65536
    uv run python -m scripts.tok_train --source dir --data-dir ./shards --vocab-size 8192 \\
        --max-chars 1e8

Documents are capped at --doc-cap characters so a few huge pages cannot dominate the statistics, and
training stops after --max-chars characters in total. The vocab size includes the special tokens.
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

from nanochat.files import get_base_dir
from nanochat.report import write_section
from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, split_pattern, tokenizer_dir
from nanochat.tracking import add_tracking_args, log_results

NO_TEXT = "[tok_train] error: source {source!r} yielded no text; check --source/--data-dir"
SANITY_TEXT = "Hello world! 12 + 34 = 46. Ünïcödé 日本 😀 <|bos|>\n\tdef f(x): return x"


def count_int(text: str) -> int:
    """argparse type accepting 2000000000, 2e9 or 2_000_000_000."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number like 2e9, got {text!r}") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(value)


def human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class ProgressIterator:
    """Wraps the document stream: enforces the caps, counts what rustbpe took, prints progress."""

    def __init__(self, docs, max_chars: int, doc_cap: int, every_s: float = 10.0):
        self.docs = docs
        self.max_chars = max_chars
        self.doc_cap = doc_cap
        self.every_s = every_s
        self.chars = 0
        self.num_docs = 0
        self.t0 = time.time()
        self.last = self.t0

    def __iter__(self):
        for doc in self.docs:
            if self.chars >= self.max_chars:
                break
            doc = doc[: min(self.doc_cap, self.max_chars - self.chars)]
            if not doc:  # null/empty rows carry no statistics
                continue
            self.chars += len(doc)
            self.num_docs += 1
            now = time.time()
            if now - self.last >= self.every_s:
                self.last = now
                self.report()
            yield doc

    def report(self) -> None:
        elapsed = time.time() - self.t0
        print(
            f"[tok_train] {human(self.chars)} / {human(self.max_chars)} chars "
            f"({100 * self.chars / self.max_chars:.1f}% of --max-chars) | "
            f"{self.num_docs:,} docs | {elapsed:.1f}s | "
            f"{human(self.chars / max(elapsed, 1e-9))} chars/s",
            flush=True,
        )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vocab-size",
        type=count_int,
        default=2**16,
        help="total vocab size including the %d special tokens (default 65536)"
        % len(SPECIAL_TOKENS),
    )
    parser.add_argument(
        "--max-chars",
        type=count_int,
        default=2_000_000_000,
        help="total characters of training text to use (default 2e9)",
    )
    parser.add_argument(
        "--max-digits",
        type=int,
        default=2,
        choices=[1, 2, 3],
        help="digits per pre-token chunk: numbers are split into runs of at most this many "
        "digits before BPE (2: the default; 3: GPT-4's, every number < 1000 can be one token)",
    )
    parser.add_argument(
        "--doc-cap", type=count_int, default=10_000, help="max characters taken from each document"
    )
    parser.add_argument(
        "--source",
        default="auto",
        choices=["auto", "fineweb", "dir", "synthetic"],
        help="pretraining text source (see nanochat.dataset.text_iterator)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="directory of local parquet shards for --source dir"
    )
    parser.add_argument(
        "--buffer-size", type=count_int, default=8192, help="documents rustbpe pulls per batch"
    )
    parser.add_argument(
        "--out-dir",
        default=None,
        help="where to save (default NANOCHAT_TOKENIZER_DIR, else <base>/tokenizer)",
    )
    parser.add_argument(
        "--progress-every", type=float, default=10.0, help="seconds between progress lines"
    )
    add_tracking_args(parser)
    args = parser.parse_args(argv)
    if args.vocab_size < 256 + len(SPECIAL_TOKENS):
        parser.error(
            f"--vocab-size {args.vocab_size} is too small: "
            f"need 256 byte tokens + {len(SPECIAL_TOKENS)} specials"
        )
    return args


def open_text(args):
    """The training documents, the first one already read: a missing or empty source fails here
    with its own message rather than from inside rustbpe."""
    from nanochat.dataset import text_iterator  # imported late so --help works without data deps

    docs = text_iterator(
        split="train",
        source=args.source,
        data_dir=args.data_dir,
        max_chars=args.max_chars,
        doc_cap=args.doc_cap,
    )
    try:
        first = next(docs, None)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        raise SystemExit(f"[tok_train] error: cannot read the training text: {exc}") from None
    if first is None:
        raise SystemExit(NO_TEXT.format(source=args.source))
    return itertools.chain([first], docs)


def check_round_trip(out_dir: Path) -> None:
    """The saved tokenizer reloads and round-trips, and special-token text stays text."""
    loaded = Tokenizer.load(out_dir)
    ids = loaded.encode(SANITY_TEXT)
    if loaded.decode(ids) != SANITY_TEXT or loaded.get_bos_token_id() in ids:
        raise SystemExit(
            f"[tok_train] error: the saved tokenizer in {out_dir} fails the round-trip check"
        )


def section_lines(args, tok, num_merges: int, stream, train_s: float) -> list[str]:
    source = args.source + (f" ({args.data_dir})" if args.data_dir else "")
    chars_per_s = stream.chars / max(train_s, 1e-9)
    return [
        "## Tokenizer training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| vocab size (incl. {len(SPECIAL_TOKENS)} specials) | {tok.get_vocab_size():,} |",
        f"| merges learned | {num_merges:,} |",
        f"| source | {source} |",
        f"| training text | {stream.chars:,} chars in {stream.num_docs:,} docs "
        f"(cap {args.doc_cap:,} chars/doc) |",
        f"| training time | {train_s:.1f} s ({human(chars_per_s)} chars/s) |",
    ]


def main(argv=None):
    args = parse_args(argv)
    out_dir = Path(args.out_dir) if args.out_dir else tokenizer_dir()
    print(
        f"[tok_train] vocab {args.vocab_size:,} | max {args.max_chars:,} chars | "
        f"doc cap {args.doc_cap:,} | "
        f"source {args.source}" + (f" ({args.data_dir})" if args.data_dir else ""),
        flush=True,
    )

    stream = ProgressIterator(open_text(args), args.max_chars, args.doc_cap, args.progress_every)
    t0 = time.time()
    tok = Tokenizer.train_from_iterator(
        iter(stream),
        args.vocab_size,
        pattern=split_pattern(args.max_digits),
        buffer_size=args.buffer_size,
    )
    train_s = time.time() - t0
    stream.report()
    if stream.chars == 0:
        raise SystemExit(NO_TEXT.format(source=args.source))
    num_merges = len(tok.get_mergeable_ranks()) - 256
    # rustbpe stops early only when no pair is left to merge
    if tok.get_vocab_size() < args.vocab_size:
        print(
            f"[tok_train] warning: the corpus ran out of pairs after {num_merges} merges; vocab is "
            f"{tok.get_vocab_size()} instead of {args.vocab_size}. "
            f"Use more text (--max-chars) or a smaller vocab."
        )

    tok.meta = {
        "source": args.source,
        "data_dir": args.data_dir,
        "train_chars": stream.chars,
        "train_docs": stream.num_docs,
        "doc_cap": args.doc_cap,
        "max_chars": args.max_chars,
        "train_seconds": round(train_s, 3),
        "requested_vocab_size": args.vocab_size,
    }
    tok.save(out_dir)
    check_round_trip(out_dir)

    chars_per_s = stream.chars / max(train_s, 1e-9)
    metrics = {
        "vocab_size": tok.get_vocab_size(),
        "num_merges": num_merges,
        "train_chars": stream.chars,
        "train_docs": stream.num_docs,
        "train_seconds": train_s,
        "chars_per_second": chars_per_s,
    }
    log_results(args, "tok_train", metrics)
    lines = section_lines(args, tok, num_merges, stream, train_s)
    write_section(get_base_dir(), args.run, "tokenizer", "\n".join(lines))
    print(
        f"[tok_train] done: vocab {tok.get_vocab_size():,} "
        f"({num_merges:,} merges + {len(SPECIAL_TOKENS)} specials) "
        f"from {stream.chars:,} chars / {stream.num_docs:,} docs in {train_s:.1f}s "
        f"({human(chars_per_s)} chars/s) -> {out_dir}",
        flush=True,
    )


if __name__ == "__main__":
    main()
