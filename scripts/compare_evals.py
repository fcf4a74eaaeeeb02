"""Paired comparison of two checkpoints' greedy answers on the same problems, with a sign test.

    uv run python -m scripts.compare_evals sft rl <base>/runs/aquarat_small/chat_eval.jsonl
    uv run python -m scripts.compare_evals sft rl runA/chat_eval.jsonl runB/chat_eval.jsonl # pooled
    uv run python -m scripts.compare_evals sft sft new_s42/chat_eval.jsonl new_s1/chat_eval.jsonl \
        --b-files old_s42/chat_eval.jsonl old_s1/chat_eval.jsonl      # two configs, seed by seed

For each chat_eval.jsonl given (one per run or seed), the newest generative line of each source for
the task and split is taken (B from the matching --b-files file when given); both must cover the
same problems. Per file and pooled: problems both
get right, only A, only B, neither; the accuracy of each; and the exact two-sided sign test on the
discordant pairs (under "A and B are equally good", only-A vs only-B is Binomial(n, 1/2)).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nanochat.report import paired_counts, sign_test
from nanochat.tracking import read_jsonl


def newest_row(rows: list[dict], source: str, task: str, split: str, path: Path) -> dict:
    found = [
        r
        for r in rows
        if r.get("source") == source
        and r.get("task") == task
        and r.get("split") == split
        and r.get("mode") == "generative"
        and "per_problem" in r
    ]
    if not found:
        raise SystemExit(
            f"{path}: no generative chat_eval line of source {source!r} on {task}/{split} with "
            f"per-problem results (run scripts.chat_eval -i {source} first)"
        )
    return found[-1]


def table_row(label: str, c: dict, p_value: float) -> str:
    """One line of the table: n, both accuracies, the four-way counts but 'neither', p."""
    n = max(c["n"], 1)
    return (
        f"{label[-48:]:<48} {c['n']:>5} {c['a_right'] / n:>9.3f} {c['b_right'] / n:>9.3f} "
        f"{c['both']:>5} {c['a_only']:>9} {c['b_only']:>9} {p_value:>8.2g}"
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        description="Paired greedy comparison of two checkpoints (see the docstring)."
    )
    p.add_argument("a", help="source A (e.g. sft)")
    p.add_argument("b", help="source B (e.g. rl)")
    p.add_argument("files", nargs="+", type=Path, help="chat_eval.jsonl files, one per run; pooled")
    p.add_argument(
        "--task",
        default="synthetic_aqua",
        help="task name in the eval lines (aqua, synthetic_aqua)",
    )
    p.add_argument("--split", default="test")
    p.add_argument(
        "--b-files",
        nargs="+",
        type=Path,
        default=None,
        help="read B from these files instead, one per file above and in the same order (e.g. "
        "another model config's runs with the same seeds)",
    )
    args = p.parse_args(argv)
    b_files = args.b_files or args.files
    if len(b_files) != len(args.files):
        raise SystemExit(f"{len(args.files)} files for A but {len(b_files)} --b-files for B")
    pooled = {"both": 0, "a_only": 0, "b_only": 0, "neither": 0, "n": 0, "a_right": 0, "b_right": 0}
    print(
        f"{'file':<48} {'n':>5} {args.a + ' acc':>9} {args.b + ' acc':>9} {'both':>5} "
        f"{args.a + ' only':>9} {args.b + ' only':>9} {'p':>8}"
    )
    for path, b_path in zip(args.files, b_files):
        for f in {path, b_path}:
            if not f.is_file():
                raise SystemExit(f"{f}: no such file")
        ra = newest_row(read_jsonl(path), args.a, args.task, args.split, path)
        rb = newest_row(read_jsonl(b_path), args.b, args.task, args.split, b_path)
        if len(ra["per_problem"]) != len(rb["per_problem"]):
            raise SystemExit(
                f"{path}: {args.a} was scored on {len(ra['per_problem'])} problems, {args.b} on "
                f"{len(rb['per_problem'])}: evaluate both with the same --max-problems"
            )
        if not ra["per_problem"]:
            raise SystemExit(f"{path}: the {args.a} and {args.b} lines cover no problems")
        c = paired_counts(ra["per_problem"], rb["per_problem"])
        for k in pooled:
            pooled[k] += c[k]
        print(table_row(str(path), c, sign_test(c["a_only"], c["b_only"])))
    p_value = sign_test(pooled["a_only"], pooled["b_only"])
    print(table_row("pooled", pooled, p_value))
    return {**pooled, "p": p_value}


if __name__ == "__main__":
    main()
