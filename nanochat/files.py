"""Where the run's files go (the base dir), writing them so that a crash or a full disk never leaves
half of one, and hashing them. No torch here: the tokenizer stages and the report start faster."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a directory entry: a rename lives there, and survives a power cut only once synced."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse to fsync a directory; the rename has still happened
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary name beside `path`; when the block succeeds the file is synced and renamed
    onto `path`. Readers see the old file or the whole new one, never a part. An OSError names
    `path` (a failed write() names nothing), and the temporary file is always removed."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the data must be on disk before the rename makes it the real file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename == str(path):
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from exc
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def get_base_dir() -> Path:
    """Root for data, tokenizer, checkpoints, runs and the report (NANOCHAT_BASE_DIR)."""
    # expanduser: a "~/..." that no shell expanded (a quoted export, a .env read by python-dotenv)
    # would otherwise make a directory literally named "~"
    base = Path(os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat")
    base = base.expanduser()
    base.mkdir(parents=True, exist_ok=True)
    return base


def free_space(path: str | Path) -> str:
    """'1.2 GB free' (or MB) on the filesystem holding path (or its nearest existing parent), for
    the messages of writes that failed: a full disk should say so, and how full."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "free space unknown"
    return f"{free / 1e9:.1f} GB free" if free >= 1e9 else f"{free / 1e6:.1f} MB free"
