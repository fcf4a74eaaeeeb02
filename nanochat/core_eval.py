"""The DCLM CORE metric: in-context-learning accuracy on a fixed suite of tasks, centred by chance.

Every example is scored from the model's own logits (no sampling); few-shot picks and the order of
each task's data are seeded, so results, and `--max-per-task` subsets, are the same every time.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


# ----------------------------------------------------------------------------- bundle on disk


def download_bundle(dest: Path, url: str = BUNDLE_URL, timeout: float = 60.0) -> Path:
    """Download and unpack the eval bundle into `dest`, atomically: it is unpacked in a temp dir
    beside `dest` and renamed, so a half-download never lands there."""
    import requests

    dest = Path(dest)
    if (dest / "core.yaml").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".eval_bundle-", dir=dest.parent))
    try:
        zip_path = work / "eval_bundle.zip"
        try:
            with requests.get(url, stream=True, timeout=timeout) as resp:
                resp.raise_for_status()
                with open(zip_path, "wb") as fh:
                    for chunk in resp.iter_content(chunk_size=1 << 20):
                        fh.write(chunk)
        except requests.RequestException as exc:
            raise RuntimeError(
                f"could not download the CORE eval bundle from {url} "
                f"({type(exc).__name__}: {exc}). "
                f"If this machine is offline, fetch eval_bundle.zip elsewhere, unzip it and pass "
                f"--bundle-dir /path/to/eval_bundle (or place it at {dest})"
            ) from None
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(work / "x")
        except zipfile.BadZipFile as exc:
            raise RuntimeError(
                f"{url} did not return a valid zip ({exc}); retry, or pass --bundle-dir"
            ) from None
        found = [p.parent for p in (work / "x").rglob("core.yaml")]
        if not found:
            raise RuntimeError(
                f"the archive from {url} has no core.yaml; is it the DCLM eval bundle?"
            )
        if dest.exists():  # e.g. an older incomplete copy without core.yaml
            shutil.rmtree(dest)
        os.replace(found[0], dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest


def load_bundle(bundle_dir: Path) -> tuple[list[dict], dict[str, float]]:
    """(tasks from core.yaml, {label: random baseline in percent}), validated with clear errors.

    The bundle (eval_bundle.zip, as DCLM and nanochat use it) holds core.yaml (icl_tasks: label,
    dataset_uri, num_fewshot: [k], icl_task_type, continuation_delimiter), eval_meta_data.csv
    (columns "Eval Task" = label and "Random baseline" = chance accuracy in percent) and
    eval_data/<dataset_uri> (JSON lines, fields by task type: see load_task_data)."""
    import yaml

    bundle_dir = Path(bundle_dir)
    config_path, meta_path = bundle_dir / "core.yaml", bundle_dir / "eval_meta_data.csv"
    for path in (config_path, meta_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: {bundle_dir} is not an eval bundle "
                f"(expected core.yaml, eval_meta_data.csv and eval_data/)"
            )
    with open(config_path, encoding="utf-8") as fh:
        config = yaml.safe_load(fh) or {}
    raw_tasks = config.get("icl_tasks")
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise ValueError(f"{config_path}: expected a non-empty 'icl_tasks' list")
    tasks = []
    for i, task in enumerate(raw_tasks):
        for key in ("label", "dataset_uri", "icl_task_type"):
            if key not in task:
                raise ValueError(f"{config_path}: icl_tasks[{i}] has no '{key}'")
        if task["icl_task_type"] not in TASK_TYPES:
            raise ValueError(
                f"{config_path}: task {task['label']!r} has icl_task_type "
                f"{task['icl_task_type']!r}, expected one of {TASK_TYPES}"
            )
        shots = task.get("num_fewshot", [0])
        tasks.append(
            {
                "label": task["label"],
                "task_type": task["icl_task_type"],
                "dataset_uri": task["dataset_uri"],
                "num_fewshot": int(shots[0] if isinstance(shots, list) else shots),
                "continuation_delimiter": task.get("continuation_delimiter", " "),
            }
        )
    baselines = {}
    with open(meta_path, encoding="utf-8", newline="") as fh:
        for row_no, row in enumerate(csv.DictReader(fh), start=2):
            if "Eval Task" not in row or "Random baseline" not in row:
                raise ValueError(f"{meta_path}: needs columns 'Eval Task' and 'Random baseline'")
            try:
                baselines[row["Eval Task"]] = float(row["Random baseline"])
            except ValueError:
                raise ValueError(
                    f"{meta_path} row {row_no}: 'Random baseline' "
                    f"{row['Random baseline']!r} is not a number"
                ) from None
    missing = [t["label"] for t in tasks if t["label"] not in baselines]
    if missing:
        raise ValueError(f"{meta_path}: no random baseline for tasks {missing}")
    return tasks, baselines


def load_task_data(bundle_dir: Path, task: dict) -> list[dict]:
    """The task's examples, each checked for the fields its task type needs."""
    path = Path(bundle_dir) / "eval_data" / task["dataset_uri"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (task {task['label']!r} in core.yaml)")
    need = {
        "multiple_choice": ("query", "choices", "gold"),
        "schema": ("context_options", "continuation", "gold"),
        "language_modeling": ("context", "continuation"),
    }[task["task_type"]]
    data = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {line_no}: not valid JSON ({exc})") from None
            absent = [k for k in need if k not in item]
            if absent:
                raise ValueError(
                    f"{path} line {line_no}: missing {absent} for a {task['task_type']} task"
                )
            data.append(item)
    return data


# ----------------------------------------------------------------------------- prompts


# Shots are solved examples separated by blank lines, then the example itself, once per candidate.


def render_prompts_mc(item: dict, delim: str, shots: list[dict]) -> list[str]:
    """One prompt per choice: <shots><query><delim><choice>."""
    prefix = "".join(f"{ex['query']}{delim}{ex['choices'][ex['gold']]}\n\n" for ex in shots)
    return [f"{prefix}{item['query']}{delim}{choice}" for choice in item["choices"]]


def render_prompts_schema(item: dict, delim: str, shots: list[dict]) -> list[str]:
    """One prompt per context option: <shots><context option><delim><continuation>."""
    prefix = "".join(
        f"{ex['context_options'][ex['gold']]}{delim}{ex['continuation']}\n\n" for ex in shots
    )
    return [f"{prefix}{ctx}{delim}{item['continuation']}" for ctx in item["context_options"]]


def render_prompts_lm(item: dict, delim: str, shots: list[dict]) -> list[str]:
    """[prompt without the continuation, prompt with it]."""
    prefix = "".join(f"{ex['context'].strip()}{delim}{ex['continuation']}\n\n" for ex in shots)
    without = f"{prefix}{item['context'].strip()}{delim}"
    # right-stripped: a trailing space would be a token of its own, while in the full prompt it
    # merges into the continuation's first token
    return [without.rstrip(), f"{without}{item['continuation']}"]


def _common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n


def _common_suffix_len(seqs: list[list[int]]) -> int:
    return _common_prefix_len([s[::-1] for s in seqs])


def build_sequences(
    tokenizer, task_type: str, prompts: list[str]
) -> tuple[list[list[int]], list[int], list[int]]:
    """Token rows and, per row, the [start, end) span of the tokens being scored.

    multiple_choice scores each choice after the tokens every prompt shares; schema scores the
    continuation that every prompt ends with; language_modeling its continuation."""
    bos = tokenizer.get_bos_token_id()
    rows = tokenizer.encode(prompts, prepend=bos)
    if task_type == "multiple_choice":
        # capped so every row keeps a scored token even when one choice tokenises as a prefix of
        # another
        start = min(_common_prefix_len(rows), min(len(r) for r in rows) - 1)
        return rows, [start] * len(rows), [len(r) for r in rows]
    if task_type == "schema":
        suffix = min(_common_suffix_len(rows), min(len(r) for r in rows) - 1)
        return rows, [len(r) - suffix for r in rows], [len(r) for r in rows]
    without, with_cont = rows
    # len(without) unless BPE merged a token across the seam
    start = _common_prefix_len([without, with_cont])
    return [with_cont], [start], [len(with_cont)]


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_example(model, tokenizer, item: dict, task: dict, shots: list[dict], device) -> bool:
    """True iff the model gets this example right: for choices, the candidate whose scored tokens
    have the lowest mean cross-entropy is the gold one; for language modelling, greedy argmax
    reproduces every continuation token."""
    task_type, delim = task["task_type"], task["continuation_delimiter"]
    render = {
        "multiple_choice": render_prompts_mc,
        "schema": render_prompts_schema,
        "language_modeling": render_prompts_lm,
    }[task_type]
    rows, starts, ends = build_sequences(tokenizer, task_type, render(item, delim, shots))
    max_len = model.config.sequence_len
    for i, row in enumerate(rows):
        if len(row) > max_len:  # keep the end (the part being scored), crop the oldest context
            cut = len(row) - max_len
            rows[i], starts[i], ends[i] = row[cut:], max(1, starts[i] - cut), ends[i] - cut
    for s, e in zip(starts, ends):
        if not 1 <= s < e:
            # Only an empty continuation gets here: nothing to score, count it as wrong.
            return False
    width = max(len(r) for r in rows)
    pad = tokenizer.get_bos_token_id()
    ids = torch.full((len(rows), width), pad, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
    logits = model(ids)  # (B, T, V) float32
    # position t predicts token t + 1: the scored tokens [s, e) come from positions [s-1, e-1)
    if task_type == "language_modeling":
        s, e = starts[0], ends[0]
        return bool(torch.equal(logits[0, s - 1 : e - 1].argmax(-1), ids[0, s:e]))
    mean_losses = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        mean_losses.append(F.cross_entropy(logits[i, s - 1 : e - 1], ids[i, s:e]).item())
    pred = min(range(len(mean_losses)), key=lambda j: mean_losses[j])
    return pred == int(item["gold"])


def fewshot_examples(data: list[dict], idx: int, k: int) -> list[dict]:
    """k other examples of the task, drawn with a seed of the example's own index."""
    k = min(k, len(data) - 1)
    if k <= 0:
        return []
    rng = random.Random(1234 + idx)
    others = [j for j in range(len(data)) if j != idx]
    return [data[j] for j in rng.sample(others, k)]


def evaluate_task(model, tokenizer, data: list[dict], task: dict, device) -> float:
    """Accuracy on `data`: rank r scores examples r, r + W, ...; the correct-flags are summed
    across ranks."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in range(rank, len(data), world):
        shots = fewshot_examples(data, idx, task["num_fewshot"])
        correct[idx] = float(score_example(model, tokenizer, data[idx], task, shots, device))
    if world > 1:
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item() if len(data) else float("nan")


def centered(accuracy: float, baseline_percent: float) -> float:
    """0 at chance, 1 perfect."""
    b = 0.01 * baseline_percent
    return (accuracy - b) / (1.0 - b)


def evaluate_core(
    model,
    tokenizer,
    bundle_dir: Path,
    device,
    max_per_task: int = -1,
    only: list[str] | None = None,
    log=print,
) -> dict:
    """Run every task in the bundle (or those in `only`).

    -> {"results": {label: accuracy}, "centered": {label: centred}, "core": mean centred}."""
    tasks, baselines = load_bundle(bundle_dir)
    if only:
        unknown = sorted(set(only) - {t["label"] for t in tasks})
        if unknown:
            raise ValueError(
                f"unknown task labels {unknown}; the bundle has {[t['label'] for t in tasks]}"
            )
        tasks = [t for t in tasks if t["label"] in only]
    was_training = model.training
    model.eval()
    results, centred = {}, {}
    try:
        for task in tasks:
            t0 = time.time()
            data = load_task_data(bundle_dir, task)
            random.Random(1337).shuffle(data)
            if max_per_task > 0:
                data = data[:max_per_task]
            acc = evaluate_task(model, tokenizer, data, task, device)
            results[task["label"]] = acc
            centred[task["label"]] = centered(acc, baselines[task["label"]])
            log(
                f"{task['label']:<36} n={len(data):<5} acc={acc:.4f} "
                f"centered={centred[task['label']]:+.4f} "
                f"({time.time() - t0:.1f}s)"
            )
    finally:
        model.train(was_training)
    core = sum(centred.values()) / len(centred) if centred else float("nan")
    return {"results": results, "centered": centred, "core": core}
