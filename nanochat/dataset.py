"""The pretraining corpus: where documents come from, cut into deterministic units.

Sources (text_iterator / list_units + load_unit read them all alike):
  fineweb    parquet shards in <base>/base_data/, downloaded by
             `uv run python -m nanochat.dataset -n N` (nanochat/shard_download.py). The last shard
             present is val, the others train.
  dir        --data-dir: parquet files (column `text`) or, if it has none, .txt/.md files whose
             documents are separated by blank lines. The last file by name is val; a single file is
             split by document instead (doc i is val when i % 20 == 19, or the last of < 20 docs).
  synthetic  tasks.synthetic_aqua.synthetic_texts: offline AQuA-style text, one seed per unit.
  auto       dir if a data_dir is given, else fineweb if shards exist, else synthetic (with a note).

A unit is the smallest piece read at once: a parquet row group, a block of a text file's documents,
one synthetic seed. The dataloader deals units out to ranks and records its position as (unit,
document), so a unit must load to the same documents every time.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

from nanochat.files import get_base_dir

VAL_EVERY = 20  # single-file corpora: every 20th document is val
TEXT_UNIT_DOCS = 256  # documents per unit of a text file
TEXT_SUFFIXES = (".txt", ".md")
SYN_DOCS_PER_UNIT = 100
SYN_TRAIN_UNITS = int(os.environ.get("NANOCHAT_SYNTHETIC_TRAIN_UNITS", "200"))  # 20k docs
SYN_VAL_UNITS = int(os.environ.get("NANOCHAT_SYNTHETIC_VAL_UNITS", "10"))  # 1k docs
# unit u is seeded base + u; the two bases are far apart so train and val never share a seed
SYN_TRAIN_SEED = 1
SYN_VAL_SEED = 1_000_001
SOURCES = ("auto", "fineweb", "dir", "synthetic")


# FineWeb-Edu text per shard and per token of a 65,536-token vocabulary: upstream nanochat's
# figures, not measured here
CHARS_PER_SHARD = 250e6
CHARS_PER_TOKEN = 4.8


def shards_needed(train_tokens: float, kept_fraction: float) -> int:
    """FineWeb-Edu shards to download for `train_tokens` tokens of training: the text they take,
    divided by the share of the tokenised text the data loader trains on (dataloader.KEPT_FRACTION;
    a packing that crops text away needs more), plus one shard of margin and the val shard."""
    if not 0 < kept_fraction <= 1:
        raise ValueError(f"kept_fraction must be in (0, 1], got {kept_fraction}")
    return math.ceil(train_tokens * CHARS_PER_TOKEN / CHARS_PER_SHARD / kept_fraction) + 2


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def default_data_dir() -> Path:
    return get_base_dir() / "base_data"


# --------------------------------------------------------------------------------------------------
# listing


def _files_with_suffix(directory: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in suffixes)


def list_parquet_files(data_dir: str | Path | None = None) -> list[Path]:
    """The parquet files in data_dir (default <base>/base_data), sorted by name. A download still in
    progress (name.parquet.tmp) is never listed."""
    directory = Path(data_dir) if data_dir is not None else default_data_dir()
    return _files_with_suffix(directory, (".parquet",))


def read_parquet_footer(path: str | Path):
    """Open a parquet file's footer (a truncated or corrupt file fails here) -> ParquetFile."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(path)


def check_text_column(parquet_file, path: str | Path) -> None:
    names = parquet_file.schema_arrow.names
    if "text" not in names:
        raise ValueError(f"{path}: parquet file has no 'text' column (columns: {names})")


@dataclass(frozen=True)
class Unit:
    kind: str  # "parquet" | "text" | "synthetic"
    path: str | None  # the file (parquet, text); None for synthetic
    index: int  # parquet row group | block of text documents | synthetic seed
    doc_split: str | None = None  # single-file corpora: keep only this split's documents
    # with fewer units than ranks each unit is shared: keep the documents j with j % nparts == part
    part: int = 0
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
            f"note: no pretraining shards in {default_data_dir()} and no --data-dir given; using "
            f"the offline synthetic corpus (download FineWeb-Edu with: "
            f"uv run python -m nanochat.dataset -n 8)",
            flush=True,
        )
    return "synthetic"


def _is_val_doc(i: int, n: int) -> bool:
    return i % VAL_EVERY == VAL_EVERY - 1 or (n < VAL_EVERY and i == n - 1)


def _file_units(
    kind: str, files: list[Path], split: str, units_in: Callable[[Path], int]
) -> list[Unit]:
    """The split rule for file corpora: with two files or more the last one is val and the others
    train; a single file serves both, split by document (Unit.doc_split)."""
    if len(files) >= 2:
        chosen = files[:-1] if split == "train" else files[-1:]
        doc_split = None
    else:
        chosen = files
        doc_split = split
    return [Unit(kind, str(f), k, doc_split) for f in chosen for k in range(units_in(f))]


def _parquet_units(files: list[Path], split: str) -> list[Unit]:
    """Every file's footer is read first, so both splits see the same good files; a bad one stops
    the run, or with NANOCHAT_BAD_SHARDS=skip is left out with a warning (never read as empty)."""
    footers, bad = {}, []
    for f in files:
        try:
            footers[f] = read_parquet_footer(f)
        except Exception as e:
            bad.append(f"{f} ({type(e).__name__}: {str(e)[:120]})")
    if bad:
        listing = "; ".join(bad)
        if os.environ.get("NANOCHAT_BAD_SHARDS", "error") != "skip":
            raise ValueError(
                f"not a readable parquet file (truncated, or not parquet): {listing}. A downloaded "
                "FineWeb-Edu shard: download it again "
                f"(uv run python -m nanochat.dataset -n N replaces "
                f"damaged shards; run_aquarat_small.sh: --from data); your own file: fix or remove "
                f"it. Or set NANOCHAT_BAD_SHARDS=skip to train without it"
            )
        warnings.warn(f"NANOCHAT_BAD_SHARDS=skip: leaving out {listing}", stacklevel=2)

    def row_groups(f: Path) -> int:
        check_text_column(footers[f], f)
        return footers[f].num_row_groups

    units = _file_units("parquet", list(footers), split, row_groups)
    if not units:
        where = files[0].parent if files else "?"
        raise ValueError(
            f"no readable parquet shards with documents among {len(files)} file(s) in {where}"
        )
    return units


@functools.lru_cache(maxsize=8)
def _text_docs(path: str, mtime_ns: int) -> tuple[str, ...]:
    # Cached (keyed by mtime, so an edited file is read again): every block of a file reads it all.
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    return tuple(d.strip() for d in re.split(r"\n\s*\n", text) if d.strip())


def _read_text_docs(path: str) -> tuple[str, ...]:
    return _text_docs(path, Path(path).stat().st_mtime_ns)


def _text_units(files: list[Path], split: str) -> list[Unit]:
    def blocks(f: Path) -> int:
        return -(-len(_read_text_docs(str(f))) // TEXT_UNIT_DOCS)  # ceiling division

    return _file_units("text", files, split, blocks)


def list_units(
    split: str, source: str = "auto", data_dir: str | Path | None = None
) -> tuple[str, list[Unit]]:
    """-> (resolved source, units of that split). Raises a clear error when the split would be
    empty."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    source = resolve_source(source, data_dir)
    if source == "synthetic":
        if split == "train":
            base, count = SYN_TRAIN_SEED, SYN_TRAIN_UNITS
        else:
            base, count = SYN_VAL_SEED, SYN_VAL_UNITS
        return source, [Unit("synthetic", None, base + u) for u in range(count)]
    if source == "fineweb":
        directory = default_data_dir() if data_dir is None else Path(data_dir)
        files = list_parquet_files(directory)
        if len(files) < 2:
            raise FileNotFoundError(
                f"found {len(files)} parquet shard(s) in {directory}; need at least 2 (the last "
                f"one is the val split). Download with: uv run python -m nanochat.dataset -n 8 "
                "(or use "
                f"--data-dir / source 'synthetic')"
            )
        return source, _parquet_units(files, split)
    # source == "dir"
    if data_dir is None:
        raise ValueError("source 'dir' needs a data_dir (--data-dir PATH)")
    directory = Path(data_dir)
    if not directory.is_dir():
        raise FileNotFoundError(f"--data-dir {directory} does not exist or is not a directory")
    files = list_parquet_files(directory)
    if files:
        units = _parquet_units(files, split)
    else:
        texts = _files_with_suffix(directory, TEXT_SUFFIXES)
        if not texts:
            raise FileNotFoundError(f"--data-dir {directory} has no .parquet, .txt or .md files")
        units = _text_units(texts, split)
    if not any(len(load_unit(u)) for u in units):  # stops at the first unit with documents
        raise ValueError(
            f"--data-dir {directory}: the {split!r} split has no documents (the last file, or "
            f"every {VAL_EVERY}th document of a single file, is val); add more data"
        )
    return source, units


# --------------------------------------------------------------------------------------------------
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
    # first/total: where the unit's documents start in their file, and how many the file has, so
    # that a single-file corpus can tell val documents from train ones
    if unit.kind == "parquet":
        parquet_file = read_parquet_footer(unit.path)
        table = parquet_file.read_row_group(unit.index, columns=["text"])
        docs = table.column("text").to_pylist()
        metadata = parquet_file.metadata
        first = sum(metadata.row_group(i).num_rows for i in range(unit.index))
        total = metadata.num_rows
    elif unit.kind == "text":
        all_docs = _read_text_docs(unit.path)
        first = unit.index * TEXT_UNIT_DOCS
        total = len(all_docs)
        docs = list(all_docs[first : first + TEXT_UNIT_DOCS])
    elif unit.kind == "synthetic":
        docs = _load_synthetic(unit.index)
        first = total = 0
    else:
        raise ValueError(f"unknown unit kind {unit.kind!r}")
    # a null row becomes an empty document: it still holds its slot, so positions stay valid
    docs = [d if isinstance(d, str) else "" for d in docs]
    if unit.doc_split is not None:
        want_val = unit.doc_split == "val"
        docs = [d for j, d in enumerate(docs) if _is_val_doc(first + j, total) == want_val]
    if unit.nparts > 1:
        docs = docs[unit.part :: unit.nparts]
    return docs


def shard_units(units: list[Unit], rank: int, world_size: int) -> list[Unit]:
    """Rank r takes every world_size-th unit. With fewer units than ranks, each unit is split by
    document instead (doc j of a unit goes to rank j % world_size), so no rank is left without
    data."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if len(units) >= world_size:
        return units[rank::world_size]
    return [replace(u, part=rank, nparts=world_size) for u in units]


# --------------------------------------------------------------------------------------------------
# iterating


def parquets_iter_batched(
    split: str, start: int = 0, step: int = 1, data_dir: str | Path | None = None
) -> Iterator[list[str]]:
    """One pass over the parquet row groups of a split, yielding each row group's texts. data_dir
    None -> the downloaded shards. start/step pick every step-th row group (e.g. start=rank,
    step=world_size)."""
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
    """One pass over the documents of a split. doc_cap crops each document to that many
    characters; max_chars stops after that many characters in total (the last document is cropped
    to fit)."""
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


if __name__ == "__main__":
    # `uv run python -m nanochat.dataset -n N`, the command every message names, downloads shards
    from nanochat.shard_download import main

    sys.exit(main())
