"""Helpers shared by the test files that run stages as real subprocesses."""

import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sigkill_after_checkpoints(
    cmd: list[str], env: dict, ckpt_dir: Path, count: int, timeout: float = 240
) -> None:
    """Start `cmd`, SIGKILL it as soon as ckpt_dir holds `count` complete checkpoints, and check it
    died of the kill. Older checkpoints may be pruned meanwhile, so whatever is there counts."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if len(list(Path(ckpt_dir).glob("step_*/meta.json"))) >= count:
                break
            time.sleep(0.01)
        assert proc.poll() is None, (
            "the run ended before it could be killed:\n" + proc.stdout.read().decode()[-2000:]
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
