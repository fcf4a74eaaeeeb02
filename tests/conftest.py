"""Test-wide defaults: W&B offline and every stage writing under a throwaway base dir."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("OMP_NUM_THREADS", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(autouse=True)
def base_dir(tmp_path, monkeypatch):
    """Each test gets its own NANOCHAT_BASE_DIR so nothing leaks into ~/.cache/nanochat."""
    base = tmp_path / "nanochat_base"
    base.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    return base


@pytest.fixture
def shared_dir():
    """../shared beside the checkout (reference data, API spec); tests needing it skip where it is absent."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"{SHARED_DIR} is absent (reference data lives beside the checkout, not in it)")
    return SHARED_DIR
