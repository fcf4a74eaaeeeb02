"""Download FineWeb-Edu parquet shards from the Hugging Face Hub into <base>/base_data/.

Run as `uv run python -m nanochat.dataset -n N`: shards 0..N-1 of
karpathy/fineweb-edu-100b-shuffle, the
last of them the val split. huggingface_hub does the HTTP: the Hub's URL layout, HF_TOKEN (or a
saved `hf auth login`), HF_ENDPOINT, HF_HUB_OFFLINE, redirects to its CDN, and a connection dropped
mid-file picked up with a Range request. This module adds what the pipeline needs on top, each
for a reason measured against huggingface_hub 2.4 (see download_shard): a partial file kept across
runs, retries on HTTP 5xx, every file checked as parquet (and against an optional sha256
manifest), and one clear line when the Hub cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from nanochat.dataset import (
    check_text_column,
    default_data_dir,
    list_parquet_files,
    read_parquet_footer,
    shard_name,
)
from nanochat.files import file_sha256

DEFAULT_REPO = "karpathy/fineweb-edu-100b-shuffle"
NUM_SHARDS = 1823  # shard_00000.parquet .. shard_01822.parquet


class DownloadError(RuntimeError):
    """A shard could not be downloaded; the message says why and what to do."""


class HubUnreachable(DownloadError):
    """No connection to the Hub at all (or HF_HUB_OFFLINE is set): every shard would fail alike."""


def parquet_problem(path: Path, sha256: str | None = None) -> str | None:
    """Why path is not a sound shard (not parquet, no `text` column, wrong sha256), or None."""
    try:
        check_text_column(read_parquet_footer(path), path)
    except Exception as e:
        return f"not a valid parquet file ({str(e)[:160]})"
    if sha256 is not None and file_sha256(path) != sha256:
        return "its sha256 does not match the manifest"
    return None


def read_sha256_manifest(path: str | Path) -> dict[str, str]:
    """`sha256sum` output format: '<hex>  <file name>' per line."""
    manifest = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise ValueError(f"{path}:{n}: expected '<sha256 hex>  <file name>', got {line!r}")
        manifest[parts[1].lstrip("*")] = parts[0].lower()
    return manifest


def _fetch_rest(url: str, partial: Path) -> None:
    """Append to `partial` the bytes it still lacks (all of them when it is empty)."""
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    try:
        with open(partial, "ab") as f:  # append mode starts at the end: tell() is the resume offset
            http_get(
                url,
                f,
                resume_size=f.tell(),
                headers=build_hf_headers(),  # the token, when there is one
                displayed_filename=partial.name.removesuffix(".tmp"),
            )
    finally:
        if partial.exists() and partial.stat().st_size == 0:  # nothing came: leave no empty file
            partial.unlink()


def download_shard(
    name: str,
    out_dir: str | Path,
    repo: str,
    endpoint: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    sha256: str | None = None,
) -> str:
    """Download one shard to out_dir/name. -> "present" (already there and sound) | "downloaded".

    Why not hf_hub_download(local_dir=out_dir)? Measured with huggingface_hub 2.4: it writes each
    attempt to a temporary file with a fresh random name and deletes it on failure, so a run that
    is killed or gives up starts that file from zero next time (and a SIGKILL leaves the temporary
    file behind for good); it does not retry an HTTP 500 on the download itself; and against a dead
    endpoint it retries the metadata request on a fixed schedule for 23 s per file. So the bytes go
    to out_dir/name.tmp, which the next attempt or run continues through huggingface_hub's
    http_get, and the file is renamed into place only once it opens as parquet (and matches its
    sha256, if given). One copy of each shard, in our data dir, and nothing under
    ~/.cache/huggingface: the rest of the code lists <base>/base_data/*.parquet.
    """
    import httpx2  # huggingface_hub's HTTP client: its errors are what http_get lets through
    from huggingface_hub import hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / name
    partial = out_dir / f"{name}.tmp"
    if final.exists():
        if parquet_problem(final, sha256) is None:
            return "present"  # no request at all: this works offline and with files copied by hand
        print(
            f"{final} is corrupt or incomplete: downloading it again", file=sys.stderr, flush=True
        )
        final.unlink()
    url = hf_hub_url(repo, name, repo_type="dataset", endpoint=endpoint)
    last_error = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 60.0))
        try:
            _fetch_rest(url, partial)
        except OfflineModeIsEnabled:
            raise HubUnreachable(f"HF_HUB_OFFLINE is set and {final} is missing") from None
        except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
            # http_get has already retried the connection five times: the Hub is not there
            raise HubUnreachable(f"cannot reach {urlsplit(url).netloc} ({e})") from None
        except HfHubHTTPError as e:
            status = e.response.status_code
            if status == 404:
                raise DownloadError(
                    f"{url}: HTTP 404 (no such file: check --repo and the shard count)"
                ) from None
            if status in (401, 403):
                raise DownloadError(
                    f"{url}: HTTP {status} (access denied: a gated or private repo needs HF_TOKEN "
                    f"in the environment)"
                ) from None
            if status == 416:  # our partial file is not a prefix of theirs: start it again
                partial.unlink()
            elif status != 429 and status < 500:
                raise DownloadError(f"{url}: unexpected HTTP {status}") from None
            last_error = f"HTTP {status}"
            continue
        except httpx2.TransportError as e:  # dropped more often than http_get resumes; kept
            last_error = f"{type(e).__name__}: {str(e)[:160]}"
            continue
        problem = parquet_problem(partial, sha256)
        if problem is not None:
            partial.unlink()  # resuming a corrupt file cannot help
            last_error = f"downloaded file: {problem}"
            continue
        os.replace(partial, final)
        return "downloaded"
    raise DownloadError(f"{name}: giving up after {retries + 1} attempts; last error: {last_error}")


def download_shards(
    names: list[str],
    out_dir: str | Path,
    repo: str,
    endpoint: str | None = None,
    workers: int = 4,
    retries: int = 5,
    backoff: float = 1.0,
    manifest: dict[str, str] | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """Download the named shards, `workers` at a time. -> {name: "present" | "downloaded"}."""
    from tqdm.contrib.concurrent import thread_map

    unreachable = threading.Event()

    def one(name: str) -> str | DownloadError | None:
        if unreachable.is_set():
            return None  # the others would wait out the same timeouts for nothing
        try:
            return download_shard(
                name, out_dir, repo, endpoint, retries, backoff, (manifest or {}).get(name)
            )
        except DownloadError as e:
            if isinstance(e, HubUnreachable):
                unreachable.set()
            return e

    outcomes = thread_map(
        one, names, max_workers=max(1, workers), desc="shards", unit="shard", disable=not progress
    )
    errors = [o for o in outcomes if isinstance(o, DownloadError)]
    for e in errors:
        if isinstance(e, HubUnreachable):
            raise e
    if errors:
        raise DownloadError("; ".join(str(e) for e in errors[:5]))
    return dict(zip(names, outcomes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="uv run python -m nanochat.dataset",
        description="Download pretraining shards (parquet) from a Hugging Face dataset repo into "
        "<base>/base_data/. Of the shards present, the LAST one (by name) is the validation "
        "split and all others are training data, so download at least 2.",
        epilog="huggingface_hub's variables apply: HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE, "
        "HF_HUB_DOWNLOAD_TIMEOUT (seconds, default 10).",
    )
    parser.add_argument(
        "-n",
        "--num-shards",
        type=int,
        default=-1,
        help=f"download shards 0..N-1 (-1: all {NUM_SHARDS}); shard N-1 becomes val",
    )
    parser.add_argument(
        "--repo",
        default=os.environ.get("NANOCHAT_DATASET_REPO") or DEFAULT_REPO,
        help=f"HF dataset repo id (env NANOCHAT_DATASET_REPO; default {DEFAULT_REPO})",
    )
    # None leaves the choice to huggingface_hub: HF_ENDPOINT, else huggingface.co. Ours comes first
    # so that the shards can come from one mirror while `datasets` (AQuA-RAT) follows HF_ENDPOINT.
    parser.add_argument(
        "--base-url",
        default=os.environ.get("NANOCHAT_DATASET_BASE_URL") or None,
        help="hub URL (env NANOCHAT_DATASET_BASE_URL, else HF_ENDPOINT, else huggingface.co)",
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
        "--sha256-manifest",
        default=None,
        help="optional sha256sum-format file ('<hex>  shard_00000.parquet' lines) to verify",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars, logging

    n = NUM_SHARDS if args.num_shards == -1 else args.num_shards
    if n < 1:
        parser.error(f"--num-shards must be >= 1 or -1 (all), got {args.num_shards}")
    if n > NUM_SHARDS:
        print(
            f"note: the dataset has {NUM_SHARDS} shards; downloading all of them", file=sys.stderr
        )
        n = NUM_SHARDS
    out_dir = Path(args.out_dir) if args.out_dir else default_data_dir()
    manifest = read_sha256_manifest(args.sha256_manifest) if args.sha256_manifest else None
    if args.no_progress:
        disable_progress_bars()
    # its warnings (one per retry) would bury the one line that says what went wrong
    logging.set_verbosity_error()
    print(
        f"downloading {n} shard(s) of {args.repo} from {args.base_url or constants.ENDPOINT} "
        f"into {out_dir} ({args.workers} workers)",
        flush=True,
    )
    t0 = time.time()
    names = [shard_name(i) for i in range(n)]
    try:
        results = download_shards(
            names,
            out_dir,
            args.repo,
            args.base_url,
            args.workers,
            args.retries,
            args.backoff,
            manifest,
            progress=not args.no_progress,
        )
    except HubUnreachable as e:
        print(
            f"error: {e}.\nCheck the network, or point --base-url (or HF_ENDPOINT) at a mirror. "
            f"Meanwhile, train on local files with --data-dir PATH (parquet with a 'text' column, "
            f"or .txt/.md) or on the offline synthetic corpus (--source synthetic).",
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
        f"done in {time.time() - t0:.1f}s: {fresh} downloaded, {len(results) - fresh} already "
        f"present"
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
