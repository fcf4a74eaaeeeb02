"""scripts/plan_memory: the memory planner (the real model and optimizers on fake tensors)."""

import argparse

import pytest
import torch

from scripts import plan_memory as pm

GIB = 2**30
# d2 (n_embd 128) on 8 rows of 256 tokens, a 4,096 vocabulary: about 220 MiB at the peak, enough
# above the few MiB of kernel scratch space for the RSS measurement to mean something
SMALL = "--depth 2 --vocab-size 4096 --max-seq-len 256 --device-batch-size 8 --gpus 1 --dtype fp32"


def small_args(extra: str = "") -> argparse.Namespace:
    return pm.parse_args((SMALL + " " + extra).split())


def test_estimate_is_within_20_percent_of_the_step_measured_on_cpu():
    """The planner's peak for base_train's step (fake tensors) against the same step run for real
    in a fresh process (peak RSS above the baseline, glibc mmapping every large allocation)."""
    args = small_args()
    with pm.fake_mode():
        estimate = pm.plan_base(args, 2, torch.float32, args.device_batch_size).total
    measured = pm.measure_cpu(args, 2)
    assert 100 * 2**20 < measured < 1 * GIB  # the step really ran
    assert abs(estimate - measured) / measured < 0.2, (estimate, measured)


def test_base_loss_evaluation_fits_at_its_real_shapes():
    """evaluate_bpb's forward of 32 x 2048 rows at a 65,536 vocabulary: the full fp32 logits would
    be 16 GiB a copy (three of them: ~50 GiB); the chunked per-token path keeps a few GiB."""
    args = pm.parse_args("--depth 4 --device-batch-size 32 --max-seq-len 2048".split())
    with pm.fake_mode():
        peak = pm.plan_base_eval(args, 4, torch.bfloat16, 32)
    assert peak.total < 8 * GIB, peak


def test_optimizer_state_per_rank():
    from nanochat.gpt import GPT, GPTConfig

    model = GPT(
        GPTConfig(sequence_len=16, vocab_size=64, n_layer=3, n_head=2, n_kv_head=2, n_embd=32)
    )
    optimizers = model.setup_optimizers()
    adam = 2 * 4 * (model.transformer.wte.weight.numel() + model.lm_head.weight.numel())
    muon = 4 * sum(p.numel() for p in model.transformer.h.parameters())
    full, share = pm.optimizer_state_bytes(optimizers, 1, False)
    assert full == share == adam + muon
    # 2 ranks: DistMuon's rank 0 keeps the matrices 0, 2, 4, ... of each shape group: of the 12
    # (32, 32) ones 6, of the three (128, 32) and three (32, 128) ones 2 each
    rank0 = 4 * 32 * 32 * (6 + 2 * 4 + 2 * 4)
    _, share = pm.optimizer_state_bytes(optimizers, 2, False)
    assert share == adam + rank0
    _, share = pm.optimizer_state_bytes(optimizers, 2, True)
    assert share == adam // 2 + rank0


def test_cli_table_and_fit(capsys):
    tiny = "--depth 1 --vocab-size 512 --max-seq-len 64 --device-batch-size 8 --gpus 2"
    pm.main((tiny + " --rl-prompt-tokens 16 --rl-new-tokens 16 --gpu-gib 80").split())
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| d1 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["base", "base eval", "mid/SFT", "RL"]
    peaks = [float(r.split("|")[9]) for r in rows]
    assert all(0 < p < 0.01 for p in peaks) and "KV cache" in out
    assert "a 80 GiB card leaves 71.0 GiB" in out and all("| yes |" in r for r in rows)
    # the largest divisor of 8 that fits, halving like base_train's probe: the budget is half of
    # what 8 rows take, so 4 rows or fewer
    budget = peaks[0] / 2
    pm.main((tiny + f" --fit-gib {budget} --print-batch").split())
    assert capsys.readouterr().out.strip() in ("4", "2", "1")
    with pytest.raises(SystemExit, match="not even one row"):
        pm.main((tiny + " --fit-gib 0.000001 --print-batch").split())
