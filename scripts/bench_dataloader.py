"""The pretraining data loader, old against new, side by side in one run.

    uv run python -m scripts.bench_dataloader              # builds the corpus and tokenizer once
    uv run python -m scripts.bench_dataloader --batches 200 --blocking-steps 50

The corpus: real text found on this machine (default /usr/share/doc: Debian's package documentation,
changelogs and READMEs, .gz files unpacked; exact duplicates such as the common licence texts kept
once), cut into documents whose lengths follow a log-normal distribution like web text (FineWeb-Edu
averages about 1,000 tokens per document, with a long tail): median --median-chars, spread --sigma,
clamped to [--min-chars, --max-chars]; every document is one contiguous stretch of one file, cut at
a line end. They are shuffled and written as parquet shards (the last one is val) to --corpus-dir,
with a --vocab-size BPE trained on them with rustbpe (--tokenizer-dir). Both are built once and
reused; the printed stats say what the documents look like in tokens.

Measured, at --batch-size x --seq-len rows:
- kept fraction: tokens trained / tokens tokenised (cropped tails count as lost);
- trained tokens per CPU-second of the loader alone (no prefetch, one tokenising thread, the
  process pinned to one core: reading, tokenising, packing, tensors), and the tokenizer's share of
  that time. Tokenising spreads over the loader's threads (tiktoken releases the GIL); the rest
  stays on the producer thread, so with --cores-per-gpu cores the loader makes at most
  rate / (rest + share / cores) (Amdahl), compared with what the GPU consumes;
- the time next_batch() blocks inside a training step, the step simulated by a sleep (the CUDA wait
  of a real step releases the GIL as a sleep does) as long as the GPU's step at d8 scaled by the
  cores a node gives each GPU: one core has to feed 1/--cores-per-gpu of a GPU.

"old" is the packing before issue 24 ("legacy": 32-document look-ahead, the oldest document
cropped, its tail dropped) tokenising inside next_batch; "new" is the "continue" packing with
prefetch 4; "default" is base_train's loader: the old packing (it trained to the lower loss per
FLOP, docs/experiments.md) with prefetch 4. All use today's tokenising path (int32 arrays from
tiktoken). The consumer: d8 (vocab --vocab-size, context --seq-len) on one H100 at --mfu of 989
bf16 TFLOP/s; Lambda's 8x H100 node has 208 vCPUs, 26 per GPU (--cores-per-gpu).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import os
import random
import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nanochat.dataloader import DataLoader
from nanochat.files import get_base_dir
from nanochat.gpt import GPT, config_from_depth
from nanochat.tokenizer import CONFIG_FILE, Tokenizer, split_pattern

H100_BF16_PEAK = 989e12


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("corpus and tokenizer")
    g.add_argument("--text-root", default="/usr/share/doc", help="where the real text is read")
    g.add_argument(
        "--corpus-dir", default=None, help="parquet corpus (default <base>/bench/dataloader_corpus)"
    )
    g.add_argument("--tokenizer-dir", default=None, help="default <base>/bench/dataloader_tok")
    g.add_argument("--corpus-chars", type=float, default=60e6, help="text in the corpus")
    g.add_argument("--median-chars", type=int, default=2600, help="median document length")
    g.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of the lengths")
    g.add_argument("--min-chars", type=int, default=800)
    g.add_argument("--max-chars", type=int, default=200_000)
    g.add_argument("--shards", type=int, default=8, help="parquet files (the last is val)")
    g.add_argument("--vocab-size", type=int, default=65536)
    g.add_argument(
        "--corpus-only",
        action="store_true",
        help="build the corpus and stop (e.g. for bench_pretrain_quality --source dir)",
    )
    g.add_argument("--tokenizer-chars", type=float, default=10e6, help="text the BPE learns from")
    g = p.add_argument_group("measurement")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--seq-len", type=int, default=2048)
    g.add_argument("--batches", type=int, default=120, help="batches for kept fraction and tok/s")
    g.add_argument("--blocking-steps", type=int, default=30, help="simulated steps, after warm-up")
    g.add_argument("--warm-steps", type=int, default=5, help="steps not counted as warm")
    g.add_argument("--depth", type=int, default=8, help="the model whose consumption is compared")
    g.add_argument("--mfu", type=float, default=0.5, help="assumed H100 MFU (0.5 = 50%%)")
    g.add_argument("--cores-per-gpu", type=int, default=26)
    g.add_argument("--cpu", type=int, default=0, help="the core the loader is pinned to")
    return p.parse_args(argv)


# ---------------------------------------------------------------- the corpus
def real_texts(root: Path):
    """Every readable UTF-8 text file under root (sorted, .gz unpacked), each distinct text once."""
    seen = set()
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        if "\x00" in text or path.suffix in (".html", ".htm", ".svg", ".css", ".js"):
            continue
        digest = hashlib.sha1(raw).digest()
        if digest not in seen:
            seen.add(digest)
            yield text


def cut_documents(texts, args, rng: random.Random):
    """Contiguous stretches of each text, of log-normal lengths, cut at a line end."""
    mu = math.log(args.median_chars)
    total = 0
    for text in texts:
        start = 0
        while start < len(text) and total < args.corpus_chars:
            want = int(min(args.max_chars, max(args.min_chars, rng.lognormvariate(mu, args.sigma))))
            end = text.find("\n", start + want)
            end = len(text) if end < 0 else end
            doc = text[start:end].strip()
            start = end + 1
            if len(doc) >= args.min_chars:
                total += len(doc)
                yield doc
        if total >= args.corpus_chars:
            return


def build_corpus(args, corpus_dir: Path) -> None:
    root = Path(args.text_root)
    if not root.is_dir():
        raise SystemExit(f"--text-root {root} is not a directory")
    rng = random.Random(0)
    docs = list(cut_documents(real_texts(root), args, rng))
    if len(docs) < 100 * args.shards:
        raise SystemExit(f"--text-root {root}: only {len(docs)} documents; point it at more text")
    rng.shuffle(docs)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // args.shards)
    for i in range(args.shards):
        table = pa.table({"text": docs[i * per : (i + 1) * per]})
        pq.write_table(table, corpus_dir / f"shard_{i:05d}.parquet", row_group_size=1024)
    chars = sum(map(len, docs))
    print(f"corpus: {len(docs):,} documents, {chars / 1e6:.1f}M chars from {root} -> {corpus_dir}")


def corpus_texts(corpus_dir: Path, max_chars: float):
    total = 0
    for path in sorted(corpus_dir.glob("*.parquet"))[:-1]:
        for text in pq.read_table(path, columns=["text"]).column("text").to_pylist():
            yield text
            total += len(text)
            if total >= max_chars:
                return


def load_or_train_tokenizer(args, corpus_dir: Path, tok_dir: Path) -> Tokenizer:
    if (tok_dir / CONFIG_FILE).is_file():
        return Tokenizer.load(tok_dir)
    t0 = time.time()
    tok = Tokenizer.train_from_iterator(
        corpus_texts(corpus_dir, args.tokenizer_chars), args.vocab_size, pattern=split_pattern(3)
    )
    tok.save(tok_dir)
    print(f"tokenizer: vocab {args.vocab_size} trained in {time.time() - t0:.0f} s -> {tok_dir}")
    return tok


def length_stats(tok: Tokenizer, corpus_dir: Path, n: int = 3000) -> str:
    texts = list(corpus_texts(corpus_dir, float("inf")))[:n]
    lengths = sorted(len(t) + 1 for t in tok.encode(texts))
    q = statistics.quantiles(lengths, n=10)
    median, mean = statistics.median(lengths), statistics.mean(lengths)
    longer = sum(x > 2049 for x in lengths) / len(lengths)
    return (
        f"document lengths in tokens ({len(lengths)} docs): median {median:,.0f}, mean {mean:,.0f},"
        f" p10 {q[0]:,.0f}, p90 {q[-1]:,.0f}, max {lengths[-1]:,}; {longer:.1%} longer than a "
        f"2048-token row"
    )


# ---------------------------------------------------------------- measurements
def make_loader(tok, args, corpus_dir, packing, prefetch, tokenizer_threads=None) -> DataLoader:
    return DataLoader(
        tok,
        args.batch_size,
        args.seq_len,
        "train",
        source="dir",
        data_dir=corpus_dir,
        packing=packing,
        prefetch=prefetch,
        tokenizer_threads=tokenizer_threads,
    )


def production(tok, args, corpus_dir, packing) -> dict:
    """Kept fraction and tokens/s of the loader alone (no prefetch, one tokenising thread), on the
    pinned core, and the share of that time spent tokenising (the part that spreads over
    threads). The first batch (filling the look-ahead) is not timed."""
    loader = make_loader(tok, args, corpus_dir, packing, prefetch=0, tokenizer_threads=1)
    loader.next_batch()
    encode, tokenising = loader._encode, [0.0]

    # CPU seconds, not wall: the figure is per core even where other jobs share the core
    def timed_encode(texts):
        t0 = time.process_time()
        out = encode(texts)
        tokenising[0] += time.process_time() - t0
        return out

    loader._encode = timed_encode
    t0 = time.process_time()
    for _ in range(args.batches):
        loader.next_batch()
    seconds = time.process_time() - t0
    state = loader.state_dict()
    # every row token is a kept text token or a <|bos|> put in front of a continuation
    rows = (args.batches + 1) * args.batch_size
    return {
        "kept": loader.kept_frac,
        "tok_s": args.batches * args.batch_size * args.seq_len / seconds,
        "tok_share": tokenising[0] / seconds,
        "cont_per_row": (rows * (args.seq_len + 1) - state["tokens_kept"]) / rows,
    }


def blocking(tok, args, corpus_dir, packing, prefetch, step_s) -> dict:
    """Milliseconds next_batch() takes per simulated training step, warm steps only. One
    tokenising thread: the loader produces on one core's worth, as the simulated step assumes,
    while the caller (the training loop) has a core of its own, as on the node."""
    with make_loader(tok, args, corpus_dir, packing, prefetch, tokenizer_threads=1) as loader:
        waits = []
        for i in range(args.warm_steps + args.blocking_steps):
            t0 = time.perf_counter()
            loader.next_batch()
            if i >= args.warm_steps:
                waits.append((time.perf_counter() - t0) * 1000)
            time.sleep(step_s)
    return {"mean": statistics.mean(waits), "median": statistics.median(waits), "max": max(waits)}


def consumption(args, vocab_size: int) -> float:
    """Tokens/s one H100 trains at --depth with --mfu."""
    with torch.device("meta"):
        model = GPT(config_from_depth(args.depth, vocab_size, sequence_len=args.seq_len))
    return args.mfu * H100_BF16_PEAK / model.estimate_flops()


def main(argv=None) -> None:
    args = parse_args(argv)
    bench = get_base_dir() / "bench"
    corpus_dir = Path(args.corpus_dir or bench / "dataloader_corpus")
    tok_dir = Path(args.tokenizer_dir or bench / "dataloader_tok")
    if not list(corpus_dir.glob("*.parquet")):
        build_corpus(args, corpus_dir)
    if args.corpus_only:
        return
    tok = load_or_train_tokenizer(args, corpus_dir, tok_dir)
    print(length_stats(tok, corpus_dir))

    gpu_tok_s = consumption(args, tok.get_vocab_size())
    batch_tokens = args.batch_size * args.seq_len
    step_s = batch_tokens / gpu_tok_s * args.cores_per_gpu
    print(
        f"one H100 at d{args.depth}, MFU {args.mfu:.0%}: {gpu_tok_s:,.0f} tok/s, a "
        f"{args.batch_size} x {args.seq_len} batch every {batch_tokens / gpu_tok_s * 1000:.1f} ms; "
        f"one core of {args.cores_per_gpu} feeds 1/{args.cores_per_gpu} of it: simulated step "
        f"{step_s * 1000:.0f} ms; torch {torch.get_num_threads()} thread(s); load average "
        f"{os.getloadavg()[0]:.1f} on {len(os.sched_getaffinity(0))} cores"
    )
    # old: the loader before issue 24; new: "continue" packing with prefetch; default: what
    # base_train uses, the old packing (lower loss per FLOP) with prefetch
    contenders = {"old": ("legacy", 0), "new": ("continue", 4), "default": ("legacy", 4)}
    rows = {}
    cores = os.sched_getaffinity(0)
    for name, (packing, prefetch) in contenders.items():
        os.sched_setaffinity(0, {args.cpu})  # one core, for the per-core rate
        rows[name] = production(tok, args, corpus_dir, packing)
        os.sched_setaffinity(0, cores)
        rows[name].update(blocking(tok, args, corpus_dir, packing, prefetch, step_s))
    print(
        f"\n{args.batch_size} x {args.seq_len} batches, vocab {tok.get_vocab_size()}; kept "
        f"fraction and tok/s over {args.batches} batches (tok/s counts trained tokens); "
        f"blocking over {args.blocking_steps} warm steps of {step_s * 1000:.0f} ms"
    )
    k = args.cores_per_gpu
    print(
        f"{'loader':>6} | {'packing':>8} | {'prefetch':>8} | {'kept frac':>9} | "
        f"{'cont./row':>9} | {'tok/CPU-s':>13} | {'tokenising':>10} | "
        f"{f'{k} cores (Amdahl)':>17} | {'/ GPU need':>10} | {'next_batch ms mean':>18} | "
        f"{'median':>6} | {'max':>7}"
    )
    for name, (packing, prefetch) in contenders.items():
        r = rows[name]
        # tokenising spreads over the loader's threads (tiktoken releases the GIL); the rest
        # (reading parquet, packing, tensors) stays on the producer thread
        projected = r["tok_s"] / ((1 - r["tok_share"]) + r["tok_share"] / k)
        print(
            f"{name:>6} | {packing:>8} | {prefetch:>8} | {r['kept']:9.3f} | "
            f"{r['cont_per_row']:9.2f} | {r['tok_s']:13,.0f} | {r['tok_share']:10.0%} | "
            f"{projected:17,.0f} | {projected / gpu_tok_s:9.1f}x | {r['mean']:18.3f} | "
            f"{r['median']:6.3f} | {r['max']:7.2f}"
        )
    print(
        "cont./row: continuations per row (documents cut and carried on in a later row); "
        "tok/CPU-s: trained tokens per CPU-second, the loader alone on one core (core "
        f"{args.cpu}); tokenising: the tokenizer's share of that time"
    )


if __name__ == "__main__":
    main()
