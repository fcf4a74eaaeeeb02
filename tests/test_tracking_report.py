"""Tracking (W&B offline + JSONL mirror) and the report builder, with a real offline W&B run."""

import argparse
import json
import math
import subprocess
import sys

import pytest

from nanochat import tracking
from nanochat.report import generate_report, write_section
from nanochat.tracking import Table, Tracker, read_jsonl, wandb_mode


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


def test_tracker_logs_tables_to_wandb_and_a_jsonl_beside_the_stage_log(base_dir, monkeypatch):
    """A Table reaches the offline W&B run's history as a table, the stage's line holds a
    reference to it, and its rows land one JSON object each in the file it names."""
    from test_rl import read_offline_wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    columns = ["step", "question", "text", "letter", "reward", "advantage"]
    tracker = Tracker("rl", run="tab", config={})
    for step in (2, 4):
        rows = [
            [step, "q1", "x | y\nAnswer: B", "B", 1.0, 0.5],
            [step, "q2", "no idea", None, 0.0, -0.5],
        ]
        tracker.log(
            {"rl/acc": 0.5, "rl/samples": Table(columns, rows, file="rl_samples.jsonl")}, step
        )
    tracker.finish()
    run_dir = base_dir / "runs" / "tab"
    logged = [r for r in read_jsonl(run_dir / "rl.jsonl") if "step" in r]
    assert logged[-1]["rl/samples"] == {
        "_type": "table",
        "columns": columns,
        "rows": 2,
        "file": "rl_samples.jsonl",
    }
    samples = read_jsonl(run_dir / "rl_samples.jsonl")
    assert [(r["step"], r["question"], r["letter"]) for r in samples] == [
        (2, "q1", "B"),
        (2, "q2", None),
        (4, "q1", "B"),
        (4, "q2", None),
    ]
    assert samples[0] == dict(zip(columns, [2, "q1", "x | y\nAnswer: B", "B", 1.0, 0.5]))
    history = read_offline_wandb(run_dir)
    tables = [row for row in history if row.get("rl/samples/_type") == '"table-file"']
    assert [(row["_step"], row["rl/samples/nrows"]) for row in tables] == [("2", "2"), ("4", "2")]
    # the table's data as W&B stored it, in the offline run's media folder
    (files,) = run_dir.glob("wandb/offline-run-*/files")
    stored = json.loads((files / json.loads(tables[-1]["rl/samples/path"])).read_text())
    assert stored == {"columns": columns, "data": rows}


def test_table_rejects_ragged_rows_and_paths():
    with pytest.raises(ValueError, match="row 1 has 1 values for 2 columns"):
        Table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="bare file name"):
        Table(["a"], [[1]], file="../elsewhere.jsonl")


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


def test_log_results_logs_extra_but_summarises_only_metrics(base_dir):
    """The one-shot logging of the evaluation scripts: metrics and extra at the step, in the run's
    config, then a summary of the metrics alone and the end event."""
    args = argparse.Namespace(run="t3", no_wandb=True)
    tracking.log_results(
        args,
        "base_loss",
        {"loss/val_bpb": 1.25},
        step=7,
        config={"checkpoint_step": 7},
        extra={"samples/0": "The capital of France is Paris"},
    )
    rows = read_jsonl(base_dir / "runs" / "t3" / "base_loss.jsonl")
    assert [r.get("event") for r in rows] == ["start", None, "summary", "end"]
    assert rows[0]["config"] == {"checkpoint_step": 7}
    assert rows[1] == {
        "step": 7,
        "loss/val_bpb": 1.25,
        "samples/0": "The capital of France is Paris",
    }
    assert rows[2] == {"event": "summary", "loss/val_bpb": 1.25}


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
            row = {
                "step": step,
                "rl/mean_reward": step / 3,
                "attn/entropy/layer_0": 1.0,
                "attn/entropy/layer_1": 0.5,
                **{f"rl/letter_pred_counts/{letter}": 2 for letter in "ABCDE"},
            }
            fh.write(json.dumps(row) + "\n")
    write_section(base_dir, "r", "sft", "## SFT\nloss 1.0")
    write_section(base_dir, "r", "base_train", "## Base\nloss 2.0")
    write_section(base_dir, "other", "base_train", "## Other run")
    report = generate_report(base_dir, "r").read_text()
    assert report.index("## Base") < report.index("## SFT")
    assert "Other run" not in report  # another run's sections stay in its own folder
    rdir = base_dir / "report" / "r"
    for png in [
        "loss_base.png",
        "rl_reward.png",
        "rl_letter_counts.png",
        "attn_entropy_layers.png",
    ]:
        assert (rdir / png).stat().st_size > 1000
        assert f"({png})" in report
    assert not (rdir / "loss_sft.png").exists()  # nothing logged, nothing drawn
    # ... and what is missing is said, with the reason where the pipeline recorded one
    missing = report[report.index("## Not in this report") :]
    assert "Letter-margin histogram: the rl stage logged no rl/letter_margin_hist" in missing
    assert "RL validation accuracy (greedy): the rl stage logged none of rl/acc" in missing
    assert "stage mid: no log yet" in missing and "stage rl: no log" not in missing
    with open(run_dir / "stages.jsonl", "w") as fh:
        fh.write(json.dumps({"stage": "base_eval", "not_run": "gpu profile only"}) + "\n")
    report = generate_report(base_dir, "r").read_text()
    assert "- stage base_eval: not run (gpu profile only)" in report
    assert "stage base_eval: no log yet" not in report


def test_report_script_reset_keeps_previous(base_dir):
    write_section(base_dir, "r", "sft", "## SFT")
    env = {**__import__("os").environ, "NANOCHAT_BASE_DIR": str(base_dir)}
    subprocess.run([sys.executable, "-m", "scripts.report", "--run", "r"], check=True, env=env)
    assert (base_dir / "report" / "r" / "report.md").exists()
    subprocess.run(
        [sys.executable, "-m", "scripts.report", "--run", "r", "--reset"], check=True, env=env
    )
    assert (base_dir / "report" / "r.previous" / "report.md").exists()
    assert not (base_dir / "report" / "r" / "sft.md").exists()


def test_run_name_flag_spellings(monkeypatch):
    import argparse

    from nanochat.tracking import add_tracking_args

    monkeypatch.setenv("NANOCHAT_RUN", "from-env")
    parser = argparse.ArgumentParser()
    add_tracking_args(parser)
    assert parser.parse_args([]).run == "from-env"
    assert parser.parse_args(["--run", "a"]).run == "a"
    assert parser.parse_args(["--run-name", "b"]).run == "b"  # the spelling torchrun lets through


def test_envfile_exports_what_the_environment_lacks(tmp_path, monkeypatch):
    from nanochat.envfile import export_lines

    env = tmp_path / ".env"
    env.write_text(
        "WANDB_PROJECT=from-file\nWANDB_ENTITY=team x\nWANDB_API_KEY=\nNANOCHAT_RUN='quoted run'\n"
        "# a comment\nexport HF_TOKEN=hf_abc\n"
    )
    monkeypatch.setenv("WANDB_ENTITY", "from-env")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("NANOCHAT_RUN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    lines = export_lines(str(env))
    assert "export WANDB_PROJECT=from-file" in lines
    assert "export NANOCHAT_RUN='quoted run'" in lines and "export HF_TOKEN=hf_abc" in lines
    assert not any("WANDB_ENTITY" in line for line in lines)  # the environment wins
    assert not any("WANDB_API_KEY" in line for line in lines)  # empty values are skipped
    out = subprocess.run(
        [
            "bash",
            "-c",
            f'eval "$({sys.executable} -m nanochat.envfile {env})"; '
            'echo "$NANOCHAT_RUN|$WANDB_PROJECT"',
        ],
        capture_output=True,
        text=True,
        env={
            k: v
            for k, v in __import__("os").environ.items()
            if k not in ("NANOCHAT_RUN", "WANDB_PROJECT")
        },
    )
    assert out.stdout.strip() == "quoted run|from-file"


def test_check_wandb_is_quick_and_quiet_when_offline(tmp_path, monkeypatch):
    import socket
    import time

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert tracking.check_wandb(tmp_path) is None  # no key: offline anyway, nothing to ask
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    t0 = time.time()
    line = tracking.check_wandb(tmp_path)
    assert time.time() - t0 < 15
    assert "unreachable" in line and f"wandb sync {tmp_path}/wandb/offline-run-*" in line
    assert "k" * 40 not in line


@pytest.mark.parametrize("module", ["nanochat.tracking", "scripts.tok_eval", "scripts.report"])
def test_the_pipelines_light_steps_start_without_torch(module):
    """The pipeline's W&B check, the tokenizer evaluation and the report need no tensor: they must
    not pay torch's import (seconds on a laptop, in every run of the pipeline and of the suite)."""
    probe = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_tracker_and_the_report_header_run_without_torch(tmp_path):
    """Running them, not only importing them: the tokenizer stages log through a Tracker and the
    report writes its header; neither imports torch unless a GPU may be there to name (its version
    is then read from its files, and must be the version torch itself reports)."""
    import torch

    from nanochat.report import _nvidia_present

    probe = (
        "import sys; from nanochat.tracking import Tracker; from nanochat.report import "
        f"_environment; Tracker('probe', use_wandb=False, base_dir={str(tmp_path)!r}); "
        "header = _environment(); print('torch' in sys.modules); print(header)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    imported, header = out.stdout.split("\n", 1)
    assert imported == str(_nvidia_present())
    assert f"- torch: {torch.__version__}; device: " in header
    assert (tmp_path / "runs" / "local" / "probe.jsonl").exists()


def test_report_reads_the_latest_run_of_a_stage_log():
    from nanochat.report import current_rows

    rows = [
        {"event": "start", "config": {}},
        {"step": 1, "x": 1},
        {"step": 2, "x": 2},
        {"event": "start", "config": {"resumed_from": 1}},
        {"step": 2, "x": 20},  # killed at 2
        {"event": "start", "config": {"resumed_from": 0}},
        {"step": 1, "x": 100},
    ]  # started over
    assert [r.get("x") for r in current_rows(rows[:5])] == [None, 1, None, 20]
    assert [r.get("x") for r in current_rows(rows)] == [None, 100]


# ------------------------------------------------------------------ issue 28's RL plots and samples


def diagnostic_rows(steps=(0, 10, 20), layers=2) -> list[dict]:
    """rl.jsonl rows with every issue-28 diagnostic, values made from (step, layer) so that each
    plotted number can be checked by hand."""
    rows = []
    for step in steps:
        row = {
            "step": step,
            "rl/token_entropy_mean": 1.0 - step / 100,
            "rl/token_entropy_p50": 0.8,
            "rl/token_entropy_p90": 2.0,
            "rl/high_entropy_frac": 0.2,
        }
        for i in range(layers):
            row[f"rl/lens_margin/layer_{i}"] = step + 10 * i + 0.5
            row[f"rl/lens_margin_ref/layer_{i}"] = 10 * i
            shares = [0.1 + step / 100, 0.2, 0.3, 0.4 - step / 100]
            for span, share in zip(
                ["gold_option", "other_options", "completion", "prompt_rest"], shares
            ):
                row[f"attn/answer_to/{span}/layer_{i}"] = share
        if step % 20 == 0:  # every --eval-every steps
            row.update({f"rl/weight_drift/layer_{i}": step / 1000 * (i + 1) for i in range(layers)})
            row.update({"rl/weight_drift/embedding": 0.001, "rl/weight_drift/lm_head": 0.002})
            row.update({f"rl/eval_letter_recall/{x}": 0.5 for x in "ABCDE"})
            row["rl/eval_letter_recall_std"] = 0.0
        rows.append(row)
    return rows


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_lens_margin_delta_is_policy_minus_reference():
    from nanochat.report import lens_margin_delta

    rows = diagnostic_rows(steps=(0, 10), layers=3)
    del rows[1]["rl/lens_margin_ref/layer_2"]  # a step that lacks one side of a layer
    rows.insert(1, {"step": 5, "rl/mean_reward": 0.5})  # a step with no lens at all
    steps, layers, delta = lens_margin_delta(rows)
    assert steps == [0, 10] and layers == [0, 1, 2]
    assert delta.shape == (3, 2)  # layers on the rows (the heatmap's y axis), steps on columns
    assert delta[:, 0].tolist() == [0.5, 0.5, 0.5] and delta[:2, 1].tolist() == [10.5, 10.5]
    assert math.isnan(delta[2, 1])
    assert lens_margin_delta([{"step": 0, "rl/lens_margin/layer_0": 1.0}]) is None  # no reference


def test_report_draws_the_rl_diagnostics_and_the_last_samples(base_dir):
    run_dir = base_dir / "runs" / "d"
    columns = ["step", "question", "text", "letter", "reward", "advantage"]
    rows = diagnostic_rows()
    samples = []
    for step in (10, 20, 20):  # step 20 twice: a resumed run redid it, the redone rows count
        rows[step // 10]["rl/samples"] = {
            "_type": "table",
            "columns": columns,
            "rows": 2,
            "file": "rl_samples.jsonl",
        }
        samples += [
            {
                "step": step,
                "question": f"q{step}",
                "text": "a | b\nAnswer: C",
                "letter": "C",
                "reward": 1.0,
                "advantage": 0.25,
            },
            {
                "step": step,
                "question": "long",
                "text": "x" * 500,
                "letter": None,
                "reward": 0.0,
                "advantage": -0.25,
            },
        ]
    samples[-1]["question"] = "redone"
    write_jsonl(run_dir / "rl.jsonl", rows)
    write_jsonl(run_dir / "rl_samples.jsonl", samples)
    report = generate_report(base_dir, "d").read_text()
    rdir = base_dir / "report" / "d"
    for png in [
        "rl_lens_margin.png",
        "rl_weight_drift.png",
        "attn_answer_to.png",
        "rl_token_entropy.png",
        "rl_high_entropy.png",
        "rl_letter_recall.png",
    ]:
        assert (rdir / png).stat().st_size > 1000, png
        assert f"({png})" in report, png
    section = report[report.index("## Samples (last logged step)") :]
    section = section[: section.index("\n## ")]
    table = [line for line in section.splitlines() if line.startswith("|")]
    assert table[0] == "| step | question | text | letter | reward | advantage |"
    # the last logged step's rows only, once: the two rows the redone step 20 wrote last
    assert [line.split(" | ")[1] for line in table[2:]] == ["q20", "redone"]
    assert table[2] == "| 20 | q20 | a \\| b ↵ Answer: C | C | 1 | 0.25 |"
    assert "x" * 199 + "…" in table[3] and "x" * 200 not in table[3]
    assert "rl_samples.jsonl" in section
    missing = report[report.index("## Not in this report") :]
    assert "Samples" not in missing and "Logit-lens" not in missing and "recall" not in missing


def test_report_says_which_rl_diagnostics_are_missing(base_dir):
    write_jsonl(base_dir / "runs" / "m" / "rl.jsonl", [{"step": 0, "rl/mean_reward": 0.5}])
    report = generate_report(base_dir, "m").read_text()
    missing = report[report.index("## Not in this report") :]
    for line in [
        "plot Logit-lens letter margin per layer, policy - reference: the rl stage logged no "
        "rl/lens_margin/layer_* with rl/lens_margin_ref/layer_*",
        "plot Weight drift from the reference per layer: the rl stage logged no rl/weight_drift/*",
        "plot Answer-position attention per span and layer: the rl stage logged no "
        "attn/answer_to/<span>/layer_*",
        "plot Entropy of the policy at the sampled completions' tokens: the rl stage logged none "
        "of rl/token_entropy_mean",
        "plot High-entropy tokens in the sampled completions: the rl stage logged none of "
        "rl/high_entropy_frac",
        "plot Greedy recall per gold letter (RL evaluations): the rl stage logged none of "
        "rl/eval_letter_recall/A",
        "table Samples (last logged step): the rl stage logged no rl/samples",
    ]:
        assert f"- {line}" in missing, line
    assert "## Samples" not in report
    rdir = base_dir / "report" / "m"
    assert not (rdir / "rl_lens_margin.png").exists() and not (rdir / "attn_answer_to.png").exists()
