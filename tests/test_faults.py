"""Faults and hostile input (issue 13's fault matrix), one test per row.

Row: hostile completions reaching the RL reward (huge numbers, unicode digits, 100 KB of text,
control characters, `Answer:` repeated) -> a letter or None and a reward of 0 or 1, never an
exception, in bounded time. Property-based with hypothesis, plus the worst cases written out.
"""

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SECRETS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.aqua import extract_letter
from tasks.synthetic_aqua import SyntheticAqua

REPO = Path(__file__).resolve().parents[1]
# the smallest base_train model, fed the synthetic corpus
TINY_FLAGS = "--depth 1 --aspect-ratio 64 --head-dim 32 --max-seq-len 64 --device-batch-size 2"
TINY_FLAGS += " --total-batch-size 128 --source synthetic"


def stage_env(base: Path) -> dict:
    """The environment of a stage run as a subprocess: its own base dir, no W&B, one thread."""
    return {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base),
        "WANDB_MODE": "disabled",
        "OMP_NUM_THREADS": "1",
    }


TASK = SyntheticAqua("test", num_examples=5)
CONV = TASK[0]
LETTERS = {None, "A", "B", "C", "D", "E"}
PIECES = [
    "Answer:",
    "Answer: ",
    "answer is",
    "(",
    ")",
    "C",
    "E",
    "F",
    "=",
    "=>",
    "\n",
    " ",
    ".",
    "-",
    "1e308",
    "9" * 400,
    "٣",
    "３",
    "\u200b",
    "\x00",
    "\x1b[31m",
    "**",
    "$",
    "%",
    "option",
    "A)",
    "1/3",
    "0.5",
    "yes",
    "no",
]


def check(completion: str, options=None) -> None:
    t0 = time.perf_counter()
    letter = extract_letter(completion, options)
    reward, _ = TASK.reward(CONV, completion, finished=True, format_bonus=0.5)
    assert letter in LETTERS and reward in (0.0, 0.5, 1.0, 1.5)
    assert time.perf_counter() - t0 < 2.0, (
        f"{len(completion)} chars took {time.perf_counter() - t0:.1f} s"
    )


option_lists = st.one_of(
    st.none(),
    st.just(CONV["options"]),
    st.lists(
        st.text(max_size=30), max_size=7
    ),  # malformed options must not crash the fallback either
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=3000), option_lists)
def test_any_text_gets_a_reward_without_raising(completion, options):
    check(completion, options)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIECES), max_size=400).map("".join), option_lists)
def test_answer_shaped_noise_gets_a_reward_without_raising(completion, options):
    check(completion, options)


def test_the_worst_cases_written_out():
    options = CONV["options"]
    for completion in [
        "Answer: " * 20_000,  # the statement repeated 20k times
        "x" * 100_000,  # 100 KB with no answer
        ("step 1 = 2\n" * 10_000) + "Answer: C",  # a long rationale, then an answer
        "9" * 50_000,  # a 50,000-digit number against the options
        "1e308 * 1e308 = inf\nnan",  # overflow and not-a-number
        "٣٤٥ ３４５ Answer: \u0663",  # unicode digits
        "\x00\x01\x1b[31mAnswer: B\x7f",  # control characters
        "Answer: A\nAnswer: B\nAnswer: A",  # two different letters: hedging earns 0
    ]:
        check(completion, options)
    assert TASK.reward(CONV, "Answer: A\nAnswer: B", finished=True) == (0.0, False)


# Row: the loss becomes NaN/inf (a huge learning rate) -> the stage stops, naming the step; NaN
# weights are never saved over good ones.


def test_a_blown_up_run_stops_at_the_step_and_keeps_the_good_checkpoint(base_dir, tmp_path):

    import torch

    from nanochat.tokenizer import Tokenizer
    from tasks.synthetic_aqua import synthetic_texts

    Tokenizer.train_from_iterator(synthetic_texts(200, seed=7), 512).save(base_dir / "tokenizer")
    env = stage_env(base_dir)
    # lr 1e20: the gradient norm is NaN at step 2 and the loss at step 3 (measured)
    args = TINY_FLAGS.split() + "--num-iterations 8 --save-every 1 --eval-every -1".split()
    args += "--sample-every -1 --embedding-lr 1e20 --unembedding-lr 1e20 --matrix-lr 1e20".split()
    args += ["--no-wandb"]
    ckpt = base_dir / "checkpoints" / "base"
    for log_every, tag in (("1", "logged"), ("4", "quiet")):  # quiet: only the save guard sees it
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "scripts.base_train",
                *args,
                "--tag",
                tag,
                "--log-every",
                log_every,
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
        if tag == "logged":
            assert "the gradient norm is nan at step 2: stopped" in res.stderr
        else:
            assert (
                "the weights are not finite at step 2" in res.stderr and "not saved" in res.stderr
            )
        assert (
            f"step 1 in {ckpt / tag}, is intact" in res.stderr or "is step 1, intact" in res.stderr
        )
        assert sorted(p.name for p in (ckpt / tag).iterdir()) == [
            "step_000001"
        ]  # nothing after the blow-up
        weights = torch.load(ckpt / tag / "step_000001" / "model.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in weights.values())
        assert json.loads((ckpt / tag / "step_000001" / "meta.json").read_text())["step"] == 1


# Rows: SIGINT / SIGTERM to run_aquarat_small.sh mid-stage, then the same command; two pipelines on
# one run at once; secrets in .env during a whole run. One smoke-profile run serves all three (and
# test_orchestrator's smoke test): conftest.py's `smoke_run`, interrupted twice and then finished.


@pytest.mark.xdist_group("smoke_run")  # one worker builds the shared run
def test_ctrl_c_and_sigterm_stop_with_one_line_and_the_same_command_resumes(smoke_run):
    code, out = smoke_run["sigint"]
    assert code == 130, out[-3000:]
    line = re.search(
        r"\[pipeline\] stopped by SIGINT during stage base \(newest checkpoint: step (\d+)\)\. "
        r"Done: tokenizer tok_eval\. The same command goes on: done stages are skipped, base "
        r"resumes from step \d+\.",
        out,
    )
    assert line, out[-3000:]
    base_step = int(line.group(1))
    assert 20 <= base_step < 200 and "Traceback" not in out
    assert smoke_run["after_int"][-1] == f"step_{base_step:06d}"  # the checkpoint it names is there

    code, out = smoke_run["sigterm"]
    assert code == 143, out[-3000:]
    assert (
        "[pipeline] tokenizer: done earlier, skipping" in out
        and "[pipeline] tok_eval: done earlier" in out
    )
    assert f"from step {base_step}" in out  # base resumed where the Ctrl-C left it
    line = re.search(
        r"\[pipeline\] stopped by SIGTERM during stage mid \(newest checkpoint: step (\d+)\)\. "
        r"Done: tokenizer tok_eval base base_loss\.",
        out,
    )
    assert line, out[-3000:]
    mid_step = int(line.group(1))

    final = smoke_run["final"]
    assert final.returncode == 0, final.stdout[-3000:] + final.stderr[-3000:]
    for stage in ("tokenizer", "tok_eval", "base", "base_loss"):
        assert f"[pipeline] {stage}: done earlier, skipping" in final.stdout
    assert f"from step {mid_step}" in final.stdout and "[pipeline] finished" in final.stdout
    base = smoke_run["base"]
    for stage, steps in (("base", 200), ("mid", 60)):
        newest = sorted((base / "checkpoints" / stage / "smk").glob("step_*/meta.json"))[-1]
        assert json.loads(newest.read_text())["step"] == steps
    assert (base / "report" / "smk" / "report.md").is_file()


@pytest.mark.xdist_group("smoke_run")  # one worker builds the shared run
def test_a_second_pipeline_on_the_same_run_is_refused(smoke_run):
    second = smoke_run["second"]
    assert second.returncode == 2 and smoke_run["first_alive"]
    assert "run 'smk' is in use by another pipeline (pid " in second.stderr
    assert "another --run NAME" in second.stderr
    assert (
        smoke_run["log"].count("[pipeline] profile=smoke") == 3
    )  # the three starts; the refused one: nothing
    # and the first went on undisturbed: the resumes above continued its checkpoints to the end


@pytest.mark.xdist_group("smoke_run")  # one worker builds the shared run
def test_secrets_in_env_never_reach_logs_reports_wandb_or_argv(smoke_run):
    base = smoke_run["base"]
    offline_runs = list((base / "runs" / "smk" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert any(
        b"device_batch_size" in p.read_bytes() for p in offline_runs
    )  # W&B config is in there
    written = [p for p in Path(base).rglob("*") if p.is_file()]
    assert len(written) > 50
    outputs = [
        smoke_run["second"].stderr,
        smoke_run["sigint"][1],
        smoke_run["sigterm"][1],
        smoke_run["final"].stdout,
        smoke_run["final"].stderr,
    ]
    argv = b"\n".join(smoke_run["argv"])
    assert (
        b"scripts.base_train" in argv and b"scripts.chat_rl" in argv
    )  # the watcher saw the stages
    for name, secret in SECRETS.items():
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not leaks, f"{name} written to {leaks}"
        assert not any(secret in out for out in outputs), f"{name} printed"
        assert secret.encode() not in argv, f"{name} on a command line"


# Row: the disk fills up while a checkpoint or the report is written -> the error names the path and
# the free space; the previous checkpoint is intact and is what a resume loads; no partial
# checkpoint is ever loaded. For real on a small tmpfs where the machine allows mounting one, and
# always with a write failure injected at the one checkpoint writer.

TINY_BASE = TINY_FLAGS.split() + "--num-iterations 4 --save-every 1 --keep-last 2".split()
TINY_BASE += "--eval-every -1 --sample-every -1 --no-wandb --tag full".split()


def _base_train(base: Path, timeout=300):
    env = stage_env(base)
    return subprocess.run(
        [sys.executable, "-m", "scripts.base_train", *TINY_BASE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def small_filesystem(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({res.stderr.strip()}): the injected write failure "
            f"test below covers the checkpoint writer"
        )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on mnt."""
    filler = mnt / "filler"
    with open(filler, "ab") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(mnt).free - leave))
    return filler


def test_a_full_disk_keeps_the_last_checkpoint_and_the_report(base_dir, small_filesystem, tmp_path):
    import torch

    from nanochat.checkpoint import load_checkpoint
    from nanochat.tokenizer import Tokenizer
    from tasks.synthetic_aqua import synthetic_texts

    tok = Tokenizer.train_from_iterator(synthetic_texts(200, seed=7), 512)
    tok.save(base_dir / "tokenizer")
    reference = _base_train(base_dir)  # uninterrupted, on the roomy disk
    assert reference.returncode == 0, reference.stderr[-2000:]
    ref_ckpt = base_dir / "checkpoints" / "base" / "full"
    size = sum(f.stat().st_size for f in (ref_ckpt / "step_000004").iterdir())

    small = small_filesystem / "base"
    tok.save(small / "tokenizer")
    filler = _fill(
        small_filesystem, leave=int(1.5 * size)
    )  # room for step 1's checkpoint, not step 2's
    full = _base_train(small)
    ckpt = small / "checkpoints" / "base" / "full"
    assert full.returncode != 0 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert f"could not write checkpoint step 2: {ckpt / 'step_000002'}" in full.stderr
    assert "No space left on device" in full.stderr and " MB free on that filesystem" in full.stderr
    assert "The newest complete checkpoint, step 1, is intact: a resume loads it." in full.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "step_000001"
    ]  # no partial step 2 left to load

    # space freed: the same command resumes from step 1 and ends where the reference did
    filler.unlink()
    again = _base_train(small)
    assert again.returncode == 0 and "from step 1" in again.stdout, again.stderr[-2000:]
    ours, _, _ = load_checkpoint(ckpt, step=4)
    theirs, _, _ = load_checkpoint(ref_ckpt, step=4)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)

    # the report: written once, then the disk fills; the rewrite fails naming the file, and the
    # old one stays
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(small)}
    report_cmd = [sys.executable, "-m", "scripts.report", "--run", "default"]
    first = subprocess.run(
        report_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr[-2000:]
    report = small / "report" / "default" / "report.md"
    before = report.read_bytes()
    _fill(small_filesystem, leave=0)
    second = subprocess.run(
        report_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr[-2000:]
    assert "could not write the report: " + str(small / "report" / "default") in second.stderr
    assert "No space left on device (0.0 MB free on that filesystem)" in second.stderr
    assert report.read_bytes() == before


def test_an_injected_write_failure_at_the_checkpoint_writer_keeps_the_previous_one(
    tmp_path, monkeypatch
):
    import errno

    import torch

    import nanochat.checkpoint as ck

    ckpt = tmp_path / "ckpt"
    state = {"w": torch.arange(4.0)}
    ck.save_checkpoint(ckpt, 1, state, [{"m": 1}], {"model_config": {}})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    for target in ("_atomic_torch_save", "write_text_atomic"):  # the payload, then meta.json
        with monkeypatch.context() as m:
            m.setattr(ck, target, disk_full)
            with pytest.raises(
                ck.CheckpointWriteError,
                match=r"could not write checkpoint step 2: .*No space "
                r"left on device \(.* free on that filesystem; a checkpoint here takes about "
                r".*The newest complete checkpoint, step 1, is intact",
            ):
                ck.save_checkpoint(ckpt, 2, {"w": torch.zeros(4)}, [{"m": 2}], {"model_config": {}})
        assert sorted(p.name for p in ckpt.iterdir()) == ["step_000001"]
        loaded, _, meta = ck.load_checkpoint(ckpt)
        assert meta["step"] == 1 and torch.equal(loaded["w"], state["w"])


# Row: Hugging Face / tiktoken / W&B unreachable -> one line each; optional pieces continue and the
# report says what was skipped; required ones stop before training. Each service is a real closed
# port on loopback. (W&B: test_orchestrator's smoke test, a key and no server -> offline runs.)


def test_unreachable_services_stop_before_training_or_are_left_out(base_dir, tmp_path):
    from test_orchestrator import (
        _aqua_stand_in,
        _closed_port,
        _fineweb_stand_in,
        _serve_directory,
        run_pipeline,
    )

    gpu = [
        "--profile",
        "gpu",
        "--cpu-rehearsal",
        "--no-sync",
        "--depth",
        "2",
        "--shards",
        "2",
        "--stage-args",
        "data=--retries 1 --backoff 0.01 --no-progress",
    ]
    closed = f"http://127.0.0.1:{_closed_port()}"
    checkpoints = base_dir / "checkpoints"

    # FineWeb-Edu (required): the data stage is the first, so nothing is trained
    res = run_pipeline(
        gpu + ["--run", "nofineweb"],
        base_dir,
        timeout=300,
        extra_env={"NANOCHAT_DATASET_BASE_URL": closed},
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, (
        res.stdout[-3000:] + res.stderr[-3000:]
    )
    assert res.stdout.count("cannot reach 127.0.0.1") == 1  # the stage's output is tee'd to stdout
    assert (
        "[pipeline] stage data failed (exit 2)" in res.stderr
        and "[pipeline] tokenizer" not in res.stdout
    )
    assert not checkpoints.exists()

    hub = _serve_directory(_fineweb_stand_in(tmp_path / "hub"))
    fineweb = {"NANOCHAT_DATASET_BASE_URL": f"http://127.0.0.1:{hub.server_port}"}
    try:
        # AQuA-RAT from the Hub (required): fetched by the data stage too, before any training
        res = run_pipeline(
            gpu + ["--run", "noaqua"],
            base_dir,
            timeout=300,
            extra_env={**fineweb, "HF_ENDPOINT": closed, "HF_HUB_OFFLINE": ""},
        )
        assert res.returncode == 1 and "Traceback" not in res.stderr, (
            res.stdout[-3000:] + res.stderr[-3000:]
        )
        assert (
            "prepare_aqua: Could not load deepmind/aqua_rat" in res.stdout
        )  # (the stage's output is tee'd)
        assert (
            "Nothing written." in res.stdout
            and "[pipeline] stage data failed (exit 1)" in res.stderr
        )
        assert "[pipeline] tokenizer" not in res.stdout and not checkpoints.exists()

        # the CORE bundle (optional): one line, and the run goes on without base_eval
        aqua = _aqua_stand_in(tmp_path / "aqua_rat")
        args = gpu + [
            "--run",
            "nocore",
            "--aqua-data-dir",
            str(aqua),
            "--stage-args",
            f"base_eval=--bundle-url {closed}/eval_bundle.zip",
        ]
        env = {
            **os.environ,
            "NANOCHAT_BASE_DIR": str(base_dir),
            "WANDB_MODE": "disabled",
            **fineweb,
        }
        proc = subprocess.Popen(
            ["bash", "run_aquarat_small.sh", *args],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        lines = []
        sent = False
        for line in proc.stdout:  # stop it once it has gone past the downloads, in tok_train
            lines.append(line)
            if line.startswith("[tok_train]") and not sent:
                proc.send_signal(signal.SIGTERM)
                sent = True
        proc.wait(timeout=120)
    finally:
        hub.shutdown()
    out = "".join(lines)
    assert (
        "[pipeline] the CORE eval bundle could not be downloaded: base_eval will be left out" in out
    )
    assert "[pipeline] tokenizer:" in out and proc.returncode == 143, out[-3000:]
    # a stage with no checkpoint yet: it starts again (no step to name)
    assert "stopped by SIGTERM during stage tokenizer. Done: data." in out, out[-3000:]
    assert "tokenizer starts again." in out
    subprocess.run(
        [sys.executable, "-m", "scripts.report", "--run", "nocore"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    report = (base_dir / "report" / "nocore" / "report.md").read_text()
    assert "- stage base_eval: not run (the CORE eval bundle could not be downloaded" in report

    # tiktoken's GPT-2/GPT-4 vocabularies (optional): tok_eval notes the skipped comparison, and the
    # report section carries the note
    from nanochat.tokenizer import Tokenizer
    from tasks.synthetic_aqua import synthetic_texts

    Tokenizer.train_from_iterator(synthetic_texts(100, seed=3), 300).save(tmp_path / "tokenizer")
    tok_env = {
        **env,
        "TIKTOKEN_CACHE_DIR": str(tmp_path / "empty_cache"),
        "HTTPS_PROXY": closed,
        "HTTP_PROXY": closed,
        "NANOCHAT_TOKENIZER_DIR": str(tmp_path / "tokenizer"),
    }
    res = subprocess.run(
        [sys.executable, "-m", "scripts.tok_eval", "--run", "nocore", "--download-timeout", "20"],
        cwd=REPO,
        env=tok_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stdout.count("comparison skipped: tiktoken could not load") == 2
    section = (base_dir / "report" / "nocore" / "tok_eval.md").read_text()
    assert "gpt2 comparison skipped" in section


# Row: SIGKILL at a random point of a training stage, same command again -> it continues from the
# last complete checkpoint, and the CPU fp32 final weights equal an uninterrupted run's. base and
# rl: test_base_train.py and test_rl.py (`*sigkill*`); mid and sft here.


@pytest.mark.parametrize(
    "stage, module", [("mid", "scripts.mid_train"), ("sft", "scripts.chat_sft")]
)
def test_sigkill_of_mid_and_sft_resumes_to_the_uninterrupted_weights(
    stage, module, base_dir, tmp_path, one_thread
):
    import torch
    from helpers import sigkill_after_checkpoints
    from test_chat_stages import TINY_DATA, make_base

    from nanochat.checkpoint import find_last_step, load_checkpoint

    make_base(base_dir)
    cmd = [
        sys.executable,
        "-m",
        module,
        *TINY_DATA,
        "--source-stage",
        "base",
        "--num-iterations",
        "10",
        "--save-every",
        "1",
        "--keep-last",
        "0",
        "--eval-every",
        "0",
        "--no-wandb",
        "--tag",
        "kill",
    ]
    killed = tmp_path / "killed"
    shutil.copytree(base_dir, killed)

    ckpt = killed / "checkpoints" / stage / "kill"
    sigkill_after_checkpoints(cmd, stage_env(killed), ckpt, 3)
    killed_at = find_last_step(ckpt)
    assert killed_at is not None and 3 <= killed_at < 10
    again = subprocess.run(
        cmd, cwd=REPO, env=stage_env(killed), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0 and f"from step {killed_at}" in again.stdout, again.stderr[-2000:]
    # the uninterrupted reference in this process (one thread, as the subprocesses ran), in the
    # untouched base dir: NANOCHAT_BASE_DIR is already base_dir
    importlib.import_module(module).main(cmd[3:])
    ours, _, _ = load_checkpoint(ckpt, step=10)
    theirs, _, _ = load_checkpoint(base_dir / "checkpoints" / stage / "kill", step=10)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# Row: AQuA-RAT rows malformed in every way, an empty file, a wrong encoding, a split with no valid
# rows -> the rows are reported with split and index, and nothing trains on an empty set. Malformed
# rows and empty splits: test_aqua.py and test_chat_stages.py (test_bad_data_gets_one_line_errors);
# the encodings here.


def test_aqua_files_in_the_wrong_encoding_are_named_not_misread(base_dir, tmp_path, capsys):
    from test_chat_stages import make_base, sft

    from tasks.aqua import AquaRat

    rows = [
        {
            "question": f"{i} + 1 = ?",
            "options": ["A)1", "B)2", "C)3", "D)4", "E)5"],
            "rationale": "Café",
            "correct": "B",
        }
        for i in range(3)
    ]
    rows[1]["rationale"] = "plain ascii"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    latin1 = tmp_path / "latin1"
    latin1.mkdir()
    (latin1 / "test.json").write_bytes(text.encode("latin-1"))  # é is one byte 0xe9: not UTF-8
    task = AquaRat("test", data_dir=latin1)
    assert len(task) == 1 and task[0]["messages"][-1]["content"].startswith("plain ascii")
    err = capsys.readouterr().err
    assert "test row 0 " in err and "test row 2 " in err and "is not UTF-8 (byte 0xe9" in err

    bom = tmp_path / "bom"
    bom.mkdir()
    (bom / "test.json").write_bytes(
        b"\xef\xbb\xbf" + text.encode("utf-8")
    )  # UTF-8 with a BOM: fine
    assert len(AquaRat("test", data_dir=bom)) == 3

    utf16 = tmp_path / "utf16"
    utf16.mkdir()
    for name in ("train.json", "dev.json"):
        (utf16 / name).write_bytes(text.encode("utf-16"))
    make_base(base_dir)
    with pytest.raises(
        SystemExit,
        match=r"train split could not be loaded .*train.json is UTF-16 text, not "
        r"UTF-8: convert it, e.g. iconv -f UTF-16 -t UTF-8",
    ):
        sft(["--aqua-source", "dir", "--aqua-data-dir", str(utf16), "--source-stage", "base"])
    assert not (base_dir / "checkpoints" / "sft").exists()


# Row: a parquet shard truncated or not parquet -> named; re-downloaded (the data stage replaces a
# damaged shard: test_dataset.py test_corrupt_files_detected) or skipped with
# NANOCHAT_BAD_SHARDS=skip; never silently read as empty.


def test_damaged_shards_are_named_then_skipped_only_when_asked(base_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanochat.tokenizer import Tokenizer
    from tasks.synthetic_aqua import synthetic_texts

    Tokenizer.train_from_iterator(synthetic_texts(200, seed=7), 512).save(base_dir / "tokenizer")
    shards = base_dir / "base_data"
    shards.mkdir()
    for i in range(4):
        pq.write_table(
            pa.table({"text": list(synthetic_texts(120, seed=i))}),
            shards / f"shard_{i:05d}.parquet",
            row_group_size=40,
        )
    truncated, garbage = shards / "shard_00001.parquet", shards / "shard_00002.parquet"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    garbage.write_bytes(b"<html>503 Service Unavailable</html>" * 50)  # what a bad proxy hands over
    env = stage_env(base_dir)
    cmd = [
        sys.executable,
        "-m",
        "scripts.base_train",
        *TINY_BASE,
        "--source",
        "fineweb",
        "--num-iterations",
        "2",
    ]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "not a readable parquet file (truncated, or not parquet)" in res.stderr
    assert (
        str(truncated) in res.stderr
        and str(garbage) in res.stderr
        and "NANOCHAT_BAD_SHARDS=skip" in res.stderr
    )
    assert not (base_dir / "checkpoints").exists()

    res = subprocess.run(
        cmd,
        cwd=REPO,
        env={**env, "NANOCHAT_BAD_SHARDS": "skip"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"leaving out {truncated}" in res.stderr and str(garbage) in res.stderr
    meta = json.loads(
        (base_dir / "checkpoints" / "base" / "full" / "step_000002" / "meta.json").read_text()
    )
    assert meta["args"]["source"] == "fineweb"  # it trained, on the good shards


# Row: the tokenizer file corrupted, or from another run (a vocabulary the checkpoint was not
# trained with) -> a clear error naming both. Another run's: test_checkpoint.py
# (test_load_model_refuses_another_tokenizer); a damaged one here, at every kind of stage that
# loads one.


def test_a_damaged_tokenizer_is_named_with_its_twin_file(base_dir):
    from test_chat_stages import make_base

    make_base(base_dir)
    tok_dir = base_dir / "tokenizer"
    ranks, config = tok_dir / "tokenizer.tiktoken", tok_dir / "tokenizer.json"
    raw = bytearray(ranks.read_bytes())
    raw[100] ^= 0x01  # one flipped bit: same size, other merges
    ranks.write_bytes(bytes(raw))
    env = stage_env(base_dir)
    for cmd in (
        [
            "scripts.chat_sft",
            "--source-stage",
            "base",
            "--aqua-source",
            "synthetic",
        ],  # via load_model
        ["scripts.base_train", *TINY_BASE],
        ["scripts.tok_eval"],
    ):
        res = subprocess.run(
            [sys.executable, "-m", *cmd],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert (
            f"{ranks} does not match {config}" in res.stderr and "scripts.tok_train" in res.stderr
        )
    assert not (base_dir / "checkpoints" / "sft").exists()
