"""Benchmark BPE training speed: our rustbpe vs Hugging Face `tokenizers` vs the PyPI `rustbpe`.

    .venv/bin/python -m scripts.bench_tokenizer                 # default corpus, 16 MB, vocab 8192
    .venv/bin/python -m scripts.bench_tokenizer --corpus my.txt --mb 32 --repeats 5

Corpus (deterministic, real text found on the machine) unless --corpus is given: Vim's help files
(/usr/share/vim/vim*/doc/*.txt), Perl's pod documentation (/usr/share/perl/**/*.pod), then the
Python standard library's .py files, each group in sorted path order, concatenated and cut at
--mb megabytes; cached under .bench/. The text is cut into documents of about --doc-chars
characters at line ends, and every contender trains from the same in-memory list iterator.

Contenders, each in its own subprocess (the PyPI package has the same import name as ours):
  ours        this repo's rustbpe (installed in the venv by `uv sync`)
  ours-regex  ours with the same pattern wrapped in a group, which bypasses the hand-written GPT-4
              splitter and runs the generic fancy-regex engine (shows what the fast path buys)
  hf          tokenizers' BpeTrainer, Split(pattern) + ByteLevel pre-tokenizers (byte-level BPE)
  pypi        the PyPI `rustbpe`, installed at bench time into .bench/pypi_rustbpe (gitignored;
              never a dependency of the product) with `uv pip install --target`
Rounds are interleaved (ours, hf, pypi, ours, hf, ...) and the best time per contender is kept,
because the machine is shared. Timing covers train_from_iterator only.
"""

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / ".bench"
# GPT-4's split pattern, nanochat.tokenizer.split_pattern(3), spelled out: the worker subprocesses
# run from outside the repo and cannot import nanochat
GPT4 = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
CONTENDERS = ["ours", "ours-regex", "hf", "pypi"]


# ------------------------------------------------------------------------------------------------
# Corpus


def default_sources():
    groups = [
        sorted(glob.glob("/usr/share/vim/vim*/doc/*.txt")),
        sorted(glob.glob("/usr/share/perl/**/*.pod", recursive=True)),
        sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")),
    ]
    return [p for g in groups for p in g]


def build_default_corpus(mb):
    out = BENCH_DIR / f"corpus_default_{mb}mb.txt"
    if out.exists():
        return out
    limit = int(mb * 1_000_000)
    parts, size = [], 0
    for path in default_sources():
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        data = text.encode("utf-8")
        parts.append(data[: limit - size])
        size += len(parts[-1])
        if size >= limit:
            break
    if size < limit:
        sys.exit(
            f"only {size / 1e6:.1f} MB of text found for the default corpus; "
            "pass --corpus FILE or a smaller --mb"
        )
    BENCH_DIR.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(b"".join(parts))
    tmp.replace(out)
    return out


def load_docs(path, doc_chars):
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    docs, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        n += len(line)
        if n >= doc_chars:
            docs.append("".join(cur))
            cur, n = [], 0
    if cur:
        docs.append("".join(cur))
    return docs


# ------------------------------------------------------------------------------------------------
# Workers (one contender per process)


class Timer:
    """Wall seconds and CPU seconds of the whole process (all threads) over a with-block."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def train_ours(docs, vocab_size, pattern):
    import rustbpe

    assert ".bench" not in rustbpe.__file__, rustbpe.__file__
    tok = rustbpe.Tokenizer()
    with Timer() as t:
        tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
    return t, tok.get_mergeable_ranks()


def train_pypi(docs, vocab_size, pattern, pypi_dir):
    sys.path.insert(0, str(pypi_dir))
    import rustbpe

    assert str(pypi_dir) in rustbpe.__file__, f"expected the PyPI rustbpe, got {rustbpe.__file__}"
    tok = rustbpe.Tokenizer()
    with Timer() as t:
        tok.train_from_iterator(iter(docs), vocab_size, pattern=pattern)
    return t, tok.get_mergeable_ranks()


def train_hf(docs, vocab_size, pattern):
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(BPE(byte_fallback=False, unk_token=None, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(pattern=Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        min_frequency=0,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    with Timer() as t:
        tok.train_from_iterator(iter(docs), trainer=trainer, length=len(docs))
    return t, None


def worker(args):
    docs = load_docs(args.corpus, args.doc_chars)
    if args.worker == "ours":
        t, ranks = train_ours(docs, args.vocab_size, args.pattern)
    elif args.worker == "ours-regex":
        t, ranks = train_ours(docs, args.vocab_size, "(?:" + args.pattern + ")")
    elif args.worker == "pypi":
        t, ranks = train_pypi(docs, args.vocab_size, args.pattern, args.pypi_dir)
    elif args.worker == "hf":
        t, ranks = train_hf(docs, args.vocab_size, args.pattern)
    else:
        sys.exit(f"unknown --worker {args.worker!r}")
    digest = hashlib.sha256(repr(ranks).encode()).hexdigest()[:16] if ranks is not None else None
    print(
        json.dumps(
            {
                "seconds": t.wall,
                "cpu": t.cpu,
                "ranks_sha": digest,
                "vocab": len(ranks) if ranks else args.vocab_size,
            }
        )
    )


# ------------------------------------------------------------------------------------------------
# Driver


def ensure_pypi(pypi_dir):
    if (Path(pypi_dir) / "rustbpe").exists():
        return
    print(f"installing the PyPI rustbpe into {pypi_dir} (bench only) ...", flush=True)
    cmds = [
        ["uv", "pip", "install", "--python", sys.executable, "--target", str(pypi_dir), "rustbpe"],
        [sys.executable, "-m", "pip", "install", "--target", str(pypi_dir), "rustbpe"],
    ]
    for cmd in cmds:
        try:
            if subprocess.run(cmd, cwd=BENCH_DIR.parent, capture_output=True).returncode == 0:
                return
        except FileNotFoundError:
            continue
    sys.exit(
        f"could not install the PyPI rustbpe into {pypi_dir}; "
        "install it there by hand or drop 'pypi' from --contenders"
    )


def run_worker(name, args):
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--corpus",
        str(args.corpus),
        "--vocab-size",
        str(args.vocab_size),
        "--doc-chars",
        str(args.doc_chars),
        "--pattern",
        args.pattern,
        "--pypi-dir",
        str(args.pypi_dir),
    ]
    # Run outside the repo root so the PyPI worker cannot pick up anything but its own directory.
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=BENCH_DIR)
    if res.returncode != 0:
        sys.exit(f"{name} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(
        description="BPE training speed: rustbpe vs HF tokenizers vs PyPI rustbpe"
    )
    parser.add_argument(
        "--corpus",
        type=str,
        default=None,
        help="UTF-8 text file (default: build one from text on this machine)",
    )
    parser.add_argument(
        "--mb", type=float, default=16, help="size of the default corpus in MB (>= 10 recommended)"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=8192, help="vocabulary size, bytes included"
    )
    parser.add_argument(
        "--doc-chars",
        type=int,
        default=4000,
        help="cut the corpus into documents of about this many chars",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds; best time is reported"
    )
    parser.add_argument(
        "--contenders", type=str, default=",".join(CONTENDERS), help=f"comma list from {CONTENDERS}"
    )
    parser.add_argument("--pattern", type=str, default=GPT4, help="split regex (default: GPT-4)")
    parser.add_argument(
        "--pypi-dir",
        type=str,
        default=str(BENCH_DIR / "pypi_rustbpe"),
        help="where the PyPI rustbpe is installed",
    )
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    bad = [c for c in contenders if c not in CONTENDERS]
    if bad:
        sys.exit(f"--contenders: unknown {bad}; choose from {CONTENDERS}")
    BENCH_DIR.mkdir(exist_ok=True)
    if args.corpus is None:
        args.corpus = build_default_corpus(args.mb)
    args.corpus = Path(args.corpus).resolve()
    if not args.corpus.is_file():
        sys.exit(f"--corpus {args.corpus}: no such file")
    args.pypi_dir = Path(args.pypi_dir).resolve()
    if "pypi" in contenders:
        ensure_pypi(args.pypi_dir)

    mb = args.corpus.stat().st_size / 1e6
    n_docs = len(load_docs(args.corpus, args.doc_chars))
    print(
        f"corpus: {args.corpus} ({mb:.1f} MB, {n_docs} docs), vocab {args.vocab_size}, "
        f"{os.cpu_count()} cpus, best of {args.repeats}",
        flush=True,
    )
    results = {c: [] for c in contenders}
    for r in range(args.repeats):
        for c in contenders:
            out = run_worker(c, args)
            results[c].append(out)
            print(
                f"  round {r + 1}: {c:<10} {out['seconds']:7.3f} s wall {out['cpu']:7.3f} s cpu "
                f"{mb / out['seconds']:7.1f} MB/s",
                flush=True,
            )

    best = {c: min(o["seconds"] for o in results[c]) for c in contenders}
    cpu = {c: min(o["cpu"] for o in results[c]) for c in contenders}
    print(f"\n{'contender':<12}{'wall s':>9}{'MB/s':>9}{'cpu s':>9}{'ours faster':>13}")
    for c in contenders:
        ratio = f"{best[c] / best['ours']:.2f}x" if "ours" in best else ""
        print(f"{c:<12}{best[c]:9.3f}{mb / best[c]:9.1f}{cpu[c]:9.3f}{ratio:>13}")
    print(
        "(wall: best round; cpu: CPU seconds of the training process, all threads; MB/s from wall)"
    )
    if "ours" in best:
        for c in ["pypi", "hf", "ours-regex"]:
            if c in best:
                print(f"speed ours / {c}: {best[c] / best['ours']:.2f}x")
    shas = {c: results[c][0]["ranks_sha"] for c in contenders if results[c][0]["ranks_sha"]}
    if "ours" in shas and "pypi" in shas:
        print("ours vs pypi merges:", "identical" if shas["ours"] == shas["pypi"] else "DIFFERENT")
    if "ours" in shas and "ours-regex" in shas:
        print(
            "fast splitter vs regex engine merges:",
            "identical" if shas["ours"] == shas["ours-regex"] else "DIFFERENT",
        )


if __name__ == "__main__":
    main()
