"""May this command go on with a run that was made with other settings? (run_aquarat_small.sh)

    uv run python -m scripts.check_run_settings RUN_DIR "OLD SETTINGS" "NEW SETTINGS"

A settings line is the orchestrator's: run-level settings (`profile=gpu seed=42 depth=8 ...`) then
one `STAGE=[ARGS]` entry per --stage-args. Exit 0 when the run may go on with the new line, 2 with
a message when it may not:

- any run-level change is refused (the finished stages were trained with the old ones);
- a changed --stage-args of a stage that has not finished is allowed: the stage has not run, or it
  resumes from a checkpoint and refuses by itself the flags that change what it trains;
- a changed --stage-args of a finished stage is allowed only when every changed flag is one that
  stage may change on a resume (cadence, checkpoints kept, logging: nanochat.training's
  HARMLESS_FLAGS, and the chat stages' RESUME_HARMLESS); anything else would skip a stage trained
  with the old flags under a settings line that claims the new ones.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

STAGE_ENTRY = re.compile(r" ?(\w+)=\[(.*?)\](?= \w+=\[|$)")
TRAINING_STAGES = ("base", "mid", "sft", "rl")


def split_settings(line: str) -> tuple[str, dict[str, str]]:
    """(run-level settings, {stage: its --stage-args})."""
    first = re.search(r" \w+=\[", line)
    cut = first.start() if first else len(line)
    return line[:cut].strip(), {m[1]: m[2].strip() for m in STAGE_ENTRY.finditer(line[cut:])}


def stage_flags(stage: str, words: list[str]) -> tuple[dict, set[str]]:
    """The stage's parsed flags for these words (defaults elsewhere) and the flags it may change
    on a resume."""
    from nanochat.training import HARMLESS_FLAGS

    if stage == "base":
        from scripts.base_train import parse_args

        return vars(parse_args(words)), set(HARMLESS_FLAGS)
    if stage in ("mid", "sft"):
        from scripts.chat_sft import RESUME_HARMLESS, build_parser

        return vars(build_parser(stage).parse_args(words)), HARMLESS_FLAGS | RESUME_HARMLESS
    from nanochat.rl_config import RESUME_SAFE, build_parser

    return vars(build_parser().parse_args(words)), HARMLESS_FLAGS | RESUME_SAFE


def training_changes(stage: str, old: str, new: str) -> list[str]:
    """The flags of `stage` that differ between two --stage-args and change what it trains."""
    if stage not in TRAINING_STAGES:
        return [f"{old or '(none)'} -> {new or '(none)'}"] if old != new else []
    old_flags, harmless = stage_flags(stage, shlex.split(old))
    new_flags, _ = stage_flags(stage, shlex.split(new))
    return [
        f"--{k.replace('_', '-')} {old_flags[k]} -> {new_flags[k]}"
        for k in new_flags
        if k not in harmless and old_flags.get(k) != new_flags[k]
    ]


def finished(run_dir: Path, stage: str) -> bool:
    if stage == "eval":  # --stage-args eval=... applies to the three evaluations
        return any((run_dir / f".done_eval_{s}").exists() for s in ("mid", "sft", "rl"))
    return (run_dir / f".done_{stage}").exists()


def problems(run_dir: Path, old_line: str, new_line: str) -> list[str]:
    old_run, old_stages = split_settings(old_line)
    new_run, new_stages = split_settings(new_line)
    found = []
    if old_run != new_run:
        found.append(f"run settings: {old_run} -> {new_run}")
    for stage in sorted(set(old_stages) | set(new_stages)):
        old, new = old_stages.get(stage, ""), new_stages.get(stage, "")
        if old == new or not finished(run_dir, stage):
            continue
        changes = training_changes(stage, old, new)
        if changes:
            found.append(f"{stage} (finished): {', '.join(changes)}")
        else:
            print(
                f"[pipeline] --stage-args for {stage} changed ({old!r} -> {new!r}): flags that "
                "change nothing it trained, so the run goes on"
            )
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("old", help="the settings line the run was made with")
    p.add_argument("new", help="the settings line this command asks for")
    args = p.parse_args(argv)
    found = problems(args.run_dir, args.old, args.new)
    if not found:
        return 0
    print(f"run '{args.run_dir.name}' was made with: {args.old}", file=sys.stderr)
    print(f"this command asks for:  {args.new}", file=sys.stderr)
    print(
        "These changes would mix two sets of settings in one run: " + "; ".join(found) + ".\n"
        "Use another --run NAME for a separate run, or redo this one with the new settings: "
        "--force (every stage) or --from STAGE (that stage and the later ones). Flags that "
        "change no result (cadence, --keep-last, logging) may change on a resume.",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
