"""Device/dtype detection and base-dir handling."""

import pytest
import torch

from nanochat import common, files


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
