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
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from nanochat.common import get_base_dir

DEFAULT_REPO = "karpathy/fineweb-edu-100b-shuffle"
DEFAULT_BASE_URL = "https://huggingface.co"
MAX_SHARD = 1822  # shard_01822.parquet is the last one of the 100B shuffle
VAL_EVERY = 20  # single-file corpora: every 20th document is val
TEXT_UNIT_DOCS = 256  # documents per unit for text files
TEXT_SUFFIXES = (".txt", ".md")
SYN_DOCS_PER_UNIT = 100
SYN_TRAIN_UNITS = int(os.environ.get("NANOCHAT_SYNTHETIC_TRAIN_UNITS", "200"))  # 20k docs
SYN_VAL_UNITS = int(os.environ.get("NANOCHAT_SYNTHETIC_VAL_UNITS", "10"))  # 1k docs
SYN_TRAIN_SEED, SYN_VAL_SEED = 1, 1_000_001  # unit u uses seed base + u: train and val seeds are disjoint
SOURCES = ("auto", "fineweb", "dir", "synthetic")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def default_data_dir() -> Path:
    return get_base_dir() / "base_data"


def dataset_repo() -> str:
    return os.environ.get("NANOCHAT_DATASET_REPO") or DEFAULT_REPO


def dataset_base_url() -> str:
    return (os.environ.get("NANOCHAT_DATASET_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")


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
    part: int = 0  # sub-sharding when there are fewer units than ranks: keep docs j with j % nparts == part
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
        print(f"note: no pretraining shards in {default_data_dir()} and no --data-dir given; using the offline "
              f"synthetic corpus (download FineWeb-Edu with: python -m nanochat.dataset -n 8)", flush=True)
    return "synthetic"


def _is_val_doc(i: int, n: int) -> bool:
    return i % VAL_EVERY == VAL_EVERY - 1 or (n < VAL_EVERY and i == n - 1)


def _parquet_units(files: list[Path], split: str) -> list[Unit]:
    import pyarrow.parquet as pq

    if len(files) >= 2:
        chosen, doc_split = (files[:-1] if split == "train" else files[-1:]), None
    else:
        chosen, doc_split = files, split
    units = []
    for f in chosen:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise ValueError(f"{f}: not a readable parquet file ({e}); delete it and re-download") from e
        if "text" not in pf.schema_arrow.names:
            raise ValueError(f"{f}: parquet file has no 'text' column (columns: {pf.schema_arrow.names})")
        units += [Unit("parquet", str(f), rg, doc_split) for rg in range(pf.num_row_groups)]
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
        units += [Unit("text", str(f), k, doc_split) for k in range((n + TEXT_UNIT_DOCS - 1) // TEXT_UNIT_DOCS)]
    return units


def list_units(split: str, source: str = "auto", data_dir: str | Path | None = None) -> tuple[str, list[Unit]]:
    """-> (resolved source, units of that split). Raises a clear error when the split would be empty."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    source = resolve_source(source, data_dir)
    if source == "synthetic":
        base, n = (SYN_TRAIN_SEED, SYN_TRAIN_UNITS) if split == "train" else (SYN_VAL_SEED, SYN_VAL_UNITS)
        return source, [Unit("synthetic", None, base + u) for u in range(n)]
    if source == "fineweb":
        d = default_data_dir() if data_dir is None else Path(data_dir)
        files = list_parquet_files(d)
        if len(files) < 2:
            raise FileNotFoundError(
                f"found {len(files)} parquet shard(s) in {d}; need at least 2 (the last one is the val split). "
                f"Download with: python -m nanochat.dataset -n 8   (or use --data-dir / source 'synthetic')")
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
        raise ValueError(f"--data-dir {d}: the {split!r} split has no documents (the last file, or every "
                         f"{VAL_EVERY}th document of a single file, is val); add more data")
    return source, units


# ---------------------------------------------------------------------------------------------------------
# loading one unit


def _load_synthetic(seed: int) -> list[str]:
    try:
        from tasks.synthetic_aqua import synthetic_texts
    except ImportError as e:
        raise ImportError(f"the synthetic corpus needs tasks/synthetic_aqua.py (synthetic_texts): {e}") from e
    return list(synthetic_texts(SYN_DOCS_PER_UNIT, seed))


def load_unit(unit: Unit) -> list[str]:
    """The documents of one unit, always the same list for the same unit."""
    if unit.kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(unit.path)
        docs = pf.read_row_group(unit.index, columns=["text"]).column("text").to_pylist()
        first = sum(pf.metadata.row_group(i).num_rows for i in range(unit.index))  # row index in the file
        total = pf.metadata.num_rows
    elif unit.kind == "text":
        all_docs = _read_text_docs(unit.path)
        first, total = unit.index * TEXT_UNIT_DOCS, len(all_docs)
        docs = list(all_docs[first:first + TEXT_UNIT_DOCS])
    elif unit.kind == "synthetic":
        docs, first, total = _load_synthetic(unit.index), 0, 0
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")
    docs = [d if isinstance(d, str) else "" for d in docs]  # null rows become empty docs (still one slot)
    if unit.doc_split is not None:
        want_val = unit.doc_split == "val"
        docs = [d for j, d in enumerate(docs) if _is_val_doc(first + j, total) == want_val]
    if unit.nparts > 1:
        docs = docs[unit.part::unit.nparts]
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


def parquets_iter_batched(split: str, start: int = 0, step: int = 1, data_dir: str | Path | None = None
                          ) -> Iterator[list[str]]:
    """One pass over the parquet row groups of a split, yielding each row group's texts. data_dir None ->
    the downloaded shards. start/step pick every step-th row group (e.g. start=rank, step=world_size)."""
    source = "fineweb" if data_dir is None else "dir"
    _, units = list_units(split, source, data_dir)
    if units and units[0].kind != "parquet":
        raise ValueError(f"{data_dir}: parquets_iter_batched needs parquet files, found text files")
    for unit in units[start::step]:
        yield load_unit(unit)


def text_iterator(split: str = "train", source: str = "auto", data_dir: str | Path | None = None,
                  max_chars: int | None = None, doc_cap: int | None = None) -> Iterator[str]:
    """One pass over the documents of a split. doc_cap crops each document to that many characters;
    max_chars stops after that many characters in total (the last document is cropped to fit)."""
    _, units = list_units(split, source, data_dir)
    total = 0
    for unit in units:
        for doc in load_unit(unit):
            if doc_cap is not None:
                doc = doc[:doc_cap]
            if max_chars is not None:
                doc = doc[:max_chars - total]
                if not doc:
                    return
            total += len(doc)
            yield doc
            if max_chars is not None and total >= max_chars:
                return
