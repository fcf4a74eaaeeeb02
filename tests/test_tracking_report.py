"""Tracking (W&B offline + JSONL mirror) and the report builder, with a real offline W&B run."""

import json
import subprocess
import sys

import pytest

from nanochat import tracking
from nanochat.report import generate_report, write_section
from nanochat.tracking import Tracker, read_jsonl, wandb_mode


def test_wandb_mode_follows_wandb_variables(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_tracker_offline_wandb_and_jsonl(base_dir, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = Tracker("base", run="t1", config={"depth": 2, "lr": 0.02})
    for step in range(3):
        tracker.log({"loss": 3.0 - step, "val/bpb": float("nan") if step == 0 else 1.5}, step=step)
    tracker.summary({"final_loss": 1.0})
    tracker.finish()
    out = capsys.readouterr().out
    assert "wandb sync" in out  # tells the user how to upload the offline run later
    rows = read_jsonl(base_dir / "runs" / "t1" / "base.jsonl")
    logged = [r for r in rows if "step" in r]
    assert [r["loss"] for r in logged] == [3.0, 2.0, 1.0]
    assert logged[0]["val/bpb"] == "nan"  # non-finite values stay valid JSON
    assert rows[0]["config"]["depth"] == 2
    assert any(r.get("event") == "summary" and r["final_loss"] == 1.0 for r in rows)
    offline_runs = list((base_dir / "runs" / "t1" / "wandb").glob("offline-run-*"))
    assert offline_runs, "a real offline W&B run directory should exist for `wandb sync`"


def test_tracker_survives_broken_wandb(base_dir, monkeypatch, capsys):
    import wandb

    def boom(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", boom)
    tracker = Tracker("sft", run="t2", config={})
    tracker.log({"loss": 1.0}, step=0)
    tracker.finish()
    assert "W&B unavailable" in capsys.readouterr().out
    assert read_jsonl(base_dir / "runs" / "t2" / "sft.jsonl")[1]["loss"] == 1.0


def test_read_jsonl_skips_torn_last_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"step": 0, "loss": 1}) + "\n" + '{"step": 1, "lo')
    assert read_jsonl(path) == [{"step": 0, "loss": 1}]


def test_report_orders_sections_and_plots_logged_metrics(base_dir):
    run_dir = base_dir / "runs" / "r"
    run_dir.mkdir(parents=True)
    with open(run_dir / "base.jsonl", "w") as fh:
        for step in range(5):
            fh.write(json.dumps({"step": step, "loss": 5 - step}) + "\n")
    with open(run_dir / "rl.jsonl", "w") as fh:
        for step in range(3):
            row = {"step": step, "rl/mean_reward": step / 3, "attn/entropy/layer_0": 1.0,
                   "attn/entropy/layer_1": 0.5, **{f"rl/letter_pred_counts/{l}": 2 for l in "ABCDE"}}
            fh.write(json.dumps(row) + "\n")
    write_section(base_dir, "sft", "## SFT\nloss 1.0")
    write_section(base_dir, "base_train", "## Base\nloss 2.0")
    report = generate_report(base_dir, "r").read_text()
    assert report.index("## Base") < report.index("## SFT")
    rdir = base_dir / "report"
    for png in ["loss_base.png", "rl_reward.png", "rl_letter_counts.png", "attn_entropy_layers.png"]:
        assert (rdir / png).stat().st_size > 1000
        assert f"({png})" in report
    assert not (rdir / "loss_sft.png").exists()  # nothing logged, nothing drawn


def test_report_script_reset_keeps_previous(base_dir):
    write_section(base_dir, "sft", "## SFT")
    env = {**__import__("os").environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    subprocess.run([sys.executable, "-m", "scripts.report", "--run", "r"], check=True, env=env)
    assert (base_dir / "report" / "report.md").exists()
    subprocess.run([sys.executable, "-m", "scripts.report", "--reset"], check=True, env=env)
    assert (base_dir / "report.previous" / "report.md").exists()
    assert not (base_dir / "report" / "sft.md").exists()


def test_run_name_flag_spellings(monkeypatch):
    import argparse
    from nanochat.tracking import add_tracking_args
    monkeypatch.setenv("NANOCHAT_RUN", "from-env")
    parser = argparse.ArgumentParser()
    add_tracking_args(parser)
    assert parser.parse_args([]).run == "from-env"
    assert parser.parse_args(["--run", "a"]).run == "a"
    assert parser.parse_args(["--run-name", "b"]).run == "b"  # the spelling torchrun lets through
