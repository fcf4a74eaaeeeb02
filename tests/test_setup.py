"""Set-up on a bare node: installing uv where the system Python refuses pip (PEP 668), and refusing
to run the CPU profile on a node whose GPUs torch cannot use."""

import glob
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _reachable(host: str, port: int = 443) -> bool:
    try:
        socket.create_connection((host, port), timeout=3).close()
        return True
    except OSError:
        return False


def test_install_uv_on_an_externally_managed_python(tmp_path):
    """Debian's own /usr/bin/python3 is "externally managed" as Ubuntu 24.04's is: pip --user is
    refused, so uv goes into a private venv, from PyPI, with nothing else on PATH."""
    if not glob.glob("/usr/lib/python3*/EXTERNALLY-MANAGED") or not os.access(
        "/usr/bin/python3", os.X_OK
    ):
        pytest.skip("needs a distribution Python marked EXTERNALLY-MANAGED at /usr/bin/python3")
    if shutil.which("uv", path="/usr/bin:/bin"):
        pytest.skip("uv is installed system-wide: nothing to install")
    if not _reachable("pypi.org"):
        pytest.skip("PyPI is unreachable from here")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    res = subprocess.run(
        ["bash", "-c", "set -euo pipefail; source scripts/install_uv.sh; uv --version"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "the system Python is externally managed" in res.stdout
    assert res.stdout.strip().splitlines()[-1].startswith("uv ")
    uv = home / ".local" / "bin" / "uv"
    assert uv.is_symlink() and "uv-venv" in os.readlink(uv)

    # already installed: nothing to install; the one line left says how this terminal (whose PATH
    # lacks ~/.local/bin) finds uv
    again = subprocess.run(
        ["bash", "-c", "set -euo pipefail; source scripts/install_uv.sh"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and "installing" not in again.stdout
    assert again.stdout.count("\n") == 1 and "which this terminal's PATH lacks" in again.stdout


FAKE_NVIDIA_SMI = """#!/bin/sh
# nvidia-smi of a node with an old driver: it sees the GPUs, torch's CUDA build cannot use them
case "$*" in
  *-L*) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
  *driver_version*) echo "535.104.05" ;;
  *) echo "NVIDIA-SMI 535.104.05   Driver Version: 535.104.05   CUDA Version: 12.2" ;;
esac
"""


def test_gpus_that_torch_cannot_use_stop_the_pipeline(base_dir, tmp_path):
    """auto (the default profile) would otherwise pick the CPU profile and run it for hours on a
    billed GPU node. A driver older than the locked torch's CUDA needs is told so before the set-up
    (tests/test_first_day.py covers a driver new enough whose GPUs torch still cannot use)."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (fake_bin / "nvidia-smi").chmod(0o755)
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base_dir),
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "WANDB_MODE": "offline",
    }
    res = subprocess.run(
        ["bash", "run_aquarat_small.sh", "--run", "node"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "NVIDIA driver 535.104.05 is too old" in res.stderr
    assert "built for CUDA 13 and needs driver >= 580" in res.stderr
    assert "[setup]" not in res.stdout  # before uv or uv sync ran
    assert (
        "--no-sync" in res.stderr
        and "--profile cpu" in res.stderr
        and "Traceback" not in res.stderr
    )
    assert not list((base_dir / "runs").glob("*/.done_*"))  # no stage ran


def test_gpu_check_runs_its_cpu_safe_part_and_says_what_it_skipped(tmp_path):
    env = {
        **os.environ,
        "NANOCHAT_PYTHON": str(REPO / ".venv" / "bin" / "python"),
        "OMP_NUM_THREADS": "2",
    }
    res = subprocess.run(
        ["bash", "scripts/gpu_check.sh", str(tmp_path / "out")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## versions_and_bf16: ok" in report and "| torch |" in report
    assert "**PASS**" in report  # on CPU: fp32 against fp32, the plumbing of the comparison
    assert "no CUDA device visible to torch: parts 2-4 need one, skipped" in report
    # and the comparison can fail: with no tolerance at all even identical runs miss it
    bad = subprocess.run(
        [
            env["NANOCHAT_PYTHON"],
            "-m",
            "scripts.gpu_check",
            "--tolerance",
            "-1",
            "--steps",
            "4",
            "--out",
            str(tmp_path / "bad.md"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode != 0 and "**FAIL**" in (tmp_path / "bad.md").read_text()
