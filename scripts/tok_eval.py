"""The trained tokenizer's compression (bytes per token) on sample texts, next to GPT-2 and GPT-4.

    uv run python -m scripts.tok_eval
    uv run python -m scripts.tok_eval --source dir --data-dir ./shards  # local shards

More bytes per token is more text per context window and per FLOP. Prints a table, writes the
tok_eval report section and logs the figures (stage "tok_eval").
"""

from __future__ import annotations

import argparse
import threading

from nanochat.files import get_base_dir
from nanochat.report import write_section
from nanochat.tokenizer import get_tokenizer
from nanochat.tracking import add_tracking_args, log_results

PROSE = """\
The river had been rising for three days before anyone in the village took it seriously. On the
fourth morning, the baker walked down to the old stone bridge and found the water lapping at the
arches, brown and fast and carrying whole branches with it. By noon the school had closed, the
council had opened the church hall, and a line of volunteers was passing sandbags from a lorry to
the doorways along Mill Street. Nobody could remember a flood like it, although the older residents
argued, as they always did, about whether the winter of 1947 had been worse."""

CODE = """\
import math
from dataclasses import dataclass


@dataclass
class Point:
    x: float
    y: float

    def distance(self, other: "Point") -> float:
        # Euclidean distance; hypot avoids overflow for large coordinates.
        return math.hypot(self.x - other.x, self.y - other.y)


def closest_pair(points: list[Point]) -> tuple[Point, Point]:
    best, pair = float("inf"), (points[0], points[1])
    for i, p in enumerate(points):
        for q in points[i + 1:]:
            d = p.distance(q)
            if d < best:
                best, pair = d, (p, q)
    return pair
"""

MATH = """\
Question: A train running at a speed of 36 km/h crosses a pole in 12 seconds. A second train, 40%
longer, runs at 54 km/h in the opposite direction. How long, in seconds, do the two trains take to
cross each other?
Options: A)9.6 B)11.52 C)12 D)14.4 E)16
Rationale: Speed of the first train = 36 * 5/18 = 10 m/s, so its length = 10 * 12 = 120 m.
The second train is 120 * 1.4 = 168 m long and runs at 54 * 5/18 = 15 m/s.
Relative speed = 10 + 15 = 25 m/s; total length = 120 + 168 = 288 m.
Time = 288 / 25 = 11.52 s.
Answer: B"""

MULTILINGUAL = (
    "Der schnelle braune Fuchs springt über den faulen Hund. "
    "Le cœur a ses raisons que la raison ne\n"
    "connaît point. 東京は日本の首都です。Москва — столица России. "
    "안녕하세요! ¿Dónde está la biblioteca? 🙂"
)

SAMPLES = {"prose": PROSE, "code": CODE, "math": MATH, "multilingual": MULTILINGUAL}
# our label -> tiktoken encoding name: GPT-2's 50k vocabulary and GPT-4's 100k
BASELINES = {"gpt2": "gpt2", "gpt4": "cl100k_base"}


def load_baseline(name: str, timeout_s: float):
    """(tiktoken.get_encoding(name), None), or (None, reason) when it cannot be had: tiktoken
    downloads an encoding on first use, which fails offline or hangs on a slow network."""
    import tiktoken

    result = {}

    def target():
        try:
            result["enc"] = tiktoken.get_encoding(name)
        except Exception as exc:  # ConnectionError offline, HTTP errors, bad cache...
            msg = str(exc).splitlines()[0] if str(exc) else ""
            result["err"] = f"{type(exc).__name__}: {msg[:90]}{'...' if len(msg) > 90 else ''}"

    # a daemon thread: a hung download cannot block the exit
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "enc" in result:
        return result["enc"], None
    return None, result.get("err", f"timed out after {timeout_s:.0f}s")


def val_sample(source: str, data_dir: str | None, max_chars: int) -> tuple[str | None, str | None]:
    """Text from the pretraining source's val split, or (None, reason)."""
    try:
        from nanochat.dataset import text_iterator

        docs = list(
            text_iterator(
                split="val", source=source, data_dir=data_dir, max_chars=max_chars, doc_cap=10_000
            )
        )
    except Exception as exc:
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    text = "\n".join(docs)[:max_chars]
    if not text:
        return None, "the val split yielded no text"
    return text, None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        default="auto",
        choices=["auto", "fineweb", "dir", "synthetic"],
        help="pretraining source whose val split is sampled (see nanochat.dataset.text_iterator)",
    )
    parser.add_argument(
        "--data-dir", default=None, help="directory of local parquet shards for --source dir"
    )
    parser.add_argument(
        "--val-chars",
        type=int,
        default=200_000,
        help="characters taken from the val split (0: skip)",
    )
    parser.add_argument("--no-compare", action="store_true", help="skip the GPT-2/GPT-4 comparison")
    parser.add_argument(
        "--download-timeout",
        type=float,
        default=30.0,
        help="seconds to wait for each baseline encoding",
    )
    add_tracking_args(parser)
    return parser.parse_args(argv)


def load_baselines(args, notes: list[str]) -> dict:
    """{label: tiktoken encoding} of the baselines that load; a note for each one that does not."""
    baselines = {}
    if args.no_compare:
        notes.append("GPT-2/GPT-4 comparison skipped (--no-compare).")
        return baselines
    for label, enc_name in BASELINES.items():
        enc, why = load_baseline(enc_name, args.download_timeout)
        if enc is None:
            notes.append(
                f"{label} comparison skipped: tiktoken could not load `{enc_name}` ({why}). "
                "tiktoken downloads it on first use: run once with network access, or point "
                "TIKTOKEN_CACHE_DIR at a cache that has it."
            )
        else:
            baselines[label] = enc
    return baselines


def token_counts(tok, baselines: dict, samples: dict) -> list[tuple[str, int, dict]]:
    """(sample name, UTF-8 bytes, {tokenizer label: tokens}) per sample, then the total "all"."""
    rows = []
    for name, text in samples.items():
        counts = {"ours": len(tok.encode(text))}
        for label, enc in baselines.items():
            counts[label] = len(enc.encode_ordinary(text))
        rows.append((name, len(text.encode("utf-8")), counts))
    total_counts = {k: sum(counts[k] for _, _, counts in rows) for k in rows[0][2]}
    rows.append(("all", sum(nbytes for _, nbytes, _ in rows), total_counts))
    return rows


def print_table(header: list[str], table: list[list[str]]) -> None:
    """Columns padded to their widest cell: names left-aligned, numbers right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        )

    print(line(header))
    print(line(["-" * w for w in widths]))
    for cells in table:
        print(line(cells))


def main(argv=None):
    args = parse_args(argv)
    try:
        tok = get_tokenizer()
    except (
        FileNotFoundError,
        ValueError,
    ) as exc:  # missing or damaged: the message names the files
        raise SystemExit(str(exc)) from None
    notes = []
    samples = dict(SAMPLES)
    if args.val_chars > 0:
        text, why = val_sample(args.source, args.data_dir, args.val_chars)
        if text is None:
            notes.append(f"No val sample from source `{args.source}`: {why}.")
        else:
            samples["val"] = text
    baselines = load_baselines(args, notes)
    rows = token_counts(tok, baselines, samples)

    labels = ["ours"] + list(baselines)
    header = ["sample", "bytes"] + [f"{label} tokens" for label in labels]
    header += [f"{label} B/tok" for label in labels]
    header += [f"ours vs {label}" for label in baselines]
    table = []
    metrics = {"vocab_size": tok.get_vocab_size()}
    for name, nbytes, counts in rows:
        ratio = {label: nbytes / max(counts[label], 1) for label in labels}
        # + means our tokenizer needs fewer tokens for the same bytes
        relative = [
            f"{100 * (ratio['ours'] - ratio[label]) / ratio[label]:+.1f}%" for label in baselines
        ]
        table.append(
            [name, f"{nbytes:,}"]
            + [f"{counts[label]:,}" for label in labels]
            + [f"{ratio[label]:.2f}" for label in labels]
            + relative
        )
        metrics[f"bytes_per_token/{name}"] = ratio["ours"]
        for label in baselines:
            metrics[f"{label}/bytes_per_token/{name}"] = ratio[label]

    print(
        f"Tokenizer compression (vocab {tok.get_vocab_size():,}), "
        "bytes per token, higher is better:"
    )
    print_table(header, table)
    for note in notes:
        print(f"note: {note}")

    md = [
        "## Tokenizer evaluation",
        "",
        "Compression in UTF-8 bytes per token (higher is better); "
        f"our vocab has {tok.get_vocab_size():,} ids.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    md += ["| " + " | ".join(r) + " |" for r in table]
    if notes:
        md += [""] + [f"- {n}" for n in notes]
    path = write_section(get_base_dir(), args.run, "tok_eval", "\n".join(md))
    print(f"[tok_eval] report section -> {path}")
    log_results(args, "tok_eval", metrics)


if __name__ == "__main__":
    main()
