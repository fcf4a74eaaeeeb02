"""run_aquarat_small.sh: flag checking, and the smoke profile end to end (every stage for a few
steps), then a re-run that skips finished stages and a --from that redoes only the later ones."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_aquarat_small.sh"


def run_pipeline(args, base_dir, timeout=900, extra_env=None):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "WANDB_MODE": "offline", **(extra_env or {})}
    env = {k: v for k, v in env.items() if v != ""}  # "" = unset it
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


def _closed_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again once the socket is: connections are refused


STAGES = ["tokenizer", "tok_eval", "base", "base_loss", "mid", "sft", "rl", "eval_mid", "eval_sft", "eval_rl"]


def test_smoke_profile_runs_every_stage_then_resumes_by_skipping(base_dir):
    # a W&B key but no reachable server: found out once, up front, and every stage logs offline
    unreachable = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}",
                   "WANDB_MODE": ""}
    first = run_pipeline(["--profile", "smoke", "--run", "smk", "--seed", "7", "--gpu-hourly-price", "2.5"],
                         base_dir, extra_env=unreachable)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "is unreachable" in first.stdout and "wandb sync" in first.stdout
    run_dir = base_dir / "runs" / "smk"
    assert list((run_dir / "wandb").glob("offline-run-*"))  # offline runs to sync later
    assert "k" * 40 not in (run_dir / "pipeline.log").read_text()
    assert all((run_dir / f".done_{s}").is_file() for s in STAGES)
    assert not (run_dir / ".done_base_eval").exists()  # CORE needs the downloaded bundle: gpu profile only
    for stage in ["base", "mid", "sft", "rl"]:  # tagged with the run; --seed reached every training stage
        meta = sorted((base_dir / "checkpoints" / stage / "smk").glob("step_*/meta.json"))[-1]
        assert json.loads(meta.read_text())["args"]["seed"] == 7
    rows = [json.loads(line) for line in (run_dir / "chat_eval.jsonl").read_text().splitlines()]
    assert {(r["source"], r["mode"]) for r in rows} == {
        (s, m) for s in ("mid", "sft", "rl") for m in ("generative", "categorical")}
    assert all(r["n"] == 8 and r["task"] == "synthetic_aqua" and r["split"] == "test" for r in rows)
    report_dir = base_dir / "report" / "smk"
    report = (report_dir / "report.md").read_text()
    for heading in ["Tokenizer training", "pretraining", "Mid-training", "Supervised fine-tuning",
                    "Reinforcement learning", "Chat evaluation", "## Accuracy", "## Time per stage"]:
        assert heading in report, heading
    assert "SFT -> RL on the same 8" in report and "cost (USD)" in report
    for png in ["rl_reward.png", "rl_kl.png", "rl_letter_counts.png", "attn_entropy_layers.png",
                "heatmap_rl_layer_0.png"]:
        assert (report_dir / png).is_file() and f"({png})" in report, png
    log = (run_dir / "pipeline.log").read_text()
    assert "[pipeline] rl:" in log and "finished" in log

    # Same command again: nothing is retrained.
    rl_marker = run_dir / ".done_rl"
    stamp = rl_marker.stat().st_mtime_ns
    again = run_pipeline(["--profile", "smoke", "--run", "smk", "--seed", "7"], base_dir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"[pipeline] {s}: done earlier, skipping" in again.stdout for s in STAGES)
    assert rl_marker.stat().st_mtime_ns == stamp

    # --from eval redoes the three evaluations (and the report) only.
    redo = run_pipeline(["--profile", "smoke", "--run", "smk", "--seed", "7", "--from", "eval"], base_dir)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "[pipeline] rl: done earlier, skipping" in redo.stdout
    assert all(f"[pipeline] eval_{s}: done earlier" not in redo.stdout for s in ("mid", "sft", "rl"))
    assert len((run_dir / "chat_eval.jsonl").read_text().splitlines()) == 12  # appended by the re-run

    # Another run (another seed) in the same base dir trains its own checkpoints and writes its own
    # report; the first run's state is untouched.
    sft_meta = sorted((base_dir / "checkpoints" / "sft" / "smk").glob("step_*/meta.json"))[-1]
    sft_stamp = sft_meta.stat().st_mtime_ns
    other = run_pipeline(["--profile", "smoke", "--run", "smk2", "--seed", "8"], base_dir)
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    assert "done earlier" not in other.stdout
    for stage in ["base", "mid", "sft", "rl"]:
        meta = sorted((base_dir / "checkpoints" / stage / "smk2").glob("step_*/meta.json"))[-1]
        assert json.loads(meta.read_text())["args"]["seed"] == 8
    assert sft_meta.stat().st_mtime_ns == sft_stamp
    assert "run `smk2`" in (base_dir / "report" / "smk2" / "report.md").read_text()
    assert "run `smk`" in (base_dir / "report" / "smk" / "report.md").read_text()
