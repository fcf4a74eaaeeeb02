"""The pretraining corpus: where documents come from, and how to download the FineWeb-Edu shards.

Three sources, one interface (text_iterator / list_units + load_unit):
  fineweb    parquet shards downloaded into <base>/base_data/ by `python -m nanochat.dataset -n N`
             (default repo karpathy/fineweb-edu-100b-shuffle, shard_00000.parquet ... shard_01822.parquet).
             Split convention: the LAST shard present is "val", all others are "train" (so download >= 2).
  dir        a local directory (--data-dir) of parquet files (column `text`) or, if it has none, of .txt/.md
             files (documents inside a text file are separated by blank lines). Same split rule: the last
             file (by name) is val. With a single file, documents are split instead: doc i is val when
             i % 20 == 19 (or, in files of < 20 docs, the last doc).
  synthetic  tasks.synthetic_aqua.synthetic_texts(num_docs, seed): an offline corpus of AQuA-style text, in
             units of SYN_DOCS_PER_UNIT docs, each unit with its own seed; train and val seeds never overlap.
  auto       dir if data_dir is given, else fineweb if shards exist, else synthetic (with a printed note).

A "unit" is the smallest piece read at once (a parquet row group, a block of text-file documents, one
synthetic seed). The dataloader shards units across ranks and records positions as (unit, doc) pairs, so
every unit must load to the same list of documents every time: all of this is deterministic.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from nanochat.common import get_base_dir
from nanochat.files import file_sha256

DEFAULT_REPO = "karpathy/fineweb-edu-100b-shuffle"
DEFAULT_BASE_URL = "https://huggingface.co"
MAX_SHARD = 1822  # shard_01822.parquet is the last one of the 100B shuffle
VAL_EVERY = 20  # single-file corpora: every 20th document is val
TEXT_UNIT_DOCS = 256  # documents per unit for text files
TEXT_SUFFIXES = (".txt", ".md")
SYN_DOCS_PER_UNIT = 100
SYN_TRAIN_UNITS = int(os.environ.get("NANOCHAT_SYNTHETIC_TRAIN_UNITS", "200"))  # 20k docs
SYN_VAL_UNITS = int(os.environ.get("NANOCHAT_SYNTHETIC_VAL_UNITS", "10"))  # 1k docs
SYN_TRAIN_SEED, SYN_VAL_SEED = (
    1,
    1_000_001,
)  # unit u uses seed base + u: train and val seeds are disjoint
SOURCES = ("auto", "fineweb", "dir", "synthetic")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def default_data_dir() -> Path:
    return get_base_dir() / "base_data"


def dataset_repo() -> str:
    return os.environ.get("NANOCHAT_DATASET_REPO") or DEFAULT_REPO


def dataset_base_url() -> str:
    # HF_ENDPOINT is Hugging Face's own variable for mirrors; ours wins when both are set.
    url = (
        os.environ.get("NANOCHAT_DATASET_BASE_URL")
        or os.environ.get("HF_ENDPOINT")
        or DEFAULT_BASE_URL
    )
    return url.rstrip("/")


def shard_url(name: str, repo: str | None = None, base_url: str | None = None) -> str:
    return f"{(base_url or dataset_base_url()).rstrip('/')}/datasets/{repo or dataset_repo()}/resolve/main/{name}"


# ---------------------------------------------------------------------------------------------------------
# listing


def list_parquet_files(data_dir: str | Path | None = None) -> list[Path]:
    """Complete parquet files in data_dir (default <base>/base_data), sorted by name. Partial downloads
    (*.tmp) are never listed."""
    d = Path(data_dir) if data_dir is not None else default_data_dir()
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix == ".parquet")


def list_text_files(data_dir: str | Path) -> list[Path]:
    d = Path(data_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)


@dataclass(frozen=True)
class Unit:
    kind: str  # "parquet" | "text" | "synthetic"
    path: str | None  # file (parquet/text); None for synthetic
    index: int  # parquet row group | text block | synthetic seed
    doc_split: str | None = None  # single-file corpora: keep only this split's documents
    part: int = (
        0  # sub-sharding when there are fewer units than ranks: keep docs j with j % nparts == part
    )
    nparts: int = 1


_synthetic_note_shown = False


def resolve_source(source: str, data_dir: str | Path | None = None) -> str:
    global _synthetic_note_shown
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")
    if source != "auto":
        return source
    if data_dir is not None:
        return "dir"
    if list_parquet_files():
        return "fineweb"
    if not _synthetic_note_shown:
        _synthetic_note_shown = True
        print(
            f"note: no pretraining shards in {default_data_dir()} and no --data-dir given; using the offline "
            f"synthetic corpus (download FineWeb-Edu with: python -m nanochat.dataset -n 8)",
            flush=True,
        )
    return "synthetic"


def _is_val_doc(i: int, n: int) -> bool:
    return i % VAL_EVERY == VAL_EVERY - 1 or (n < VAL_EVERY and i == n - 1)


def _parquet_units(files: list[Path], split: str) -> list[Unit]:
    """Every file's footer is read first (a truncated file or one that is not parquet fails there), so
    both splits see the same good files; a bad one stops the run, or with NANOCHAT_BAD_SHARDS=skip is
    left out with a warning. Never read as empty."""
    import pyarrow.parquet as pq

    opened, bad = [], []
    for f in files:
        try:
            opened.append((f, pq.ParquetFile(f)))
        except Exception as e:
            bad.append(f"{f} ({type(e).__name__}: {str(e)[:120]})")
    if bad:
        listing = "; ".join(bad)
        if os.environ.get("NANOCHAT_BAD_SHARDS", "error") != "skip":
            raise ValueError(
                f"not a readable parquet file (truncated, or not parquet): {listing}. A downloaded "
                f"FineWeb-Edu shard: download it again (python -m nanochat.dataset -n N replaces damaged "
                f"shards; run_aquarat_small.sh: --from data); your own file: fix or remove it. Or set "
                f"NANOCHAT_BAD_SHARDS=skip to train without it"
            )
        warnings.warn(f"NANOCHAT_BAD_SHARDS=skip: leaving out {listing}", stacklevel=2)
    if len(opened) >= 2:
        chosen, doc_split = (opened[:-1] if split == "train" else opened[-1:]), None
    else:
        chosen, doc_split = opened, split
    units = []
    for f, pf in chosen:
        if "text" not in pf.schema_arrow.names:
            raise ValueError(
                f"{f}: parquet file has no 'text' column (columns: {pf.schema_arrow.names})"
            )
        units += [Unit("parquet", str(f), rg, doc_split) for rg in range(pf.num_row_groups)]
    if not units:
        raise ValueError(
            f"no readable parquet shards with documents among {len(files)} file(s) in "
            f"{files[0].parent if files else '?'}"
        )
    return units


@functools.lru_cache(maxsize=8)
def _text_docs(path: str, mtime_ns: int) -> tuple[str, ...]:
    # Documents = blocks separated by blank lines; cached since blocks of one file are read repeatedly.
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return tuple(d.strip() for d in re.split(r"\n\s*\n", text) if d.strip())


def _read_text_docs(path: str) -> tuple[str, ...]:
    return _text_docs(path, Path(path).stat().st_mtime_ns)


def _text_units(files: list[Path], split: str) -> list[Unit]:
    if len(files) >= 2:
        chosen, doc_split = (files[:-1] if split == "train" else files[-1:]), None
    else:
        chosen, doc_split = files, split
    units = []
    for f in chosen:
        n = len(_read_text_docs(str(f)))
        units += [
            Unit("text", str(f), k, doc_split)
            for k in range((n + TEXT_UNIT_DOCS - 1) // TEXT_UNIT_DOCS)
        ]
    return units


def list_units(
    split: str, source: str = "auto", data_dir: str | Path | None = None
) -> tuple[str, list[Unit]]:
    """-> (resolved source, units of that split). Raises a clear error when the split would be empty."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    source = resolve_source(source, data_dir)
    if source == "synthetic":
        base, n = (
            (SYN_TRAIN_SEED, SYN_TRAIN_UNITS) if split == "train" else (SYN_VAL_SEED, SYN_VAL_UNITS)
        )
        return source, [Unit("synthetic", None, base + u) for u in range(n)]
    if source == "fineweb":
        d = default_data_dir() if data_dir is None else Path(data_dir)
        files = list_parquet_files(d)
        if len(files) < 2:
            raise FileNotFoundError(
                f"found {len(files)} parquet shard(s) in {d}; need at least 2 (the last one is the val split). "
                f"Download with: python -m nanochat.dataset -n 8   (or use --data-dir / source 'synthetic')"
            )
        return source, _parquet_units(files, split)
    # source == "dir"
    if data_dir is None:
        raise ValueError("source 'dir' needs a data_dir (--data-dir PATH)")
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"--data-dir {d} does not exist or is not a directory")
    files = list_parquet_files(d)
    units = _parquet_units(files, split) if files else None
    if units is None:
        texts = list_text_files(d)
        if not texts:
            raise FileNotFoundError(f"--data-dir {d} has no .parquet, .txt or .md files")
        units = _text_units(texts, split)
    if not any(len(load_unit(u)) for u in units):  # stops at the first unit with documents
        raise ValueError(
            f"--data-dir {d}: the {split!r} split has no documents (the last file, or every "
            f"{VAL_EVERY}th document of a single file, is val); add more data"
        )
    return source, units


# ---------------------------------------------------------------------------------------------------------
# loading one unit


def _load_synthetic(seed: int) -> list[str]:
    try:
        from tasks.synthetic_aqua import synthetic_texts
    except ImportError as e:
        raise ImportError(
            f"the synthetic corpus needs tasks/synthetic_aqua.py (synthetic_texts): {e}"
        ) from e
    return list(synthetic_texts(SYN_DOCS_PER_UNIT, seed))


def load_unit(unit: Unit) -> list[str]:
    """The documents of one unit, always the same list for the same unit."""
    if unit.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(unit.path)
        docs = pf.read_row_group(unit.index, columns=["text"]).column("text").to_pylist()
        first = sum(
            pf.metadata.row_group(i).num_rows for i in range(unit.index)
        )  # row index in the file
        total = pf.metadata.num_rows
    elif unit.kind == "text":
        all_docs = _read_text_docs(unit.path)
        first, total = unit.index * TEXT_UNIT_DOCS, len(all_docs)
        docs = list(all_docs[first : first + TEXT_UNIT_DOCS])
    elif unit.kind == "synthetic":
        docs, first, total = _load_synthetic(unit.index), 0, 0
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")
    docs = [
        d if isinstance(d, str) else "" for d in docs
    ]  # null rows become empty docs (still one slot)
    if unit.doc_split is not None:
        want_val = unit.doc_split == "val"
        docs = [d for j, d in enumerate(docs) if _is_val_doc(first + j, total) == want_val]
    if unit.nparts > 1:
        docs = docs[unit.part :: unit.nparts]
    return docs


def shard_units(units: list[Unit], rank: int, world_size: int) -> list[Unit]:
    """Rank r takes every world_size-th unit. With fewer units than ranks, each unit is split by document
    instead (doc j of a unit goes to rank j % world_size), so no rank is left without data."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if len(units) >= world_size:
        return units[rank::world_size]
    return [replace(u, part=rank, nparts=world_size) for u in units]


# ---------------------------------------------------------------------------------------------------------
# iterating


def parquets_iter_batched(
    split: str, start: int = 0, step: int = 1, data_dir: str | Path | None = None
) -> Iterator[list[str]]:
    """One pass over the parquet row groups of a split, yielding each row group's texts. data_dir None ->
    the downloaded shards. start/step pick every step-th row group (e.g. start=rank, step=world_size)."""
    source = "fineweb" if data_dir is None else "dir"
    _, units = list_units(split, source, data_dir)
    if units and units[0].kind != "parquet":
        raise ValueError(f"{data_dir}: parquets_iter_batched needs parquet files, found text files")
    for unit in units[start::step]:
        yield load_unit(unit)


def text_iterator(
    split: str = "train",
    source: str = "auto",
    data_dir: str | Path | None = None,
    max_chars: int | None = None,
    doc_cap: int | None = None,
) -> Iterator[str]:
    """One pass over the documents of a split. doc_cap crops each document to that many characters;
    max_chars stops after that many characters in total (the last document is cropped to fit)."""
    _, units = list_units(split, source, data_dir)
    total = 0
    for unit in units:
        for doc in load_unit(unit):
            if doc_cap is not None:
                doc = doc[:doc_cap]
            if max_chars is not None:
                doc = doc[: max_chars - total]
                if not doc:
                    return
            total += len(doc)
            yield doc
            if max_chars is not None and total >= max_chars:
                return


# ---------------------------------------------------------------------------------------------------------
# downloading shards


class DownloadError(RuntimeError):
    """A shard could not be downloaded; the message says why and what to do."""


class HubUnreachable(DownloadError):
    pass


def verify_parquet(path: str | Path) -> int:
    """Open the parquet footer and metadata (a truncated or corrupt file fails here); -> number of rows."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise ValueError(
            f"{path}: parquet file has no 'text' column (columns: {pf.schema_arrow.names})"
        )
    return pf.metadata.num_rows


def read_sha256_manifest(path: str | Path) -> dict[str, str]:
    """`sha256sum` output format: '<hex>  <file name>' per line."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2 or len(parts[0]) != 64:
                raise ValueError(f"{path}:{n}: expected '<sha256 hex>  <file name>', got {line!r}")
            out[parts[1].lstrip("*")] = parts[0].lower()
    return out


def _expected_total(resp, offset: int) -> int | None:
    """Full file size from Content-Range ('bytes a-b/total') or Content-Length (+ resume offset)."""
    content_range = resp.headers.get("Content-Range", "")
    if "/" in content_range and not content_range.endswith("/*"):
        return int(content_range.rsplit("/", 1)[1])
    if resp.headers.get("Content-Length") is not None:
        return offset + int(resp.headers["Content-Length"])
    return None


def download_shard(
    name: str,
    out_dir: str | Path,
    url: str,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
    sha256: str | None = None,
    on_bytes=None,
    abort=None,
) -> str:
    """Download one file to out_dir/name. -> "present" (already complete) | "downloaded".

    Resume: bytes already in out_dir/name.tmp are kept and the rest requested with an HTTP Range header
    (a server that ignores Range answers 200 and the download restarts). The file is renamed into place
    only after its size matches Content-Length/Content-Range, its parquet footer opens and (if given) its
    sha256 matches. Transient failures (connection errors, timeouts, 5xx, 429, short reads) are retried
    with exponential backoff; a 404 or other 4xx is not.
    """
    import requests

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final, tmp = out_dir / name, out_dir / f"{name}.tmp"
    if final.exists():
        try:
            verify_parquet(final)
            if sha256 is None or file_sha256(final) == sha256:
                return "present"
        except Exception:
            pass
        print(
            f"{final} is corrupt or incomplete: downloading it again", file=sys.stderr, flush=True
        )
        final.unlink()
    headers = {}
    if os.environ.get("HF_TOKEN"):  # private/gated repos; never printed
        headers["Authorization"] = f"Bearer {os.environ['HF_TOKEN']}"
    host = url.split("/")[2] if "://" in url else url
    last_error, ever_connected = "no attempt made", False
    for attempt in range(retries + 1):
        if abort is not None and abort.is_set():
            raise DownloadError(f"{name}: cancelled")
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
        offset = tmp.stat().st_size if tmp.exists() else 0
        req_headers = dict(headers, **({"Range": f"bytes={offset}-"} if offset else {}))
        try:
            connected = False
            with requests.get(url, headers=req_headers, stream=True, timeout=timeout) as resp:
                connected = ever_connected = True
                if (
                    resp.status_code == 416
                ):  # our partial file is not a prefix of theirs (or is complete)
                    tmp.unlink(missing_ok=True)
                    last_error = "HTTP 416 on resume; restarting from byte 0"
                    continue
                if resp.status_code == 404:
                    raise DownloadError(
                        f"{url}: HTTP 404 (no such file: check --repo and the shard count)"
                    )
                if resp.status_code in (401, 403):
                    raise DownloadError(
                        f"{url}: HTTP {resp.status_code} (access denied: a gated/private repo "
                        f"needs HF_TOKEN in the environment)"
                    )
                if resp.status_code == 429 or resp.status_code >= 500:
                    last_error = f"HTTP {resp.status_code}"
                    continue
                if resp.status_code not in (200, 206):
                    raise DownloadError(f"{url}: unexpected HTTP {resp.status_code}")
                if resp.status_code == 200 and offset:  # server ignored Range: start over
                    offset = 0
                total = _expected_total(resp, offset)
                with open(tmp, "ab" if offset else "wb") as f:
                    for chunk in resp.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        if on_bytes is not None:
                            on_bytes(len(chunk))
                    f.flush()
                    os.fsync(f.fileno())
        except requests.exceptions.ConnectionError as e:
            # raised both for "host unreachable" and for a connection dropped mid-body; keep the partial file
            what = "connection dropped mid-download" if connected else "connection failed"
            last_error = f"{what}: {_root_cause(e)}"
            continue
        except (requests.exceptions.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            last_error = f"{type(e).__name__}: {_short(e)}"
            continue
        size = tmp.stat().st_size
        if total is not None and size != total:
            last_error = f"got {size} of {total} bytes"
            if size > total:
                tmp.unlink()
            continue
        try:
            verify_parquet(tmp)
        except Exception as e:
            last_error = f"downloaded file is not a valid parquet file ({_short(e)})"
            tmp.unlink()  # corrupt: resuming it cannot help
            continue
        if sha256 is not None and file_sha256(tmp) != sha256:
            last_error = "sha256 mismatch"
            tmp.unlink()
            continue
        os.replace(tmp, final)
        return "downloaded"
    if not ever_connected and last_error.startswith("connection failed"):
        raise HubUnreachable(f"cannot reach {host} ({last_error})")
    raise DownloadError(f"{name}: giving up after {retries + 1} attempts; last error: {last_error}")


def _root_cause(e: Exception) -> str:
    # requests wraps urllib3 wraps socket errors; the useful part is e.g. "[Errno 111] Connection refused"
    text = str(e)
    m = re.search(r"\[Errno [^\]]+\] [^'\")(]+", text) or re.search(
        r"(Name|Temporary failure)[^'\")(]+", text
    )
    return m.group(0).strip() if m else _short(e)


def _short(e: Exception, n: int = 160) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= n else s[:n] + "..."


def download_shards(
    indices: list[int],
    out_dir: str | Path,
    repo: str,
    base_url: str,
    workers: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30.0,
    manifest: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Download shard_<i>.parquet for every i (in parallel). -> {name: "present"|"downloaded"}."""
    import threading

    from tqdm import tqdm

    names = [shard_name(i) for i in indices]
    abort = threading.Event()
    results: dict[str, str] = {}
    errors: list[DownloadError] = []
    bar = tqdm(
        total=len(names), unit="shard", desc="shards", disable=not progress, dynamic_ncols=True
    )
    received = [0]
    lock = threading.Lock()

    def on_bytes(n):
        with lock:
            received[0] += n
            bar.set_postfix_str(f"{received[0] / 1e6:.1f} MB", refresh=False)

    def one(name):
        return download_shard(
            name,
            out_dir,
            shard_url(name, repo, base_url),
            retries,
            backoff,
            timeout,
            (manifest or {}).get(name),
            on_bytes,
            abort,
        )

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(one, name): name for name in names}
        for fut in as_completed(futures):
            name = futures[fut]
            try:
                results[name] = fut.result()
            except HubUnreachable as e:
                abort.set()  # the others would fail the same way: stop them early
                errors.append(e)
            except DownloadError as e:
                errors.append(e)
            bar.update(1)
    bar.close()
    if errors:
        unreachable = [e for e in errors if isinstance(e, HubUnreachable)]
        raise (
            unreachable[0] if unreachable else DownloadError("; ".join(str(e) for e in errors[:5]))
        )
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Download pretraining shards (parquet) from a Hugging Face dataset repo into "
        "<base>/base_data/. Convention: of the shards present, the LAST one (by name) is the "
        "validation split and all others are training data, so download at least 2."
    )
    parser.add_argument(
        "-n",
        "--num-shards",
        type=int,
        default=-1,
        help=f"download shards 0..N-1 (-1: all {MAX_SHARD + 1}); shard N-1 becomes val",
    )
    parser.add_argument(
        "--repo",
        default=dataset_repo(),
        help=f"HF dataset repo id (env NANOCHAT_DATASET_REPO; default {DEFAULT_REPO})",
    )
    parser.add_argument(
        "--base-url",
        default=dataset_base_url(),
        help="hub URL (env NANOCHAT_DATASET_BASE_URL; default https://huggingface.co)",
    )
    parser.add_argument(
        "--out-dir", default=None, help="where to put the shards (default <base>/base_data)"
    )
    parser.add_argument("--workers", type=int, default=4, help="parallel downloads")
    parser.add_argument(
        "--retries", type=int, default=5, help="retries per shard after the first attempt"
    )
    parser.add_argument(
        "--backoff", type=float, default=1.0, help="first retry delay in s (doubles each time)"
    )
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="connect/read timeout in seconds"
    )
    parser.add_argument(
        "--sha256-manifest",
        default=None,
        help="optional sha256sum-format file ('<hex>  shard_00000.parquet' lines) to verify",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    n = MAX_SHARD + 1 if args.num_shards == -1 else args.num_shards
    if n < 1:
        parser.error(f"--num-shards must be >= 1 or -1 (all), got {args.num_shards}")
    if n > MAX_SHARD + 1:
        print(
            f"note: the dataset has {MAX_SHARD + 1} shards; downloading all of them",
            file=sys.stderr,
        )
        n = MAX_SHARD + 1
    out_dir = Path(args.out_dir) if args.out_dir else default_data_dir()
    manifest = read_sha256_manifest(args.sha256_manifest) if args.sha256_manifest else None
    print(
        f"downloading {n} shard(s) of {args.repo} from {args.base_url} into {out_dir} "
        f"({args.workers} workers)",
        flush=True,
    )
    t0 = time.time()
    try:
        results = download_shards(
            list(range(n)),
            out_dir,
            args.repo,
            args.base_url,
            args.workers,
            args.retries,
            args.backoff,
            args.timeout,
            manifest,
            progress=not args.no_progress,
        )
    except HubUnreachable as e:
        print(
            f"error: {e}.\nCheck the network, or point --base-url (or HF_ENDPOINT) at a mirror. Meanwhile, "
            f"train on local files with --data-dir PATH (parquet with a 'text' column, or .txt/.md) or on "
            f"the offline synthetic corpus (--source synthetic).",
            file=sys.stderr,
        )
        return 2
    except DownloadError as e:
        print(
            f"error: {e}\nRe-run the same command to resume (complete shards are kept).",
            file=sys.stderr,
        )
        return 1
    fresh = sum(1 for r in results.values() if r == "downloaded")
    print(
        f"done in {time.time() - t0:.1f}s: {fresh} downloaded, {len(results) - fresh} already present"
    )
    files = list_parquet_files(out_dir)
    if len(files) >= 2:
        print(
            f"splits: train = {files[0].name} .. {files[-2].name} ({len(files) - 1} files), "
            f"val = {files[-1].name} (the last file present)"
        )
    else:
        print("note: only one shard present; training needs >= 2 (the last one is the val split)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
