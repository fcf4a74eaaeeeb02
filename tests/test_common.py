"""Device/dtype detection and base-dir handling."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat import common, files

REPO = Path(__file__).resolve().parents[1]


def test_base_dir_follows_env(base_dir):
    assert files.get_base_dir() == base_dir


def test_dtype_fp32_on_cpu_and_env_override(monkeypatch):
    monkeypatch.delenv("NANOCHAT_DTYPE", raising=False)
    assert common.autodetect_dtype(torch.device("cpu")) == torch.float32
    monkeypatch.setenv("NANOCHAT_DTYPE", "bfloat16")
    assert common.autodetect_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("NANOCHAT_DTYPE", "float64")
    with pytest.raises(ValueError, match="NANOCHAT_DTYPE"):
        common.autodetect_dtype(torch.device("cpu"))


@pytest.mark.parametrize("name", ["fp16", "float16"])
def test_fp16_is_refused_with_what_to_use_instead(monkeypatch, name):
    # no grad scaler anywhere: fp16 training would silently underflow, so the env knob refuses it
    monkeypatch.setenv("NANOCHAT_DTYPE", name)
    with pytest.raises(ValueError, match=f"NANOCHAT_DTYPE={name} is not supported") as err:
        common.autodetect_dtype(torch.device("cpu"))
    assert "bf16" in str(err.value) and "fp32" in str(err.value) and "grad scaler" in str(err.value)


def test_single_process_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = common.init_distributed()
    assert (info.is_ddp, info.rank, info.world_size, info.is_main) == (False, 0, 1, True)


def test_peak_flops_unknown_on_cpu():
    assert common.peak_flops(torch.device("cpu")) is None


REALLOC_FAULTS = """
import resource, sys, torch
from nanochat import common
if sys.argv[1] == "init":
    common.init_distributed()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
sizes = [48, 8, 33]  # MiB: a step's large tensors, made and freed again every step
def step():
    return sum(t[0] for t in [torch.ones(mb * 2**18) for mb in sizes])
step()
before = faults()
for _ in range(4):
    step()
print((faults() - before) / (4 * sum(sizes) * 2**20 // 4096))  # faults per page of each step
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_process_reuses_freed_memory_without_page_faults(monkeypatch):
    # A CPU training step frees and allocates the same large tensors every step; by default each
    # comes back as fresh pages the kernel faults in and zeroes (a quarter of a pretraining step
    # at the cpu profile's shape). After init_distributed on CPU they are reused.
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    env = {**os.environ, "NANOCHAT_DEVICE": "cpu", "PYTHONPATH": str(REPO)}

    def faults_per_page(mode):
        out = subprocess.run(
            [sys.executable, "-c", REALLOC_FAULTS, mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.split()[-1])

    assert faults_per_page("plain") > 0.9  # glibc's default: every page faulted in again
    assert faults_per_page("init") < 0.4  # (not 0: glibc still returns some of the heap's top)
