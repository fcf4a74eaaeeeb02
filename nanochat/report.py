"""The run report: `<base>/report/<run>/report.md` with PNG plots beside it.

Stages write their sections to `<base>/report/<run>/<section>.md` as they finish; this module
stitches them together in pipeline order, adds an environment header, and draws plots from the
stage logs in `<base>/runs/<run>/<stage>.jsonl`, only for metrics that were logged.
"""

from __future__ import annotations

import datetime
import math
import platform
import subprocess
from pathlib import Path

from nanochat.files import atomic_path, write_text_atomic
from nanochat.tracking import read_jsonl

# Sections in pipeline order; anything else found in the report dir is appended alphabetically.
SECTION_ORDER = [
    "tokenizer",
    "tok_eval",
    "base_train",
    "base_loss",
    "base_eval",
    "mid",
    "sft",
    "chat_eval_base",
    "chat_eval_mid",
    "chat_eval_sft",
    "rl",
    "chat_eval_rl",
]

# (plot file stem, title, stage log, metric keys, y label, log scale). Drawn when any key has data.
PLOTS = [
    ("loss_base", "Pretraining loss", "base", ["train/loss", "loss"], "nats/token", True),
    ("bpb_base", "Validation bits per byte", "base", ["val/bpb"], "bits/byte", True),
    ("loss_mid", "Mid-training loss", "mid", ["train/loss", "val/loss"], "nats/token", True),
    ("loss_sft", "SFT loss", "sft", ["train/loss", "val/loss"], "nats/token", True),
    (
        "rl_reward",
        "RL mean reward (sampled completions)",
        "rl",
        ["rl/mean_reward"],
        "reward",
        False,
    ),
    ("rl_accuracy", "RL validation accuracy (greedy)", "rl", ["rl/acc"], "accuracy", False),
    (
        "rl_kl",
        "KL to the reference",
        "rl",
        ["rl/kl_sequence_mean", "rl/kl_sequence_k3_mean", "rl/kl_letter_mean"],
        "nats",
        False,
    ),
    (
        "rl_margin",
        "Letter logit margin (correct - best other)",
        "rl",
        ["rl/letter_margin_mean"],
        "logits",
        False,
    ),
    (
        "attn_entropy",
        "Attention entropy (mean over layers)",
        "rl",
        ["attn/entropy_mean"],
        "nats",
        False,
    ),
]
# series with at most this many points are drawn as markers: they were measured only there
SPARSE = 25


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a training node)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, out: Path) -> None:
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        _pyplot().close(fig)


def report_dir(base_dir: Path, run: str) -> Path:
    path = Path(base_dir) / "report" / run
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_section(base_dir: Path, run: str, name: str, markdown: str) -> Path:
    """Write one stage's section of run `run`, atomically: a crashed stage never leaves half of
    one. Each run has its own folder, so two runs in one base dir never mix their reports."""
    path = report_dir(base_dir, run) / f"{name}.md"
    write_text_atomic(path, markdown.rstrip() + "\n")
    return path


def current_rows(rows: list[dict]) -> list[dict]:
    """The rows of a stage log that describe its latest run.

    A fresh start (a "start" event whose config has no resumed_from) replaces everything before
    it; a resume from step k drops the older rows past k, whose work was lost and is redone."""
    out: list[dict] = []
    for row in rows:
        if row.get("event") == "start":
            resumed = (row.get("config") or {}).get("resumed_from") or 0
            out = [r for r in out if r.get("step", 0) <= resumed] if resumed else []
        out.append(row)
    return out


def _running_mean(values: list[float], window: int) -> list[float]:
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(values))
    ]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if "step" in row and isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def _plot_lines(
    out: Path, title: str, curves: dict[str, tuple[list, list]], ylabel: str = "", log: bool = False
) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in curves.items():
        if len(xs) <= SPARSE:
            ax.plot(xs, ys, "o", label=label, markersize=4)
        elif len(xs) <= 50:
            ax.plot(xs, ys, label=label, linewidth=1.0)
        else:  # noisy per-step values: faint, with a running mean on top that shows the trend
            window = max(5, len(xs) // 25)
            (line,) = ax.plot(xs, ys, linewidth=0.6, alpha=0.3)
            ax.plot(
                xs,
                _running_mean(ys, window),
                color=line.get_color(),
                linewidth=1.4,
                label=f"{label} (mean of {window})",
            )
    values = [y for _, ys in curves.values() for y in ys]
    if log and values and min(values) > 0:
        # losses fall by orders of magnitude: a linear axis hides everything after the start
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out)


def _plot_letter_counts(out: Path, rows: list[dict]) -> bool:
    """Share of each predicted letter (and none) per RL step, stacked: how the choices drift."""
    letters = ["A", "B", "C", "D", "E", "none"]
    rows = [r for r in rows if "step" in r and f"rl/letter_pred_counts/{letters[0]}" in r]
    if not rows:
        return False
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    # counts[row][letter index], then each letter's share of its row, one series per letter
    counts = [
        [float(r.get(f"rl/letter_pred_counts/{letter}", 0)) for letter in letters] for r in rows
    ]
    totals = [max(sum(row_counts), 1.0) for row_counts in counts]
    shares = [[c[i] / t for c, t in zip(counts, totals)] for i in range(len(letters))]
    # a running mean: one step's 64-256 completions are a noisy sample
    window = max(1, len(steps) // 25)
    shares = [_running_mean(share, window) for share in shares]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.stackplot(steps, shares, labels=letters, alpha=0.85)
    ax.set_ylim(0, 1)
    ax.set_title(
        "Letters chosen by the sampled completions"
        + (f" (mean of {window} steps)" if window > 1 else "")
    )
    ax.set_xlabel("step")
    ax.set_ylabel("share of completions")
    ax.legend(fontsize=7, ncol=6, loc="lower center")
    fig.tight_layout()
    _save_figure(fig, out)
    return True


def _plot_margin_histogram(out: Path, rows: list[dict]) -> bool:
    """The last logged histogram of letter margins (rl/letter_margin_hist: counts, bin edges)."""
    last = next(
        (
            r["rl/letter_margin_hist"]
            for r in reversed(rows)
            if isinstance(r.get("rl/letter_margin_hist"), dict)
            and r["rl/letter_margin_hist"].get("counts")
        ),
        None,
    )
    if last is None:
        return False
    plt = _pyplot()
    edges, counts = last["edges"], last["counts"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(
        edges[:-1],
        counts,
        width=[b - a for a, b in zip(edges, edges[1:])],
        align="edge",
        color="#4477aa",
    )
    ax.axvline(0.0, color="black", linewidth=0.8)
    step = next(r["step"] for r in reversed(rows) if r.get("rl/letter_margin_hist") is not None)
    ax.set_title(f"Letter margins at the answer, step {step} (> 0: correct letter preferred)")
    ax.set_xlabel("logit of the correct letter - best other")
    ax.set_ylabel("completions")
    fig.tight_layout()
    _save_figure(fig, out)
    return True


def _plot_entropy_per_layer(out: Path, rows: list[dict]) -> bool:
    keys = sorted(
        {k for r in rows for k in r if k.startswith("attn/entropy/layer_")},
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )
    if not keys:
        return False
    _plot_lines(
        out,
        "Attention entropy per layer",
        {k.rsplit("/", 1)[1]: _series(rows, k) for k in keys},
        ylabel="nats",
    )
    return True


def _environment() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    lines = [
        f"- generated: {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"- git commit: {commit or 'unknown'}",
        f"- python: {platform.python_version()} on {platform.platform()}",
    ]
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
        lines.append(
            f"- torch: {torch.__version__}; device: {device} (x{max(torch.cuda.device_count(), 1)})"
        )
    except ImportError:
        pass
    return "\n".join(lines)


def sign_test(a_only: int, b_only: int) -> float:
    """Exact two-sided p-value of a_only vs b_only discordant pairs under p = 1/2: the sign
    test."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_counts(a: list[int], b: list[int]) -> dict:
    """Problems both right, only A, only B, neither (per-problem 0/1 lists of the same problems)."""
    return {
        "both": sum(x and y for x, y in zip(a, b)),
        "a_only": sum(x and not y for x, y in zip(a, b)),
        "b_only": sum(y and not x for x, y in zip(a, b)),
        "neither": sum(not x and not y for x, y in zip(a, b)),
        "n": len(a),
        "a_right": sum(a),
        "b_right": sum(b),
    }


def _time_table(rows: list[dict], hourly_price: float) -> list[str]:
    """Wall time (and cost) per stage from the orchestrator's stages.jsonl, the latest run of
    each."""
    latest = {}
    for row in rows:
        if "stage" in row and "seconds" in row:
            latest[row["stage"]] = row
    if not latest:
        return []
    cost = hourly_price > 0
    lines = [
        "## Time per stage",
        "",
        "| stage | wall time | processes | device |" + (" cost (USD) |" if cost else ""),
        "|---|---|---|---|" + ("---|" if cost else ""),
    ]
    total = 0
    for name, row in latest.items():
        total += row["seconds"]
        lines.append(
            f"| {name} | {row['seconds'] / 60:.1f} min | {row['processes']} | {row['device']} |"
            + (f" {row['seconds'] / 3600 * hourly_price:.2f} |" if cost else "")
        )
    lines.append(
        f"| total | {total / 60:.1f} min | | |"
        + (f" {total / 3600 * hourly_price:.2f} |" if cost else "")
    )
    return lines + [""]


# Stage logs of a complete pipeline (the orchestrator's stage names in brackets where they differ)
EXPECTED_LOGS = {
    "tok_train": "tokenizer",
    "base": "base",
    "base_eval": "base_eval",
    "mid": "mid",
    "sft": "sft",
    "rl": "rl",
    "chat_eval": "eval",
}


def _not_in_report(stage_rows: list[dict], logs: dict, missing_plots: list[str]) -> list[str]:
    """What this report lacks and why: stages the orchestrator left out on purpose (it records the
    reason), stages that have not run (yet), and plots whose metrics were never logged."""
    left_out = {}
    for row in stage_rows:
        if "not_run" in row:
            left_out[row["stage"]] = row["not_run"]
        elif "seconds" in row:
            left_out.pop(row["stage"], None)
    lines = [f"- stage {name}: not run ({why})" for name, why in left_out.items()]
    lines += [
        f"- stage {stage}: no log yet (not run, or still running)"
        for log, stage in EXPECTED_LOGS.items()
        if log not in logs and stage not in left_out
    ]
    lines += [f"- plot {what}" for what in missing_plots]
    return ["## Not in this report", ""] + lines + [""] if lines else []


SOURCES = ["base", "mid", "sft", "rl"]


def _accuracy_table(rows: list[dict]) -> list[str]:
    """Every checkpoint's newest score per task/split/mode side by side, with the baselines, and the
    paired SFT -> RL comparison where both have per-problem results on the same problems."""
    newest = {}
    for row in rows:
        if {"source", "task", "split", "mode", "acc"} <= row.keys():
            newest[(row["task"], row["split"], row["mode"], row["source"])] = row
    if not newest:
        return []
    lines = [
        "## Accuracy",
        "",
        "| task | split | mode | "
        + " | ".join(s for s in SOURCES)
        + " | n | chance | always-most-frequent |",
        "|---" * (len(SOURCES) + 6) + "|",
    ]
    for task, split, mode in sorted({k[:3] for k in newest}):
        cells = [newest.get((task, split, mode, s)) for s in SOURCES]
        any_row = next(c for c in cells if c)
        lines.append(
            f"| {task} | {split} | {mode} | "
            + " | ".join(f"{c['acc']:.3f}" if c else "-" for c in cells)
            + f" | {any_row['n']} | 0.200 | {any_row['most_frequent_acc']:.3f} "
            f"({any_row['most_frequent_letter']}) |"
        )
    for task, split, mode in sorted({k[:3] for k in newest}):
        sft, rl = newest.get((task, split, mode, "sft")), newest.get((task, split, mode, "rl"))
        if (
            sft
            and rl
            and "per_problem" in sft
            and len(sft["per_problem"]) == len(rl.get("per_problem", []))
        ):
            c = paired_counts(sft["per_problem"], rl["per_problem"])
            lines += [
                "",
                f"SFT -> RL on the same {c['n']} {task}/{split} problems (greedy): "
                f"RL right and SFT wrong {c['b_only']}, SFT right and RL wrong {c['a_only']}, "
                f"exact sign test p = {sign_test(c['a_only'], c['b_only']):.2g}.",
            ]
    return lines + [""]


def generate_report(base_dir: Path, run: str, hourly_price: float = 0.0) -> Path:
    """Assemble report.md from the section files and the run's stage logs; returns its path."""
    base_dir = Path(base_dir)
    rdir = report_dir(base_dir, run)
    run_dir = base_dir / "runs" / run
    logs = (
        {p.stem: current_rows(read_jsonl(p)) for p in sorted(run_dir.glob("*.jsonl"))}
        if run_dir.is_dir()
        else {}
    )

    parts = [f"# nanochat-aquarat report — run `{run}`", "", "## Environment", _environment(), ""]
    parts += _time_table(logs.get("stages", []), hourly_price)
    parts += _accuracy_table(logs.get("chat_eval", []))
    present = {p.stem for p in rdir.glob("*.md") if p.name != "report.md"}
    ordered = [s for s in SECTION_ORDER if s in present] + sorted(present - set(SECTION_ORDER))
    for name in ordered:
        parts += [(rdir / f"{name}.md").read_text(encoding="utf-8").rstrip(), ""]

    images, missing = [], []
    for stem, title, stage, keys, ylabel, log in PLOTS:
        curves = {k: _series(logs.get(stage, []), k) for k in keys}
        curves = {k: v for k, v in curves.items() if v[0]}
        if curves:
            _plot_lines(rdir / f"{stem}.png", title, curves, ylabel, log)
            images.append((title, f"{stem}.png"))
        elif stage in logs:
            missing.append(f"{title}: the {stage} stage logged none of {', '.join(keys)}")
    rl_rows = logs.get("rl", [])
    rl_plots = [
        (
            _plot_letter_counts,
            "rl_letter_counts",
            "Predicted-letter distribution over RL steps",
            "rl/letter_pred_counts/*",
        ),
        (
            _plot_margin_histogram,
            "rl_margin_hist",
            "Letter-margin histogram",
            "rl/letter_margin_hist",
        ),
        (
            _plot_entropy_per_layer,
            "attn_entropy_layers",
            "Attention entropy per layer",
            "attn/entropy/layer_*",
        ),
    ]
    for draw, stem, title, key in rl_plots:
        if draw(rdir / f"{stem}.png", rl_rows):
            images.append((title, f"{stem}.png"))
        elif rl_rows:
            missing.append(
                f"{title}: the rl stage logged no {key} (--no-diagnostics, or no step reached "
                f"its cadence)"
            )
    images += [(p.stem.replace("_", " "), p.name) for p in sorted(rdir.glob("heatmap_*.png"))]

    if images:
        parts += ["## Plots", ""] + [
            f"### {title}\n\n![{title}]({name})\n" for title, name in images
        ]
    parts += _not_in_report(logs.get("stages", []), logs, missing)
    if not ordered and not images:
        parts += ["_No stage has written results yet._", ""]

    out = rdir / "report.md"
    write_text_atomic(out, "\n".join(parts).rstrip() + "\n")
    return out
