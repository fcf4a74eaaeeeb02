"""run_aquarat_small.sh: flag checking, and the smoke profile end to end (every stage for a few
steps), then a re-run that skips finished stages and a --from that redoes only the later ones."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_aquarat_small.sh"


def run_pipeline(args, base_dir, timeout=900):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), WANDB_MODE="offline")
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--profile", "laptop"], "--profile must be auto, cpu, gpu or smoke"),
    (["--from", "rl-ish"], "--from must be one of"),
    (["--bogus"], "unknown option '--bogus'"),
    (["--run"], "--run needs a value"),
    (["--seed"], "--seed needs a value"),
])
def test_bad_flags_are_refused_before_anything_runs(args, message, base_dir):
    result = run_pipeline(args, base_dir, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (base_dir / "runs").exists()  # refused before any stage (or set-up) started


def test_smoke_profile_runs_every_stage_then_resumes_by_skipping(base_dir):
    first = run_pipeline(["--profile", "smoke", "--run", "smk", "--seed", "7"], base_dir)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = base_dir / "runs" / "smk"
    stages = ["tokenizer", "tok_eval", "base", "base_loss", "mid", "sft", "eval"]
    assert all((run_dir / f".done_{s}").is_file() for s in stages)
    assert not (run_dir / ".done_base_eval").exists()  # CORE needs the downloaded bundle: gpu profile only
    for stage in ["checkpoints/base", "checkpoints/mid", "checkpoints/sft", "tokenizer"]:
        assert any((base_dir / stage).iterdir())
    for stage in ["base", "mid", "sft"]:  # --seed reached every training stage
        meta = sorted((base_dir / "checkpoints" / stage).glob("*/step_*/meta.json"))[-1]
        assert json.loads(meta.read_text())["args"]["seed"] == 7
    rows = [json.loads(line) for line in (run_dir / "chat_eval.jsonl").read_text().splitlines()]
    assert {(r["source"], r["task"], r["split"], r["mode"]) for r in rows} == {
        ("sft", "synthetic_aqua", "test", "generative"), ("sft", "synthetic_aqua", "test", "categorical")}
    assert all(r["n"] == 8 for r in rows)
    report = (base_dir / "report" / "report.md").read_text()
    for heading in ["Tokenizer training", "pretraining", "Mid-training", "Supervised fine-tuning", "Chat evaluation"]:
        assert heading in report
    log = (run_dir / "pipeline.log").read_text()
    assert "[pipeline] sft:" in log and "finished" in log

    # Same command again: nothing is retrained.
    sft_marker = run_dir / ".done_sft"
    stamp = sft_marker.stat().st_mtime_ns
    again = run_pipeline(["--profile", "smoke", "--run", "smk", "--seed", "7"], base_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"[pipeline] {s}: done earlier, skipping" in again.stdout for s in stages)
    assert sft_marker.stat().st_mtime_ns == stamp

    # --from eval redoes the evaluation (and the report) only.
    redo = run_pipeline(["--profile", "smoke", "--run", "smk", "--seed", "7", "--from", "eval"], base_dir)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "[pipeline] sft: done earlier, skipping" in redo.stdout
    assert "[pipeline] eval: done earlier" not in redo.stdout and "[pipeline] eval: " in redo.stdout
    assert len((run_dir / "chat_eval.jsonl").read_text().splitlines()) == 4  # appended by the re-run
