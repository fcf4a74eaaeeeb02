"""The user's docs stay true to the code: every command they show runs a module that exists with
flags it has, and every variable they name is one the code reads."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    "README.md",
    "QUICKSTART.md",
    "LAMBDA_MANUAL_SETUP.md",
    ".env.template",
    "rustbpe/README.md",
    "docs/gpu-node.md",
]
# argparse helpers that scripts add to their own parsers
SHARED_ARG_FILES = ["nanochat/tracking.py", "nanochat/chat_mixture.py", "nanochat/training.py"]
STOP_TOKENS = {"|", "||", "&&", ";", "#", ">", "2>&1"}


def _argparse_flags(path: Path) -> set[str]:
    """Every "--flag" string in the file's add_argument(...) calls (flags precede help texts)."""
    calls = re.findall(r"add_argument\([^)]*", path.read_text())
    return set(re.findall(r'"(--[a-z0-9-]+)"', "".join(calls)))


def _orchestrator_flags() -> set[str]:
    text = (REPO / "run_aquarat_small.sh").read_text()
    return set(re.findall(r"^\s+(--[a-z-]+)\)", text, re.M)) | {"-h", "--help"}


def _commands(text: str):
    """Shell commands in the docs: code blocks (continuation lines joined) and `inline code`."""
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        yield from block.replace("\\\n", " ").splitlines()
    yield from re.findall(r"`([^`\n]+)`", text)


def _flags_after(tokens: list[str]) -> list[str]:
    flags = []
    for tok in tokens:
        if tok in STOP_TOKENS or tok.startswith("#"):
            break
        if re.fullmatch(r"--[a-z][a-z0-9-]*(=.*)?", tok):
            flags.append(tok.split("=")[0])
    return flags


def _doc_texts():
    for name in DOCS:
        path = REPO / name
        if path.is_file():
            yield name, path.read_text()


def test_shown_commands_use_real_modules_and_flags():
    shared = set().union(*(_argparse_flags(REPO / f) for f in SHARED_ARG_FILES))
    orchestrator = _orchestrator_flags()
    launcher = _argparse_flags(REPO / "nanochat/launcher/cli.py")
    problems, checked = [], 0
    for doc, text in _doc_texts():
        for command in _commands(text):
            tokens = command.replace("$ ", " ").split()
            for i, tok in enumerate(tokens):
                if (
                    tok == "-m"
                    and i + 1 < len(tokens)
                    and re.fullmatch(r"(scripts|nanochat)\.\w+", tokens[i + 1])
                ):
                    module = tokens[i + 1]
                    path = REPO / (module.replace(".", "/") + ".py")
                    if not path.is_file():
                        problems.append(f"{doc}: `{command}` runs {module}, which does not exist")
                        continue
                    known = _argparse_flags(path) | shared | {"--help"}
                    problems += [
                        f"{doc}: `{command}`: {module} has no {flag}"
                        for flag in _flags_after(tokens[i + 2 :])
                        if flag not in known
                    ]
                    checked += 1
                elif tok.endswith("run_aquarat_small.sh"):
                    problems += [
                        f"{doc}: `{command}`: run_aquarat_small.sh has no {flag}"
                        for flag in _flags_after(tokens[i + 1 :])
                        if flag not in orchestrator
                    ]
                    checked += 1
                elif tok.endswith("launch_lambda.py"):
                    rest = tokens[i + 1 :]
                    cut = rest.index("--") if "--" in rest else len(rest)
                    problems += [
                        f"{doc}: `{command}`: launch_lambda.py has no {flag}"
                        for flag in _flags_after(rest[:cut])
                        if flag not in launcher | {"--help"}
                    ]
                    problems += [
                        f"{doc}: `{command}`: run_aquarat_small.sh has no {flag}"
                        for flag in _flags_after(rest[cut + 1 :])
                        if flag not in orchestrator
                    ]
                    checked += 1
    assert checked > 40  # the parser found the commands (a broken regex would check nothing)
    assert problems == []


def test_named_variables_are_read_by_the_code():
    code = "\n".join(
        p.read_text()
        for pattern in (
            "nanochat/*.py",
            "nanochat/launcher/*.py",
            "scripts/*.py",
            "tasks/*.py",
            "*.py",
            "*.sh",
            "rustbpe/src/*.rs",
        )
        for p in REPO.glob(pattern)
    )
    problems = []
    for doc, text in _doc_texts():
        for var in sorted(set(re.findall(r"\b((?:NANOCHAT|WANDB|HF|LAMBDA)_[A-Z_]+)\b", text))):
            if var not in code:
                problems.append(f"{doc} names {var}, which no code reads")
    assert problems == []


def test_shown_commands_work_outside_the_venv():
    """A command pasted into a fresh terminal has no activated .venv: project commands go through
    `uv run` (or name .venv/bin/...), and nothing asks for `pip install` or a `python` command,
    which PEP 668 refuses or stock Ubuntu lacks."""
    bare = re.compile(
        r"(?<!uv run )(?<![/\w])(python3? -m (scripts|nanochat)\.|torchrun --|wandb (sync|login)"
        r"|python launch_lambda\.py|pip install requests)"
    )
    problems = [
        f"{doc}: `{command.strip()}`"
        for doc, text in _doc_texts()
        for command in _commands(text)
        if bare.search(command)
    ]
    assert problems == []


@pytest.mark.parametrize(
    "doc", ["README.md", "QUICKSTART.md", "LAMBDA_MANUAL_SETUP.md", "docs/gpu-node.md"]
)
def test_relative_links_resolve(doc):
    text = (REPO / doc).read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", text, re.M)
    }
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (REPO / path).exists(), f"{doc} links to {path}, which does not exist"
        elif anchor:
            assert anchor in anchors, f"{doc} links to #{anchor}, which is no heading"
