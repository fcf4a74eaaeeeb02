"""The run report: `<base>/report/<run>/report.md` with PNG plots beside it.

Stages write their sections to `<base>/report/<run>/<section>.md` as they finish; this module
stitches them together in pipeline order, adds an environment header, and draws plots from the
stage logs in `<base>/runs/<run>/<stage>.jsonl`, only for metrics that were logged.
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

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
    (
        "rl_token_entropy",
        "Entropy of the policy at the sampled completions' tokens",
        "rl",
        ["rl/token_entropy_mean", "rl/token_entropy_p90"],
        "nats",
        False,
    ),
    (
        "rl_high_entropy",
        "High-entropy tokens in the sampled completions",
        "rl",
        ["rl/high_entropy_frac"],
        "fraction of tokens",
        False,
    ),
    (
        "rl_letter_recall",
        "Greedy recall per gold letter (RL evaluations)",
        "rl",
        [f"rl/eval_letter_recall/{letter}" for letter in "ABCDE"],
        "accuracy on that letter's problems",
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


def _layers(rows: list[dict], prefix: str) -> list[int]:
    """The layer indices i of the `<prefix><i>` keys that any row logged, ascending."""
    found = {k[len(prefix) :] for r in rows for k in r if k.startswith(prefix)}
    return sorted(int(i) for i in found if i.isdigit())


def _number(value) -> float:
    """A logged number as a float; NaN for anything else (absent, a "nan" string, a bool)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


LENS = "rl/lens_margin/layer_"
LENS_REF = "rl/lens_margin_ref/layer_"


def lens_margin_delta(rows: list[dict]) -> tuple[list[int], list[int], np.ndarray] | None:
    """(steps, layers, delta): delta[l, s] is the letter margin read through the logit lens at
    layers[l] on steps[s], the policy's minus the reference's (rl/lens_margin/layer_<i> minus
    rl/lens_margin_ref/layer_<i>): how far RL moved each layer's answer. NaN where a step lacks
    either side of a layer; None when no layer has both."""
    layers = sorted(set(_layers(rows, LENS)) & set(_layers(rows, LENS_REF)))
    rows = [r for r in rows if "step" in r and any(f"{LENS}{i}" in r for i in layers)]
    if not layers or not rows:
        return None
    delta = np.array(
        [
            [_number(r.get(f"{LENS}{i}")) - _number(r.get(f"{LENS_REF}{i}")) for r in rows]
            for i in layers
        ]
    )
    return [r["step"] for r in rows], layers, delta


def _step_ticks(ax, steps: list[int]) -> None:
    """Label at most ~8 of the columns of an image with their steps."""
    every = max(1, math.ceil(len(steps) / 8))
    ax.set_xticks(range(0, len(steps), every), [str(s) for s in steps[::every]])


def _plot_lens_heatmap(out: Path, rows: list[dict]) -> bool:
    built = lens_margin_delta(rows)
    if built is None:
        return False
    steps, layers, delta = built
    plt = _pyplot()
    # symmetric limits: 0 (no change from the reference) is the white middle of the colour map
    limit = float(np.nanmax(np.abs(delta))) if np.isfinite(delta).any() else 0.0
    limit = limit or 1.0
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#dddddd")  # grey: a layer not logged
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(layers) + 2))
    image = ax.imshow(
        np.ma.masked_invalid(delta),
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap=cmap,
        vmin=-limit,
        vmax=limit,
    )
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    _step_ticks(ax, steps)
    ax.set_xlabel("step")
    ax.set_ylabel("layer")
    ax.set_title("Letter margin through the logit lens: policy - reference")
    fig.colorbar(image, ax=ax, label="margin change (logits; > 0: gold letter gained)")
    fig.tight_layout()
    _save_figure(fig, out)
    return True


DRIFT = "rl/weight_drift/"


def weight_drift_at_last_step(rows: list[dict]) -> tuple[int, dict[str, float]] | None:
    """(step, {"layer_0": d, ..., "embedding": d, "lm_head": d}) at the last step that logged
    rl/weight_drift/*: each part's relative distance from the reference's weights."""
    last = next(
        (r for r in reversed(rows) if "step" in r and any(k.startswith(DRIFT) for k in r)), None
    )
    if last is None:
        return None
    parts = [f"layer_{i}" for i in _layers([last], f"{DRIFT}layer_")] + ["embedding", "lm_head"]
    return last["step"], {p: _number(last[DRIFT + p]) for p in parts if DRIFT + p in last}


def _plot_weight_drift(out: Path, rows: list[dict]) -> bool:
    built = weight_drift_at_last_step(rows)
    if built is None:
        return False
    step, drift = built
    plt = _pyplot()
    over_steps = {
        name: _series(rows, DRIFT + name) for name in ("embedding", "lm_head") if name in drift
    }
    layer_keys = [DRIFT + name for name in drift if name.startswith("layer_")]
    drift_rows = [r for r in rows if "step" in r and any(k in r for k in layer_keys)]
    if layer_keys and drift_rows:
        over_steps["mean over layers"] = (
            [r["step"] for r in drift_rows],
            [float(np.nanmean([_number(r.get(k)) for k in layer_keys])) for r in drift_rows],
        )
    # the curves only when drift was logged more than once: one point says nothing the bars don't
    both = any(len(xs) > 1 for xs, _ in over_steps.values())
    fig, axes = plt.subplots(1, 2 if both else 1, figsize=(11 if both else 6, 3.5), squeeze=False)
    ax = axes[0][0]
    names = list(drift)
    colors = ["#4477aa" if n.startswith("layer_") else "#ee6677" for n in names]
    ax.bar(range(len(names)), [drift[n] for n in names], color=colors)
    ax.set_xticks(range(len(names)), [n.removeprefix("layer_") for n in names], rotation=45)
    ax.set_xlabel("layer (and the embedding, lm_head)")
    ax.set_ylabel("relative distance from the reference")
    ax.set_title(f"Weight drift from the reference, step {step}")
    ax.grid(alpha=0.3, axis="y")
    if both:
        ax = axes[0][1]
        for label, (xs, ys) in over_steps.items():
            ax.plot(xs, ys, "o-", label=label, markersize=3)
        ax.set_xlabel("step")
        ax.set_title("Weight drift over steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, out)
    return True


SPANS = ["gold_option", "other_options", "completion", "prompt_rest"]
ATTN = "attn/answer_to/"


def answer_attention_shares(rows: list[dict]) -> tuple[list[int], list[tuple[int, np.ndarray]]]:
    """(layers, [(step, shares)] at the first and the last step that logged
    attn/answer_to/<span>/layer_<i>): shares[k, l] is the share of the answer position's attention
    that layers[l] puts on SPANS[k] (each column sums to 1). One entry when only one step logged
    them, none when no step did."""
    layers = _layers(rows, f"{ATTN}{SPANS[0]}/layer_")
    logged = [
        r for r in rows if "step" in r and any(f"{ATTN}{SPANS[0]}/layer_{i}" in r for i in layers)
    ]
    picked = logged[:1] + logged[-1:] if len(logged) > 1 else logged
    return layers, [
        (
            r["step"],
            np.array(
                [[_number(r.get(f"{ATTN}{span}/layer_{i}")) for i in layers] for span in SPANS]
            ),
        )
        for r in picked
    ]


def _plot_answer_attention(out: Path, rows: list[dict]) -> bool:
    layers, at_steps = answer_attention_shares(rows)
    if not at_steps:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(at_steps), figsize=(5.5 * len(at_steps), 3.8), squeeze=False, sharey=True
    )
    colors = ["#228833", "#ccbb44", "#4477aa", "#bbbbbb"]
    for ax, (step, shares) in zip(axes[0], at_steps):
        bottom = np.zeros(len(layers))
        for span, share, color in zip(SPANS, np.nan_to_num(shares), colors):
            ax.bar(range(len(layers)), share, bottom=bottom, label=span, color=color)
            bottom += share
        ax.set_xticks(range(len(layers)), [str(i) for i in layers])
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.set_title(f"step {step}")
    axes[0][0].set_ylabel("share of the answer position's attention")
    # beside the last panel, not on it: the bars fill the whole height
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Where the answer letter's position attends")
    fig.tight_layout()
    _save_figure(fig, out)
    return True


SAMPLES_KEY = "rl/samples"


class LoggedTable(NamedTuple):
    step: int
    file: str  # in <base>/runs/<run>/
    columns: list[str]
    rows: list[dict]


def last_table(run_dir: Path, rows: list[dict], key: str) -> LoggedTable | None:
    """The last Table (nanochat.tracking.Table) logged under `key` whose rows went to a file in
    run_dir, with those rows: the last `rows` of its step in the file, since a resumed run may have
    logged the same step twice, the redone rows last. None when there is none."""
    ref = next(
        (
            r
            for r in reversed(rows)
            if "step" in r and isinstance(r.get(key), dict) and r[key].get("file")
        ),
        None,
    )
    if ref is None or not (run_dir / ref[key]["file"]).is_file():
        return None
    table = ref[key]
    same_step = [r for r in read_jsonl(run_dir / table["file"]) if r.get("step") == ref["step"]]
    return LoggedTable(
        ref["step"],
        table["file"],
        table["columns"],
        same_step[max(0, len(same_step) - table["rows"]) :],
    )


def _markdown_cell(value, max_chars: int) -> str:
    if value is None:
        return ""
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    # a pipe would end the cell and a newline the row: escape the one, mark the other
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", " ↵ ")


def markdown_table(columns: list[str], rows: list[dict], max_chars: int = 200) -> list[str]:
    """A markdown table of `rows` (dicts) under `columns`; each cell cut to max_chars characters,
    its pipes escaped and its newlines shown as ↵."""
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        lines.append(
            "| " + " | ".join(_markdown_cell(row.get(c), max_chars) for c in columns) + " |"
        )
    return lines


def _nvidia_present() -> bool:
    """Whether this machine may have an NVIDIA GPU (its driver's device node or tool)."""
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/dxg")) or bool(
        shutil.which("nvidia-smi")
    )


def _torch_line() -> str:
    """The report's torch line. torch is imported only where a GPU may be there to name: on a
    CPU machine its version is read from its files (the import costs seconds per report)."""
    if "torch" in sys.modules or _nvidia_present():
        try:
            import torch
        except ImportError:
            return "- torch: not installed"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device = torch.cuda.get_device_name(0) if count else "CPU only"
        return f"- torch: {torch.__version__}; device: {device} (x{max(count, 1)})"
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return "- torch: not installed"
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    except OSError:  # an unusual install: the header says so rather than the report failing
        text = ""
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return f"- torch: {found.group(1) if found else 'unknown'}; device: CPU only (x1)"


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
    lines.append(_torch_line())
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


def _not_in_report(stage_rows: list[dict], logs: dict, missing: list[str]) -> list[str]:
    """What this report lacks and why: stages the orchestrator left out on purpose (it records the
    reason), stages that have not run (yet), and plots and tables ("plot X: why") whose metrics
    were never logged."""
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
    lines += [f"- {what}" for what in missing]
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
            missing.append(f"plot {title}: the {stage} stage logged none of {', '.join(keys)}")
    rl_rows = logs.get("rl", [])
    diagnostics = "--no-diagnostics, or no step reached its cadence"
    rl_plots = [
        (
            _plot_letter_counts,
            "rl_letter_counts",
            "Predicted-letter distribution over RL steps",
            "rl/letter_pred_counts/*",
            diagnostics,
        ),
        (
            _plot_margin_histogram,
            "rl_margin_hist",
            "Letter-margin histogram",
            "rl/letter_margin_hist",
            diagnostics,
        ),
        (
            _plot_entropy_per_layer,
            "attn_entropy_layers",
            "Attention entropy per layer",
            "attn/entropy/layer_*",
            diagnostics,
        ),
        (
            _plot_lens_heatmap,
            "rl_lens_margin",
            "Logit-lens letter margin per layer, policy - reference",
            f"{LENS}* with {LENS_REF}*",
            diagnostics,
        ),
        (
            _plot_weight_drift,
            "rl_weight_drift",
            "Weight drift from the reference per layer",
            f"{DRIFT}*",
            "no step reached --eval-every",
        ),
        (
            _plot_answer_attention,
            "attn_answer_to",
            "Answer-position attention per span and layer",
            f"{ATTN}<span>/layer_*",
            diagnostics,
        ),
    ]
    for draw, stem, title, key, why in rl_plots:
        if draw(rdir / f"{stem}.png", rl_rows):
            images.append((title, f"{stem}.png"))
        elif rl_rows:
            missing.append(f"plot {title}: the rl stage logged no {key} ({why})")
    images += [(p.stem.replace("_", " "), p.name) for p in sorted(rdir.glob("heatmap_*.png"))]

    if images:
        parts += ["## Plots", ""] + [
            f"### {title}\n\n![{title}]({name})\n" for title, name in images
        ]
    samples = last_table(run_dir, rl_rows, SAMPLES_KEY)
    if samples:
        parts += [
            "## Samples (last logged step)",
            "",
            f"Step {samples.step}: {len(samples.rows)} of its sampled completions "
            f"(`{SAMPLES_KEY}`; the rows of every logged step are in `runs/{run}/{samples.file}`).",
            "",
            *markdown_table(samples.columns, samples.rows),
            "",
        ]
    elif rl_rows:
        missing.append(
            f"table Samples (last logged step): the rl stage logged no {SAMPLES_KEY} "
            "(--log-samples-every 0, or no step reached it)"
        )
    parts += _not_in_report(logs.get("stages", []), logs, missing)
    if not ordered and not images:
        parts += ["_No stage has written results yet._", ""]

    out = rdir / "report.md"
    write_text_atomic(out, "\n".join(parts).rstrip() + "\n")
    return out
