"""Is this machine's NVIDIA driver new enough for the torch build that `uv sync` will install?

Standard library only: run_aquarat_small.sh calls it with the system python3 *before* `uv sync`
(which spends minutes of a billed node downloading ~3 GB of CUDA wheels), and launch_lambda.py
uses it on the laptop to judge the node's driver before shipping anything.

    python3 -m nanochat.driver_check          # exit 0: fine or no NVIDIA GPU; 2: driver too old

The CUDA version comes from uv.lock (the locked `nvidia-cuda-runtime` wheel, which PyPI's torch
depends on), so the check follows the lock file when torch is upgraded. A CUDA major version runs
on any driver at least as new as that major's first release (CUDA's minor-version compatibility).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The oldest driver branch of each CUDA major version (NVIDIA's CUDA compatibility tables).
MIN_DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}


def locked_cuda_major(lock_path: Path = REPO_ROOT / "uv.lock") -> int | None:
    """The highest CUDA major version among the locked nvidia-cuda-runtime wheels, or None."""
    try:
        text = lock_path.read_text()
    except OSError:
        return None
    versions = re.findall(
        r'^name = "nvidia-cuda-runtime(?:-cu\d+)?"\nversion = "(\d+)\.', text, re.M
    )
    return max((int(v) for v in versions), default=None)


def required_driver(lock_path: Path = REPO_ROOT / "uv.lock") -> tuple[int, int] | None:
    """(CUDA major, minimum driver major) for the locked torch, or None when unknown."""
    cuda = locked_cuda_major(lock_path)
    if cuda is None or cuda not in MIN_DRIVER_FOR_CUDA:
        return None
    return cuda, MIN_DRIVER_FOR_CUDA[cuda]


def driver_problem(driver_version: str, lock_path: Path = REPO_ROOT / "uv.lock") -> str | None:
    """A message naming the problem and the fix when driver_version (e.g. '550.90.07') is older
    than the locked torch needs; None when it is new enough or either side is unknown."""
    need = required_driver(lock_path)
    match = re.match(r"\s*(\d+)", driver_version or "")
    if need is None or match is None:
        return None
    cuda, min_driver = need
    if int(match.group(1)) >= min_driver:
        return None
    return (
        f"NVIDIA driver {driver_version.strip()} is too old for this project's torch, which is "
        f"built for CUDA {cuda} and needs driver >= {min_driver}. Fix: update the driver to the "
        f"R{min_driver} branch or newer (Ubuntu: sudo ubuntu-drivers install; Lambda Stack: "
        "sudo apt-get update && sudo apt-get full-upgrade; then reboot), or pick a node image "
        "that has it. To keep this driver, install a torch built for an older CUDA by hand "
        "(uv pip install torch --index-url https://download.pytorch.org/whl/cu126) and run "
        "with --no-sync."
    )


def local_driver_version() -> str | None:
    """The driver version nvidia-smi reports for the first GPU, or None without one. The whole
    output is read before it is parsed: a pipe closed early would kill nvidia-smi with SIGPIPE."""
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    return lines[0] if proc.returncode == 0 and lines else None


def main() -> int:
    version = local_driver_version()
    if version is None:
        return 0  # no NVIDIA GPU (or no driver at all): the CPU path needs no driver
    problem = driver_problem(version)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
