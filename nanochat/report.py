"""The run report: `<base>/report/report.md` with PNG plots beside it.

Stages write their own markdown sections into `<base>/report/<section>.md` as they finish; this module
stitches them together in pipeline order, adds an environment header, and draws plots from the
stage logs in `<base>/runs/<run>/<stage>.jsonl`. Plots are drawn only for metrics that were logged,
so a partial pipeline still gets an honest partial report.
"""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

from nanochat.tracking import read_jsonl

# Sections in pipeline order; anything else found in the report dir is appended alphabetically.
SECTION_ORDER = ["tokenizer", "tok_eval", "base_train", "base_loss", "base_eval", "mid", "sft",
                 "chat_eval_base", "chat_eval_mid", "chat_eval_sft", "rl", "chat_eval_rl"]

# (plot file stem, title, stage log, metric keys). A plot is drawn when any key has data.
PLOTS = [
    ("loss_base", "Pretraining loss", "base", ["loss", "train/loss"]),
    ("bpb_base", "Validation bits per byte", "base", ["val/bpb"]),
    ("loss_mid", "Mid-training loss", "mid", ["loss", "train/loss", "val_loss", "val/loss"]),
    ("loss_sft", "SFT loss", "sft", ["loss", "train/loss", "val_loss", "val/loss"]),
    ("rl_reward", "RL mean reward", "rl", ["rl/mean_reward"]),
    ("rl_accuracy", "RL accuracy", "rl", ["rl/acc"]),
    ("rl_kl", "KL to reference", "rl", ["rl/kl_letter_mean", "rl/kl_sequence_mean"]),
    ("rl_margin", "Letter logit margin", "rl", ["rl/letter_margin_mean"]),
    ("attn_entropy", "Attention entropy (mean)", "rl", ["attn/entropy_mean"]),
]


def report_dir(base_dir: Path) -> Path:
    path = Path(base_dir) / "report"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_section(base_dir: Path, name: str, markdown: str) -> Path:
    """Write one stage's section atomically (a crashed stage never leaves half a section)."""
    path = report_dir(base_dir) / f"{name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        value = row.get(key)
        if "step" in row and isinstance(value, (int, float)) and not isinstance(value, bool):
            steps.append(row["step"])
            values.append(float(value))
    return steps, values


def _plot_lines(out: Path, title: str, curves: dict[str, tuple[list, list]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, linewidth=1.2)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_letter_counts(out: Path, rows: list[dict]) -> bool:
    letters = ["A", "B", "C", "D", "E", "none"]
    last = next((r for r in reversed(rows) if any(f"rl/letter_pred_counts/{l}" in r for l in letters)), None)
    if last is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [float(last.get(f"rl/letter_pred_counts/{l}", 0)) for l in letters]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(letters, counts, color="#4477aa")
    ax.set_title(f"Predicted letters (step {last['step']})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def _plot_entropy_per_layer(out: Path, rows: list[dict]) -> bool:
    keys = sorted({k for r in rows for k in r if k.startswith("attn/entropy/layer_")},
                  key=lambda k: int(k.rsplit("_", 1)[1]))
    if not keys:
        return False
    _plot_lines(out, "Attention entropy per layer", {k.rsplit("/", 1)[1]: _series(rows, k) for k in keys})
    return True


def _environment() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    lines = [f"- generated: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- git commit: {commit or 'unknown'}",
             f"- python: {platform.python_version()} on {platform.platform()}"]
    try:
        import torch

        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
        lines.append(f"- torch: {torch.__version__}; device: {device} (x{max(torch.cuda.device_count(), 1)})")
    except ImportError:
        pass
    return "\n".join(lines)


def generate_report(base_dir: Path, run: str) -> Path:
    """Assemble report.md from the section files and the run's stage logs; returns its path."""
    base_dir = Path(base_dir)
    rdir = report_dir(base_dir)
    run_dir = base_dir / "runs" / run
    logs = {p.stem: read_jsonl(p) for p in sorted(run_dir.glob("*.jsonl"))} if run_dir.is_dir() else {}

    parts = [f"# nanochat-aquarat report — run `{run}`", "", "## Environment", _environment(), ""]
    present = {p.stem for p in rdir.glob("*.md") if p.name != "report.md"}
    ordered = [s for s in SECTION_ORDER if s in present] + sorted(present - set(SECTION_ORDER))
    for name in ordered:
        parts += [(rdir / f"{name}.md").read_text(encoding="utf-8").rstrip(), ""]

    images = []
    for stem, title, stage, keys in PLOTS:
        curves = {k: _series(logs.get(stage, []), k) for k in keys}
        curves = {k: v for k, v in curves.items() if v[0]}
        if curves:
            _plot_lines(rdir / f"{stem}.png", title, curves)
            images.append((title, f"{stem}.png"))
    rl_rows = logs.get("rl", [])
    if _plot_letter_counts(rdir / "rl_letter_counts.png", rl_rows):
        images.append(("Predicted-letter distribution", "rl_letter_counts.png"))
    if _plot_entropy_per_layer(rdir / "attn_entropy_layers.png", rl_rows):
        images.append(("Attention entropy per layer", "attn_entropy_layers.png"))
    images += [(p.stem.replace("_", " "), p.name) for p in sorted(rdir.glob("heatmap_*.png"))]

    if images:
        parts += ["## Plots", ""] + [f"### {title}\n\n![{title}]({name})\n" for title, name in images]
    if not ordered and not images:
        parts += ["_No stage has written results yet._", ""]

    out = rdir / "report.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(parts).rstrip() + "\n", encoding="utf-8")
    tmp.replace(out)
    return out
