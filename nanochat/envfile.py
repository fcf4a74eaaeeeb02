"""Print shell `export` lines for a .env file's variables that the environment does not set yet.

    eval "$(.venv/bin/python -m nanochat.envfile .env)"      # what run_aquarat_small.sh does

python-dotenv reads the file (the same reading launch_lambda.py gets); variables already in the
environment win, empty values are skipped, a leading "~/" is expanded, and values are
shell-quoted. Nothing is printed but the export lines themselves, which the calling shell
evaluates: no value reaches a log.
"""

from __future__ import annotations

import os
import shlex
import sys

from dotenv import dotenv_values


def export_lines(path: str) -> list[str]:
    lines = []
    for key, value in dotenv_values(path).items():
        if not value or key in os.environ:
            continue
        if not key.isidentifier():
            print(f"{path}: '{key}' is not a valid variable name; ignored", file=sys.stderr)
            continue
        # python-dotenv leaves "~" alone (a shell would expand it): NANOCHAT_BASE_DIR=~/x in .env
        # would make a directory literally named "~"
        if value == "~" or value.startswith("~/"):
            value = os.path.expanduser(value)
        lines.append(f"export {key}={shlex.quote(value)}")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(sys.argv[1]):
        raise SystemExit("usage: uv run python -m nanochat.envfile PATH_TO_DOTENV (existing file)")
    print("\n".join(export_lines(sys.argv[1])))
