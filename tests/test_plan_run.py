"""scripts/plan_run.py and `run_aquarat_small.sh --plan`: the gpu profile's plan, stage by stage,
printed before anything runs."""

import os
import subprocess
from pathlib import Path

from scripts import plan_run

REPO = Path(__file__).resolve().parents[1]


def test_plan_follows_the_model_and_the_profile():
    rows, sizes = plan_run.plan(plan_run.parse_args(["--depth", "8", "--gpus", "8"]))
    by_stage = {r["stage"]: r for r in rows}
    base = by_stage["base"]
    # 20 tokens per budget parameter, 524,288 tokens a step (the README's d8 figures)
    assert base["steps"] == 20 * sizes["budget"] // 524288 == 3520
    assert base["flops"] == base["tokens"] * sizes["flops_per_token"]
    assert [r["stage"] for r in rows][-6:] == [
        "mid",
        "eval_mid",
        "sft",
        "eval_sft",
        "rl",
        "eval_rl",
    ]
    # eight GPUs take an eighth of one GPU's compute time for pretraining
    one, _ = plan_run.plan(plan_run.parse_args(["--depth", "8", "--gpus", "1"]))
    overhead = 60.0
    ratio = (one[3]["seconds"] - overhead) / (base["seconds"] - overhead)
    assert abs(ratio - 8) < 1e-9
    deeper, _ = plan_run.plan(plan_run.parse_args(["--depth", "20", "--gpus", "8"]))
    assert deeper[3]["flops"] > 40 * base["flops"]


def test_orchestrator_plan_prints_the_table_and_runs_nothing(tmp_path):
    res = subprocess.run(
        [
            "bash",
            str(REPO / "run_aquarat_small.sh"),
            "--plan",
            "--no-sync",
            "--profile",
            "gpu",
            "--cpu-rehearsal",
            "--nproc",
            "2",
            "--depth",
            "8",
            "--gpu-hourly-price",
            "3.5",
            "--run",
            "planned",
        ],
        cwd=REPO,
        env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "gpu profile, depth 8" in res.stdout and "2 GPU(s)" in res.stdout
    assert "| rl | 300 |" in res.stdout and "| **total** |" in res.stdout and "$" in res.stdout
    assert "[pipeline] tokenizer" not in res.stdout
    assert not (tmp_path / "runs" / "planned" / "settings").exists()  # no stage, no settings
