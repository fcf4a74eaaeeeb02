"""The user's docs stay true to the code: every command they show runs a module that exists with
flags it has, and every variable they name is one the code reads."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the README is the manual's front page; docs/ holds its chapters, every one checked like it
CHAPTERS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))
MANUAL = ["README.md", "QUICKSTART.md", "LAMBDA_MANUAL_SETUP.md", *CHAPTERS]
DOCS = [*MANUAL, ".env.template", "rustbpe/README.md"]
README_MAX_LINES = 200
# argparse helpers that scripts add to their own parsers
SHARED_ARG_FILES = ["nanochat/tracking.py", "nanochat/chat_mixture.py", "nanochat/training.py"]
STOP_TOKENS = {"|", "||", "&&", ";", "#", ">", "2>&1"}


def _argparse_flags(path: Path) -> set[str]:
    """Every "--flag" string in the file's add_argument(...) calls (flags precede help texts), and
    --no-flag for a BooleanOptionalAction; and the flags generated from its config fields
    (`name: type = knob(...)`, nanochat/config.py), with their aliases and --no- forms."""
    flags = set()
    text = path.read_text()
    for call in re.findall(r"add_argument\([^)]*", text):
        names = re.findall(r'"(--[a-z0-9-]+)"', call)
        flags.update(names)
        if "BooleanOptionalAction" in call:
            flags.update("--no-" + name[2:] for name in names)
    # a knob's declaration runs from its name to the next field or blank line
    for name, call in re.findall(
        r"^\s+(\w+): [^=\n]+= ((?:knob|with_default)\(.*?)(?=^\s+\w+: |^\s*$)", text, re.M | re.S
    ):
        flag = "--" + name.replace("_", "-")
        flags.add(flag)
        flags.update(re.findall(r'aliases=\("(--[a-z0-9-]+)"', call))
        if "negatable=True" in call:
            flags.add("--no-" + flag[2:])
    return flags


def _module_flags(path: Path) -> set[str]:
    """A stage's flags, following thin aliases (mid_train and sft_train run chat_sft's main) and
    the config module its parser is generated from (chat_rl: nanochat/rl_config.py)."""
    flags = _argparse_flags(path)
    text = path.read_text()
    for alias in re.findall(r"^from scripts\.(\w+) import main", text, re.M):
        flags |= _argparse_flags(REPO / "scripts" / f"{alias}.py")
    for module in re.findall(r"^from nanochat\.(\w+_config) import", text, re.M):
        flags |= _argparse_flags(REPO / "nanochat" / f"{module}.py")
    return flags


def _orchestrator_flags() -> set[str]:
    text = (REPO / "run_aquarat_small.sh").read_text()
    return set(re.findall(r"^\s+(--[a-z-]+)\)", text, re.M)) | {"-h", "--help"}


def _commands(text: str):
    """Shell commands in the docs: code blocks (continuation lines joined) and `inline code`,
    which may wrap onto the next line as Markdown allows."""
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, re.S):
        yield from block.replace("\\\n", " ").splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    yield from (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose))


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
                    known = _module_flags(path) | shared | {"--help"}
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


def _anchors(text: str) -> set[str]:
    """The anchors GitHub gives the headings: lower case, punctuation dropped, spaces to dashes."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", prose, re.M)
    }


@pytest.mark.parametrize("doc", MANUAL)
def test_relative_links_resolve(doc):
    """Links are relative to the linking file (as GitHub resolves them), and an anchor names a
    heading of the file it points into: a section moved to docs/ leaves no dead link behind."""
    text = (REPO / doc).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        linked = ((REPO / doc).parent / path).resolve() if path else REPO / doc
        assert linked.exists(), f"{doc} links to {path}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked.read_text()), (
                f"{doc} links to {target}: {linked.relative_to(REPO)} has no such heading"
            )


def test_no_code_or_doc_points_into_a_readme_section_that_moved():
    """Links and hints that name a README section by its anchor must find it there; the code's
    printed hints point at the chapter in docs/ that holds the section now."""
    readme = _anchors((REPO / "README.md").read_text())
    sources = [*MANUAL, "rustbpe/README.md", ".env.template"]
    sources += [p.relative_to(REPO).as_posix() for p in REPO.glob("*.py")]
    sources += [p.relative_to(REPO).as_posix() for p in REPO.glob("*.sh")]
    for pattern in ("nanochat/**/*.py", "scripts/*.py", "scripts/*.sh", "tasks/*.py"):
        sources += [p.relative_to(REPO).as_posix() for p in REPO.glob(pattern)]
    problems = [
        f"{name}: README.md#{anchor}"
        for name in sources
        for anchor in re.findall(r"README\.md#([\w-]+)", (REPO / name).read_text())
        if anchor not in readme
    ]
    assert problems == []


def test_readme_is_a_short_manual_that_links_every_chapter():
    """The README is read in five minutes: at most ~200 lines, and every file in docs/ is one
    link away. It keeps the test command that CI runs."""
    text = (REPO / "README.md").read_text()
    lines = text.count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines (at most {README_MAX_LINES})"
    assert CHAPTERS, "docs/ has no chapters"
    linked = {
        ((REPO / target.partition("#")[0]).resolve())
        for target in re.findall(r"\]\(([^)\s#]+)(?:#[^)]*)?\)", text)
    }
    missing = [doc for doc in CHAPTERS if (REPO / doc).resolve() not in linked]
    assert missing == [], f"README.md does not link {missing}"
    assert "uv run pytest" in (REPO / ".ci" / "run").read_text()
    assert re.search(r"^uv run pytest\s*$", text, re.M), "README.md lost CI's test command"
    for name in ("bash run_aquarat_small.sh", "uv run launch_lambda.py"):
        assert name in text, f"README.md lost the command {name}"


# flags of tools other than this project's scripts that the docs show
FOREIGN_FLAGS = {
    "--index-url",  # uv pip install
    "--reinstall",
    "--reinstall-package",  # uv sync
    "--manifest-path",  # cargo test
    "--check",  # ruff format
    "--nproc_per_node",  # torchrun
    "--standalone",
    "--data",  # curl (LAMBDA_MANUAL_SETUP.md)
    "--exclude",  # rsync, tar
    "--format",  # nvidia-smi
    "--user",  # pip install --user (scripts/install_uv.sh)
}


def test_every_flag_named_in_the_manual_exists():
    """A flag in a doc's code, commands or prose (`--kl-sample-frac`) is one that some parser of
    the project (a stage, the orchestrator, the launcher) or the named foreign tool accepts."""
    known = _orchestrator_flags() | {"--help"} | FOREIGN_FLAGS
    for pattern in ("scripts/*.py", "nanochat/**/*.py", "*.py"):
        for path in REPO.glob(pattern):
            known |= _argparse_flags(path)
    problems = [
        f"{doc} names {flag}, which no parser has"
        for doc in MANUAL
        for flag in sorted(
            set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", (REPO / doc).read_text()))
        )
        if flag.replace("_", "-") not in known and flag not in known
    ]
    assert problems == []


def test_metric_names_in_the_manual_are_logged_by_the_code():
    """The dashboard's names in the docs (`rl/kl_letter_mean`, `attn/entropy/layer_<i>`) appear in
    the code that logs them (a placeholder such as <i> or <task> stands for an f-string field)."""
    code = "\n".join(
        p.read_text() for pattern in ("nanochat/*.py", "scripts/*.py") for p in REPO.glob(pattern)
    )
    problems = []
    for doc in MANUAL:
        text = (REPO / doc).read_text()
        for name in sorted(set(re.findall(r"`((?:rl|attn|train|val|core|final)/[^`\s]+)`", text))):
            stem = re.split(r"<|\.\.\.|…|@", name)[0]
            stem = re.sub(r"/[A-E]$", "/", stem)  # letter_pred_counts/A: an f-string per letter
            if stem.rstrip("/") and stem not in code:
                problems.append(f"{doc} names {name}, which no code logs")
    assert problems == []
