"""One logging interface for every stage: Weights & Biases plus a local JSON-lines mirror.

Each `log(metrics, step)` writes one JSON object to `<base>/runs/<run>/<stage>.jsonl` and, when
W&B is usable, the same metrics to W&B. Only rank 0 logs; other ranks' trackers do nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nanochat.config import add_fields, knob
from nanochat.wandb_login import stored_api_key

DEFAULT_PROJECT = "nanochat-aquarat"


@dataclass
class TrackingKnobs:
    """Where a stage's logs go."""

    # --run-name too: torchrun's own parser rejects a bare --run (ambiguous with its --run-path)
    run: str = knob(
        "local",
        "run name: groups every stage's logs under <base>/runs/<run>/ (env NANOCHAT_RUN; spell it "
        "--run-name under torchrun)",
        group="tracking",
        aliases=("--run-name",),
        env="NANOCHAT_RUN",
        resume_safe=True,
    )
    no_wandb: bool = knob(
        False,
        "log only to the local JSON-lines file (same as WANDB_MODE=disabled)",
        group="tracking",
        resume_safe=True,
    )


def add_tracking_args(parser: argparse.ArgumentParser) -> None:
    add_fields(parser, TrackingKnobs)


# Media metric values: W&B gets a wandb.Image / wandb.Histogram / wandb.Table, the JSON line the
# image's path / the histogram's count, mean, min, max and bins / a reference to the table's rows.


@dataclass
class Image:
    path: str | Path
    caption: str | None = None


@dataclass
class Histogram:
    values: object  # anything np.asarray takes: a list, a numpy array, a CPU tensor
    bins: int = 20

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        values = np.asarray(self.values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size:
            counts, edges = np.histogram(values, bins=self.bins)
        else:
            counts, edges = np.zeros(0), np.zeros(0)
        return values, counts, edges

    def summary(self) -> dict:
        values, counts, edges = self.numpy()
        if not values.size:
            return {"count": 0}
        return {
            "count": int(values.size),
            "mean": float(values.mean()),
            "min": float(values.min()),
            "max": float(values.max()),
            "counts": counts.tolist(),
            "edges": edges.tolist(),
        }


@dataclass
class Table:
    """Rows of values under named columns (a few sampled completions, say): W&B gets a wandb.Table.
    The stage's JSON line holds only a reference, {"_type": "table", "columns": [...], "rows": n,
    "file": ...}, since texts would bloat it; with `file`, a bare file name, every row is appended
    as one JSON object {"step": s, column: value, ...} to <base>/runs/<run>/<file>, beside the
    stage's log."""

    columns: list[str]
    rows: list[list]
    file: str | None = None

    def __post_init__(self):
        for i, row in enumerate(self.rows):
            if len(row) != len(self.columns):
                raise ValueError(
                    f"Table row {i} has {len(row)} values for {len(self.columns)} columns "
                    f"{self.columns}"
                )
        if self.file is not None and (
            Path(self.file).name != self.file or self.file in ("", ".", "..")
        ):
            raise ValueError(
                f"Table file {self.file!r} must be a bare file name: it is written beside the "
                "stage's log in <base>/runs/<run>/"
            )

    def cells(self) -> list[list]:
        return [[_jsonable(v) for v in row] for row in self.rows]

    def reference(self) -> dict:
        return {"_type": "table", "columns": list(self.columns), "rows": len(self.rows)} | (
            {"file": self.file} if self.file else {}
        )


def _to_wandb(value):
    import wandb

    if isinstance(value, Image):
        return wandb.Image(str(value.path), caption=value.caption)
    if isinstance(value, Table):
        # mixed types allowed: a column may hold None ("no letter") or "nan" beside numbers, and
        # W&B's type check must not take the run down
        return wandb.Table(columns=list(value.columns), data=value.cells(), allow_mixed_types=True)
    _, counts, edges = value.numpy()
    return wandb.Histogram(np_histogram=(counts, edges)) if counts.size else None


def _jsonable(value):
    if isinstance(value, Image):
        return str(value.path)
    if isinstance(value, Histogram):
        return value.summary()
    if isinstance(value, Table):
        return value.reference()
    if hasattr(value, "item"):  # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def wandb_mode() -> str:
    """The W&B mode to use: W&B's own variable if set, online with a key, otherwise offline (and
    the tracker says how to sync later). WANDB_PROJECT and WANDB_ENTITY are W&B's own too."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY") or stored_api_key():  # a key, or a `wandb login`
        return "online"
    return "offline"


def _rank() -> int:
    """This process's rank, without importing torch: a process that never imported
    torch.distributed has no process group, so it is rank 0 (the tokenizer stages and the report
    then start without torch's seconds of import)."""
    dist = sys.modules.get("torch.distributed")
    return dist.get_rank() if dist and dist.is_available() and dist.is_initialized() else 0


class Tracker:
    def __init__(
        self,
        stage: str,
        run: str = "local",
        config: dict | None = None,
        use_wandb: bool = True,
        base_dir: Path | None = None,
    ):
        from nanochat.files import get_base_dir

        self.stage = stage
        self.run = run
        self.active = _rank() == 0
        self._wandb_run = None
        self.path = None
        if not self.active:
            return
        base = Path(base_dir) if base_dir else get_base_dir()
        run_dir = base / "runs" / run
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir
        self.path = run_dir / f"{stage}.jsonl"
        self._file = open(self.path, "a", encoding="utf-8")
        self._write(
            {
                "event": "start",
                "stage": stage,
                "run": run,
                "time": time.time(),
                "config": {k: _jsonable(v) for k, v in (config or {}).items()},
            }
        )
        if use_wandb and wandb_mode() != "disabled":
            self._start_wandb(config or {}, run_dir)

    def _start_wandb(self, config: dict, run_dir: Path) -> None:
        mode = wandb_mode()
        try:
            import wandb

            self._wandb_run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
                entity=os.environ.get("WANDB_ENTITY"),
                name=f"{self.run}-{self.stage}",
                group=self.run,
                job_type=self.stage,
                config=config,
                mode=mode,
                dir=str(run_dir),
                reinit="finish_previous",
            )
        except Exception as exc:  # W&B must never take a training run down with it.
            print(
                f"[tracking] W&B unavailable ({type(exc).__name__}: {exc}); "
                f"logging locally to {self.path}",
                flush=True,
            )
            self._wandb_run = None
            return
        if mode == "offline":
            print(
                "[tracking] W&B offline (no WANDB_API_KEY, no `wandb login`). Upload later "
                f"with: {sync_command(run_dir)}",
                flush=True,
            )

    def _write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj) + "\n")
        self._file.flush()

    def log(self, metrics: dict, step: int) -> None:
        if not self.active:
            return
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        # a table's rows go to its file first: a stage line that references them always has them
        for key, value in metrics.items():
            if isinstance(value, Table) and value.file:
                self._append_table(key, value, int(step))
        self._write({"step": int(step), **clean})
        if self._wandb_run is not None:
            out = {k: v for k, v in clean.items() if not isinstance(v, (str, dict))}
            for k, v in metrics.items():
                if isinstance(v, (Image, Histogram, Table)) and (media := _to_wandb(v)) is not None:
                    out[k] = media
            self._wandb_run.log(out, step=int(step))

    def _append_table(self, key: str, table: Table, step: int) -> None:
        path = self.run_dir / table.file
        if path == self.path:
            raise ValueError(f"Table {key!r} cannot be written to the stage's own log {path}")
        with open(path, "a", encoding="utf-8") as fh:
            for row in table.cells():
                # a "step" column is the logged step: it is the row's first key either way
                cells = {c: v for c, v in zip(table.columns, row) if c != "step"}
                fh.write(json.dumps({"step": step, **cells}) + "\n")

    def summary(self, metrics: dict) -> None:
        if not self.active:
            return
        clean = {k: _jsonable(v) for k, v in metrics.items()}
        self._write({"event": "summary", **clean})
        if self._wandb_run is not None:
            self._wandb_run.summary.update(clean)

    def finish(self) -> None:
        if not self.active:
            return
        self._write({"event": "end", "time": time.time()})
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        self.active = False


def sync_command(run_dir: Path) -> str:
    """How to upload the offline runs, as a command that works pasted into a fresh terminal."""
    return (
        f"uv run wandb sync {run_dir}/wandb/offline-run-* (from the project's directory; it "
        "needs a W&B key: WANDB_API_KEY, or `uv run wandb login` once)"
    )


def check_wandb(run_dir: Path, timeout: float = 10.0) -> str | None:
    """None when W&B will not be contacted (offline/disabled, no key) or its server answers;
    otherwise one line saying it is unreachable and how to upload the offline runs later."""
    if wandb_mode() != "online":
        return None
    import requests

    url = os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai"
    try:
        # any HTTP answer will do: this only asks whether the network path exists, in seconds
        # rather than the minutes wandb.init takes to give up
        requests.get(url, timeout=timeout)
    except requests.RequestException as exc:
        return (
            f"W&B at {url} is unreachable ({type(exc).__name__}): every stage logs offline. "
            f"Upload later with: {sync_command(run_dir)}"
        )
    return None


def make_tracker(args: argparse.Namespace, stage: str, config: dict | None = None) -> Tracker:
    """Build the tracker from the flags added by add_tracking_args."""
    return Tracker(
        stage,
        run=args.run,
        config=config if config is not None else vars(args),
        use_wandb=not args.no_wandb,
    )


def log_results(
    args: argparse.Namespace,
    stage: str,
    metrics: dict,
    step: int = 0,
    config: dict | None = None,
    extra: dict | None = None,
) -> None:
    """For a stage whose results are one set of metrics (an evaluation, the tokenizer): log them
    at `step` with `extra` (logged, not summarised) beside them, summarise them, and finish."""
    tracker = make_tracker(args, stage, config)
    tracker.log({**metrics, **(extra or {})}, step=step)
    tracker.summary(metrics)
    tracker.finish()


def read_jsonl(path: Path) -> list[dict]:
    """Read a stage log back (report, tests), skipping malformed lines: a killed run can leave half
    of one at the end."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


if __name__ == "__main__":
    # uv run python -m nanochat.tracking --check-wandb RUN_DIR: the unreachable line, or nothing
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "--check-wandb":
        raise SystemExit("usage: uv run python -m nanochat.tracking --check-wandb RUN_DIR")
    line = check_wandb(Path(sys.argv[2]))
    if line:
        print(line)
