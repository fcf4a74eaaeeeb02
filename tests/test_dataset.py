"""Dataset sources (dir / synthetic / fineweb layout), and the shard downloader against a loopback
stand-in for the Hub's file endpoint."""

import hashlib
import http.server
import os
import random
import socket
import subprocess
import sys
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat import dataset as ds
from nanochat import shard_download as sd

REPO = "someone/tiny-corpus"


# ---------------------------------------------------------------------------------- local sources


def _write_parquet(path, docs, row_group_size=5, column="text"):
    pq.write_table(pa.table({column: docs}), path, row_group_size=row_group_size)


def test_dir_parquet_split_by_file(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    _write_parquet(d / "a.parquet", [f"a{i}" for i in range(12)])
    _write_parquet(d / "b.parquet", [f"b{i}" for i in range(7)])
    (d / "c.parquet.tmp").write_bytes(b"partial download: never listed")
    assert [p.name for p in ds.list_parquet_files(d)] == ["a.parquet", "b.parquet"]
    assert list(ds.text_iterator("train", data_dir=d)) == [f"a{i}" for i in range(12)]
    assert list(ds.text_iterator("val", source="dir", data_dir=d)) == [f"b{i}" for i in range(7)]
    assert [len(b) for b in ds.parquets_iter_batched("train", data_dir=d)] == [5, 5, 2]
    assert [b[0] for b in ds.parquets_iter_batched("train", start=1, step=2, data_dir=d)] == ["a5"]
    assert list(ds.text_iterator("train", data_dir=d, doc_cap=1, max_chars=3)) == ["a", "a", "a"]
    assert "".join(ds.text_iterator("train", data_dir=d, max_chars=5)) == "a0a1a"


def test_single_file_split_by_docs(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    docs = [f"doc {i}" for i in range(45)]
    (d / "book.txt").write_text("\n\n".join(docs) + "\n")
    train = list(ds.text_iterator("train", data_dir=d))
    val = list(ds.text_iterator("val", data_dir=d))
    assert val == ["doc 19", "doc 39"] and sorted(train + val) == sorted(docs)
    # a tiny single file still gets a val document: its last one
    (d / "book.txt").write_text("one\n\ntwo\n\nthree")
    assert list(ds.text_iterator("val", data_dir=d)) == ["three"]


def test_dir_text_files_split_by_file(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "1.md").write_text("# Title\nline\n\nsecond para\n")
    (d / "2.txt").write_text("val doc")
    (d / "ignored.csv").write_text("x")
    assert list(ds.text_iterator("train", data_dir=d)) == ["# Title\nline", "second para"]
    assert list(ds.text_iterator("val", data_dir=d)) == ["val doc"]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(ds.text_iterator(data_dir=tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .parquet, .txt or .md"):
        list(ds.text_iterator(data_dir=tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    _write_parquet(bad / "x.parquet", ["a"], column="content")
    with pytest.raises(ValueError, match=r"x\.parquet.*no 'text' column"):
        list(ds.text_iterator(data_dir=bad))
    (bad / "x.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"not a readable parquet file .*x\.parquet"):
        list(ds.text_iterator(data_dir=bad))
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("only one doc")
    with pytest.raises(ValueError, match="'train' split has no documents"):
        list(ds.text_iterator("train", data_dir=one))
    with pytest.raises(FileNotFoundError, match="need at least 2"):
        list(ds.text_iterator("train", source="fineweb"))
    with pytest.raises(ValueError, match="unknown data source"):
        list(ds.text_iterator(source="web"))


def test_auto_source(base_dir, capsys):
    pytest.importorskip("tasks.synthetic_aqua")
    ds._synthetic_note_shown = False
    assert ds.resolve_source("auto") == "synthetic"
    assert "synthetic corpus" in capsys.readouterr().out
    train = list(ds.text_iterator("train", source="synthetic", max_chars=20_000))
    val = list(ds.text_iterator("val", source="auto"))
    assert len(val) == ds.SYN_VAL_UNITS * ds.SYN_DOCS_PER_UNIT and not set(train) & set(val)
    assert list(ds.text_iterator("val", source="synthetic")) == val  # deterministic
    out = base_dir / "base_data"
    out.mkdir()
    for i in range(2):
        _write_parquet(out / ds.shard_name(i), [f"s{i}"])
    assert ds.resolve_source("auto") == "fineweb"
    assert list(ds.text_iterator("val")) == ["s1"]


# ------------------------------------------------------------------------------------- downloader


class Hub:
    """The Hub's file endpoint, GET /datasets/<repo>/resolve/main/<name>, as huggingface_hub's
    http_get reads it: Content-Length, Range requests answered 206 with Content-Range, and 416 past
    the end. Faults can be injected per file. No Xet headers: the library's Xet path is never taken.
    """

    def __init__(self, files):
        self.files = dict(files)
        self.fail = {}  # name -> number of 500s still to return
        self.drop = {}  # name -> (times, bytes): send only this many body bytes, then hang up
        self.log = []  # (name, Range header or None, status)
        self.auth = []  # the Authorization header of each request, None where there was none
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                hub.auth.append(self.headers.get("Authorization"))
                prefix = f"/datasets/{REPO}/resolve/main/"
                name = self.path[len(prefix) :] if self.path.startswith(prefix) else None
                rng = self.headers.get("Range")
                if name not in hub.files:
                    return self._status(name, rng, 404)
                if hub.fail.get(name, 0) > 0:
                    hub.fail[name] -= 1
                    return self._status(name, rng, 500)
                data, start = hub.files[name], 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        return self._status(name, rng, 416)
                body = data[start:]
                hub.log.append((name, rng, 206 if rng else 200))
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                times, nbytes = hub.drop.get(name, (0, 0))
                if times > 0:
                    hub.drop[name] = (times - 1, nbytes)
                    self.wfile.write(body[:nbytes])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def _status(self, name, rng, code):
                hub.log.append((name, rng, code))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _parquet_bytes(tmp_path, i, n_docs=300):
    # hex noise: barely compressible, so the file spans several 64 KiB chunks
    rng = random.Random(i)
    p = tmp_path / f"src_{i}.parquet"
    docs = [f"shard {i} document {j} " + rng.randbytes(600).hex() for j in range(n_docs)]
    _write_parquet(p, docs, row_group_size=100)
    return p.read_bytes()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    # huggingface_hub keeps what a dropped connection delivered in whole chunks of 10 MB; a test
    # shard is 360 kB, so chunks of 64 KiB show the resume at work
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    files = {ds.shard_name(i): _parquet_bytes(tmp_path, i) for i in range(3)}
    h = Hub(files)
    yield h
    h.close()


def _main(hub, out, *extra):
    args = ["-n", "3", "--repo", REPO, "--base-url", hub.url, "--out-dir", str(out)]
    return sd.main([*args, "--backoff", "0.01", "--no-progress", *extra])


def test_download_verify_and_skip_present(tmp_path, hub, capsys):
    out = tmp_path / "base_data"
    assert _main(hub, out) == 0
    for name, data in hub.files.items():
        assert (out / name).read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == sorted(hub.files)  # no cache or metadata dirs
    assert "val = shard_00002.parquet" in capsys.readouterr().out
    hub.log.clear()
    assert _main(hub, out) == 0  # everything present and valid: no requests at all
    assert hub.log == []
    assert list(ds.text_iterator("val", source="fineweb", data_dir=out))[0].startswith(
        "shard 2 document 0"
    )


def test_hf_token_is_sent_and_never_printed(tmp_path, hub, monkeypatch, capsys):
    token = "hf_" + "T" * 30
    monkeypatch.setenv("HF_TOKEN", token)
    assert _main(hub, tmp_path / "base_data") == 0
    assert hub.auth and set(hub.auth) == {f"Bearer {token}"}
    captured = capsys.readouterr()
    assert token not in captured.out + captured.err


def test_resume_partial_and_dropped_connection(tmp_path, hub):
    out = tmp_path / "base_data"
    out.mkdir()
    name = ds.shard_name(1)
    data = hub.files[name]
    (out / f"{name}.tmp").write_bytes(data[:1000])  # left behind by a killed earlier run
    hub.drop[ds.shard_name(2)] = (2, 150_000)  # the server hangs up twice mid-body
    assert _main(hub, out, "--workers", "1") == 0
    assert (out / name).read_bytes() == data and not (out / f"{name}.tmp").exists()
    assert (name, "bytes=1000-", 206) in hub.log  # only the missing bytes were fetched
    # what arrived before each hang-up is kept (in whole 64 KiB chunks) and the rest requested
    ranges = [e[1] for e in hub.log if e[0] == ds.shard_name(2)]
    starts = [int(r.split("=")[1].rstrip("-")) for r in ranges[1:]]
    assert (
        ranges[0] is None
        and len(starts) == 2
        and 0 < starts[0] < starts[1] < len(hub.files[ds.shard_name(2)])
    )
    assert (out / ds.shard_name(2)).read_bytes() == hub.files[ds.shard_name(2)]


def test_partial_longer_than_the_file_starts_again(tmp_path, hub):
    out = tmp_path / "base_data"
    out.mkdir()
    name = ds.shard_name(0)
    (out / f"{name}.tmp").write_bytes(b"\0" * (len(hub.files[name]) + 10))  # not a prefix of it
    assert _main(hub, out) == 0
    assert [e[2] for e in hub.log if e[0] == name] == [416, 200]
    assert (out / name).read_bytes() == hub.files[name]


def test_retries_on_500(tmp_path, hub):
    hub.fail[ds.shard_name(0)] = 3
    out = tmp_path / "base_data"
    assert _main(hub, out, "--retries", "3") == 0
    assert [e[2] for e in hub.log if e[0] == ds.shard_name(0)] == [500, 500, 500, 200]
    hub.fail[ds.shard_name(0)] = 5
    (out / ds.shard_name(0)).unlink()
    assert _main(hub, out, "--retries", "2") == 1  # gives up, leaves nothing half-written
    assert not (out / ds.shard_name(0)).exists()


def test_corrupt_files_detected(tmp_path, hub, capsys):
    out = tmp_path / "base_data"
    assert _main(hub, out) == 0
    # a shard damaged on disk is noticed and fetched again
    p = out / ds.shard_name(1)
    p.write_bytes(p.read_bytes()[:-50])
    assert _main(hub, out) == 0
    assert p.read_bytes() == hub.files[ds.shard_name(1)]
    assert "corrupt or incomplete" in capsys.readouterr().err
    # the server sends garbage of the right length: never renamed into place
    hub.files[ds.shard_name(2)] = b"x" * 5000
    (out / ds.shard_name(2)).unlink()
    assert _main(hub, out, "--retries", "1") == 1
    assert "not a valid parquet" in capsys.readouterr().err
    assert not (out / ds.shard_name(2)).exists() and not (out / f"{ds.shard_name(2)}.tmp").exists()


def test_sha256_manifest(tmp_path, hub):
    out = tmp_path / "base_data"
    manifest = tmp_path / "SHA256SUMS"
    lines = [f"{hashlib.sha256(d).hexdigest()}  {n}" for n, d in hub.files.items()]
    lines[0] = "0" * 64 + "  " + ds.shard_name(0)
    manifest.write_text("\n".join(lines) + "\n")
    assert _main(hub, out, "--sha256-manifest", str(manifest), "--retries", "1") == 1
    assert not (out / ds.shard_name(0)).exists() and (out / ds.shard_name(1)).exists()


def _download_cli(out_dir, env, *extra):
    """`python -m nanochat.dataset` in a fresh process, where huggingface_hub reads HF_ENDPOINT and
    HF_HUB_OFFLINE (at import)."""
    args = ["-n", "4", "--retries", "1", "--backoff", "0.01", "--no-progress"]
    return subprocess.run(
        [sys.executable, "-m", "nanochat.dataset", *args, "--out-dir", str(out_dir), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "", **env},
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


@pytest.mark.parametrize("variable", ["NANOCHAT_DATASET_BASE_URL", "HF_ENDPOINT"])
def test_unreachable_hub_one_clear_message(tmp_path, variable):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = _download_cli(tmp_path / "d", {variable: f"http://127.0.0.1:{port}"})
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.count("cannot reach 127.0.0.1") == 1
    assert "--data-dir" in r.stderr and "synthetic" in r.stderr
    assert list((tmp_path / "d").iterdir()) == []  # not even an empty partial file


def test_offline_mode_keeps_present_shards_and_names_the_missing_one(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    for i in range(2):
        _write_parquet(out / ds.shard_name(i), [f"s{i}"])
    r = _download_cli(out, {"HF_HUB_OFFLINE": "1"}, "-n", "3")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("HF_HUB_OFFLINE is set") == 1 and "--data-dir" in r.stderr
    assert f"{out / ds.shard_name(2)} is missing" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == [ds.shard_name(0), ds.shard_name(1)]


def test_shards_needed_follows_the_kept_fraction():
    """The orchestrator's default download: the budget's text over the share the loader trains on,
    plus a shard of margin and the val shard. d8's budget (20 x 92.3M params): 38 with the packing
    that crops nothing, 67 with pretraining's, which keeps 0.546 of the text (37 before, when the
    cropped text was not allowed for: the run repeated its data)."""
    from nanochat.dataloader import KEPT_FRACTION, PRETRAINING_PACKING

    tokens = 20 * 92_275_200
    assert KEPT_FRACTION["continue"] >= 0.9
    assert ds.shards_needed(tokens, KEPT_FRACTION["continue"]) == 38
    assert ds.shards_needed(tokens, KEPT_FRACTION[PRETRAINING_PACKING]) == 67
    assert ds.shards_needed(ds.CHARS_PER_SHARD / ds.CHARS_PER_TOKEN, 1.0) == 3  # exactly one + 2
    with pytest.raises(ValueError, match="kept_fraction"):
        ds.shards_needed(tokens, 0)
