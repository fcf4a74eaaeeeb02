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
kept = common.keep_freed_memory_for_reuse() if sys.argv[1] == "init" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
sizes = [48, 40, 36]  # MiB, each above glibc's largest automatic mmap threshold (32 MiB)
def step():  # a step's large tensors, made and freed again every step
    return sum(t[0] for t in [torch.ones(mb * 2**18) for mb in sizes])
step()
before = faults()
for _ in range(4):
    step()
print(kept, (faults() - before) / (4 * sum(sizes) * 2**20 // 4096))  # faults per page
"""


def _transparent_huge_pages_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.exists() and "[always]" in path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.skipif(_transparent_huge_pages_always(), reason="faults come a huge page at a time")
def test_a_cpu_process_reuses_freed_memory_without_page_faults():
    # A CPU training step frees and allocates the same large tensors every step; by default each
    # comes back as fresh pages the kernel faults in and zeroes (a quarter of a pretraining step
    # at the cpu profile's shape). After keep_freed_memory_for_reuse (init_distributed calls it
    # on CPU) they are reused.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))
    }
    env["PYTHONPATH"] = str(REPO)

    def run(mode):
        out = subprocess.run(
            [sys.executable, "-c", REALLOC_FAULTS, mode],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        kept, faults_per_page = out.stdout.split()[-2:]
        return kept, float(faults_per_page)

    kept, after = run("init")
    if kept != "True":
        pytest.skip("not glibc >= 2.35: the 1 GiB mmap threshold is refused (32 MiB at most)")
    assert run("plain")[1] > 0.8  # glibc's default: every page faulted in again
    assert after < 0.3  # (glibc still hands back a little of the heap's top)


def test_init_distributed_keeps_freed_memory_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "keep_freed_memory_for_reuse", lambda: calls.append(1) or True)
    monkeypatch.setenv("NANOCHAT_DEVICE", "cpu")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common.init_distributed()
    assert calls == [1]
    monkeypatch.setenv("NANOCHAT_DEVICE", "meta")  # any device but the CPU: not called
    common.init_distributed()
    assert calls == [1]
