"""Test-wide defaults: W&B offline and every stage writing under a throwaway base dir."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Started with `&` from a non-interactive shell (a script, `nohup cmd &`), the suite inherits
# SIGINT ignored, and so would every pipeline it starts: the Ctrl-C tests would then wait for
# processes that cannot hear it. A terminal's Ctrl-C is what they test, so Python's default
# handling comes back (a Ctrl-C at that script then stops the suite too, as in a terminal).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


# The suite's longest tests, longest first (pytest's slowest-tests report). xdist hands its work
# units out in collection order (after its groups, largest first), so these go first: otherwise a
# two-minute test drawn last leaves the other worker idle at the end. (None of these needs a
# module fixture that takes long to build: moved away from its module, it would be built twice.)
LONGEST_FIRST = [
    "test_nodes.py::test_two_nodes_of_one_process",
    "test_orchestrator.py::test_gpu_profile_rehearsed_on_cpu",
    "test_nodes.py::test_instance_dies_mid_stage",
    "test_faults.py::test_unreachable_services",
    "test_setup.py::test_gpu_check_runs",
    "test_nodes.py::test_auto_resume_replaces_lost_instances",
    "test_chat_stages.py::test_torchrun_sft_and_eval",
    "test_nodes.py::test_launch_nodes_starts_node_0_first",
]


def pytest_collection_modifyitems(items):
    """The longest tests first, the rest in their order (a stable sort: every worker collects
    the same order, as xdist requires)."""

    def rank(item):
        found = [i for i, name in enumerate(LONGEST_FIRST) if name in item.nodeid]
        return found[0] if found else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    """Each test gets its own NANOCHAT_BASE_DIR so nothing leaks into ~/.cache/nanochat."""
    base = tmp_path / "nanochat_base"
    base.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


@pytest.fixture
def one_thread():
    """torch on one thread for the test, as the subprocesses run (OMP_NUM_THREADS=1): a run in
    this process compared bit for bit with a subprocess's must add up in the same order. The
    previous count comes back afterwards, so no later test in the worker inherits it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def shared_dir():
    """../shared beside the checkout (reference data, API spec); tests needing it skip where it is
    absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent (reference data lives beside the checkout, not in it)")
    return SHARED_DIR


# ----------------------------------------------------------------------------------------------
# One smoke-profile pipeline run, shared by test_orchestrator's smoke test and three rows of the
# fault matrix (test_faults.py). It runs from a copy of the checkout whose .env holds secrets (and a
# W&B key with no server behind it: offline runs), is stopped by a Ctrl-C (SIGINT to its process
# group, as a terminal sends it) during base while a second pipeline tries the same run, is stopped
# by a SIGTERM to the script alone during mid, and is then finished by the same command. Every
# command line on the machine is sampled meanwhile. Tests using it share an xdist group, so one
# worker builds it once.

SECRETS = {
    "WANDB_API_KEY": "wandbkey" + "7" * 32,
    "LAMBDA_API_KEY": "secret_lambda_" + "q" * 24,
    "HF_TOKEN": "hf_" + "Z" * 30,
}
# base and mid run longer than the profile's own, so that a signal lands between their checkpoints
SMOKE_ARGS = [
    "--profile",
    "smoke",
    "--no-sync",
    "--run",
    "smk",
    "--seed",
    "7",
    "--gpu-hourly-price",
    "2.5",
    "--stage-args",
    "base=--num-iterations 200 --save-every 20",
    "--stage-args",
    "mid=--num-iterations 60 --save-every 10",
    # W&B (offline: its server is unreachable) in the training stages and the evaluations; the
    # tokenizer stages and base_loss, which log a few numbers through the same Tracker, skip its
    # seconds of start-up
    *[
        a
        for s in ("tokenizer", "tok_eval", "base_loss")
        for a in ("--stage-args", f"{s}=--no-wandb")
    ],
]


def _wait_for(path, proc, timeout=240.0):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, (
            f"ended before {path} appeared:\n" + proc.communicate()[0][-3000:]
        )
        assert time.time() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.01)


def _watch_argv(seen: set, stop) -> None:
    """Every command line on the machine, sampled every 20 ms, until stop is set."""
    while not stop.is_set():
        # os.scandir and raw reads: a scan of ~100 processes in a few tenths of a millisecond
        # (pathlib's glob took ~4x as long, CPU taken from the pipeline it watches)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                fd = os.open(f"/proc/{entry.name}/cmdline", os.O_RDONLY)
                try:
                    chunks = [os.read(fd, 1 << 16)]
                    while chunks[-1]:  # a command line longer than a read: read it all
                        chunks.append(os.read(fd, 1 << 16))
                finally:
                    os.close(fd)
                seen.add(b"".join(chunks).replace(b"\0", b" "))
            except OSError:
                pass  # the process ended meanwhile
        stop.wait(0.02)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupted")
    tree = root / "checkout"
    shutil.copytree(
        REPO_ROOT,
        tree,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "target", "__pycache__", "build", ".env", ".hypothesis"
        ),
    )
    with socket.socket() as sock:  # W&B with a key but no server: offline runs, config and all
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    (tree / ".env").write_text(
        "".join(f"{k}={v}\n" for k, v in SECRETS.items())
        + f"WANDB_BASE_URL=http://127.0.0.1:{closed_port}\n"
    )
    base = root / "base"
    env = {k: v for k, v in os.environ.items() if k not in SECRETS and not k.startswith("WANDB_")}
    env.update(NANOCHAT_BASE_DIR=str(base), NANOCHAT_PYTHON=sys.executable, WANDB_SILENT="true")
    # one thread a process: the other xdist worker has the other core (the tiny model gains
    # nothing from two)
    env["OMP_NUM_THREADS"] = "1"
    cmd = ["bash", str(tree / "run_aquarat_small.sh"), *SMOKE_ARGS]

    started = []

    def start():
        # a session of its own, as a shell starts a pipeline: the Ctrl-C goes to its process group
        proc = subprocess.Popen(
            cmd,
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(proc)
        return proc

    seen: set = set()
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_argv, args=(seen, stop), daemon=True)
    watcher.start()
    ckpt = base / "checkpoints"
    try:
        first = start()
        _wait_for(ckpt / "base" / "smk" / "step_000020" / "meta.json", first)
        second = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=60)
        first_alive = first.poll() is None
        os.killpg(first.pid, signal.SIGINT)
        out_int = first.communicate(timeout=120)[0]
        after_int = sorted(p.parent.name for p in (ckpt / "base" / "smk").glob("step_*/meta.json"))

        again = start()
        _wait_for(ckpt / "mid" / "smk" / "step_000010" / "meta.json", again)
        again.send_signal(signal.SIGTERM)  # the script only, as `kill PID` or a preemption does
        out_term = again.communicate(timeout=120)[0]

        final = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop.set()
        watcher.join()
        for proc in started:  # a failed assertion above must not leave a pipeline running
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    log = (base / "runs" / "smk" / "pipeline.log").read_text()  # before other tests add to the run
    return {
        "base": base,
        "tree": tree,
        "env": env,
        "cmd": cmd,
        "log": log,
        "second": second,
        "first_alive": first_alive,
        "sigint": (first.returncode, out_int),
        "after_int": after_int,
        "sigterm": (again.returncode, out_term),
        "final": final,
        "argv": seen,
    }
