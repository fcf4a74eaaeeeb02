"""A newcomer's first day: the README's commands work as written in a fresh terminal, a GPU node
whose driver is too old is told so before minutes of set-up are billed, and the orchestrator's
flags mean what the docs say (issue 23)."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanochat import driver_check, envfile, wandb_login
from scripts import check_run_settings

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_aquarat_small.sh"
REAL_PYTHON = os.path.realpath(sys.executable)


def fresh_terminal(tmp_path, extra_path=()):
    """The environment of a new terminal on a fresh machine: an empty HOME, a stock PATH with a
    python3 (and nothing from this machine's set-up, such as ~/.local/bin)."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    if not (tools / "python3").exists():
        (tools / "python3").symlink_to(REAL_PYTHON)
    path = ":".join([*map(str, extra_path), str(tools), "/usr/bin", "/bin"])
    env = {"HOME": str(home), "PATH": path, "LANG": "C.UTF-8", "SHELL": "/bin/bash"}
    # pip's cache outside the empty HOME: a second test run does not download uv again
    env["PIP_CACHE_DIR"] = os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))
    return home, env


def shell(command, env, login=False, timeout=300):
    argv = ["bash", "-l", "-c", command] if login else ["bash", "-c", command]
    return subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


# -----------------------------------------------------------------------------
# 1. uv on PATH after the set-up


def test_setup_leaves_uv_usable_in_the_same_terminal_and_in_new_ones(tmp_path):
    """Set-up (scripts/install_uv.sh, as run_aquarat_small.sh sources it) from a fresh terminal
    whose PATH has ~/bin, then the README's next command in that terminal: `uv` is found. Then a
    terminal whose PATH has no directory we may write: new shells find uv, and the set-up says
    what to type in the current one."""
    if shutil.which("uv", path="/usr/bin:/bin"):
        pytest.skip("uv is installed system-wide here: a fresh machine's path cannot be tested")
    home, env = fresh_terminal(tmp_path)
    (home / "bin").mkdir()  # Debian's and Ubuntu's ~/.profile put ~/bin on PATH when it exists
    env["PATH"] = f"{home / 'bin'}:{env['PATH']}"
    setup = shell("source scripts/install_uv.sh", env)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert f"uv linked into {home / 'bin'}" in setup.stdout
    second = shell("uv --version", env)  # the README's second command, in the same terminal
    assert second.returncode == 0 and second.stdout.startswith("uv "), second.stderr

    # No writable directory on PATH (a non-root user whose login shell lacks ~/.local/bin).
    _, env = fresh_terminal(tmp_path)
    setup = shell('source scripts/install_uv.sh; echo "NOTE=$UV_PATH_NOTE"', env)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    assert "this terminal's PATH lacks" in setup.stdout
    assert f'export PATH="{home / ".local" / "bin"}:$PATH"' in setup.stdout
    for login in (True, False):  # a new terminal: a login shell, or bash reading ~/.bashrc
        check = "uv --version" if login else "source ~/.bashrc; uv --version"
        new_terminal = shell(check, env, login=login)
        assert new_terminal.returncode == 0, new_terminal.stderr
    again = shell("source scripts/install_uv.sh", env)  # the startup line is added once only
    assert again.returncode == 0
    assert (home / ".profile").read_text().count("added by nanochat-aquarat") == 1


# -----------------------------------------------------------------------------
# 2 and 15. The NVIDIA driver, checked before `uv sync`; nvidia-smi read without SIGPIPE


def fake_nvidia_smi(bin_dir: Path, driver: str, gpus: int = 8, delay: float = 0.05):
    """An nvidia-smi that writes its lines one by one, slowly, as a busy driver does: a reader
    that closes the pipe early (grep -q, head) makes it die of SIGPIPE."""
    bin_dir.mkdir(exist_ok=True)
    lines = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})" for i in range(gpus))
    drivers = "\n".join([driver] * gpus)
    (bin_dir / "nvidia-smi").write_text(f"""#!/usr/bin/env bash
case "$*" in
  *driver_version*) out='{drivers}' ;;
  *) out='{lines}' ;;
esac
while IFS= read -r line; do echo "$line"; sleep {delay}; done <<< "$out"
""")
    (bin_dir / "nvidia-smi").chmod(0o755)


def test_driver_requirement_comes_from_the_lock_file(tmp_path):
    assert driver_check.required_driver() == (13, 580)  # torch 2.15's CUDA 13 wheels
    assert driver_check.driver_problem("580.65.06") is None
    message = driver_check.driver_problem("550.90.07")
    assert "550.90.07 is too old" in message and "needs driver >= 580" in message
    assert "--no-sync" in message  # and the way to keep the old driver
    lock = tmp_path / "uv.lock"
    lock.write_text('[[package]]\nname = "nvidia-cuda-runtime-cu12"\nversion = "12.8.90"\n')
    assert driver_check.required_driver(lock) == (12, 525)
    assert driver_check.driver_problem("550.90.07", lock) is None
    assert driver_check.driver_problem("garbage", lock) is None  # unknown: no false alarm


def test_old_driver_is_refused_before_uv_sync(tmp_path):
    """A node whose driver is too old: the script stops before installing uv or syncing (which
    would spend minutes of a billed node), every time, although nvidia-smi writes slowly."""
    fake_nvidia_smi(tmp_path / "bin", "550.90.07")
    for _ in range(2):
        res = subprocess.run(
            ["bash", str(SCRIPT), "--profile", "gpu"],
            cwd=REPO,
            env={
                **os.environ,
                "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
                "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 2, res.stdout + res.stderr
        assert "NVIDIA driver 550.90.07 is too old" in res.stderr
        assert "[setup]" not in res.stdout and "Resolved" not in res.stderr  # no set-up ran
        assert not (tmp_path / "base").exists()


def test_gpus_torch_cannot_use_are_reported_not_exit_141(tmp_path):
    """nvidia-smi lists GPUs that torch does not see (a driver new enough by the lock, but, say,
    CUDA_VISIBLE_DEVICES or a broken install): the refusal with its message, every time, never a
    silent SIGPIPE exit 141 from a pipe closed early."""
    fake_nvidia_smi(tmp_path / "bin", "580.65.06", gpus=40, delay=0.01)
    for _ in range(2):
        res = subprocess.run(
            ["bash", str(SCRIPT), "--profile", "gpu", "--no-sync", "--run", "p141"],
            cwd=REPO,
            env={
                **os.environ,
                "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
                "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
                "NANOCHAT_PYTHON": sys.executable,
                "CUDA_VISIBLE_DEVICES": "",
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 2, f"exit {res.returncode}: {res.stdout[-500:]}{res.stderr}"
        assert "nvidia-smi sees GPUs (driver 580.65.06)" in res.stderr


def test_no_pipeline_in_the_scripts_closes_its_pipe_early():
    """The audit, kept: no `| head`, `| grep -q` or `| grep -m` in the shell scripts, whose
    writer would die of SIGPIPE under pipefail when it is still writing."""
    import re

    offenders = []
    for path in [SCRIPT, *REPO.glob("scripts/*.sh"), REPO / ".ci" / "run"]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
            if re.search(r"\|\s*(head\b|grep\s+-\w*[qm])", code):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []


# -----------------------------------------------------------------------------
# 7, 13. Orchestrator flags


@pytest.mark.parametrize("profile", ["cpu", "smoke"])
@pytest.mark.parametrize("stage", ["data", "base_eval"])
def test_from_a_stage_the_profile_never_runs_is_refused(tmp_path, profile, stage):
    res = subprocess.run(
        ["bash", str(SCRIPT), "--profile", profile, "--from", stage, "--no-sync"],
        cwd=REPO,
        env={**os.environ, "NANOCHAT_BASE_DIR": str(tmp_path / "base")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2
    assert f"--from {stage}: the {profile} profile has no {stage} stage" in res.stderr
    assert not (tmp_path / "base").exists()  # refused before anything was written


def test_no_wandb_is_an_orchestrator_flag():
    text = SCRIPT.read_text()
    assert "--no-wandb)" in text and "export WANDB_MODE=disabled" in text
    res = subprocess.run(
        ["bash", str(SCRIPT), "--no-wandb", "--help"], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0 and "--no-wandb" in res.stdout


def test_wandb_disabled_writes_no_wandb_files(tmp_path, monkeypatch):
    from nanochat.tracking import Tracker

    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tracker = Tracker("base", run="nw")
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    assert (tmp_path / "runs" / "nw" / "base.jsonl").is_file()
    assert not (tmp_path / "runs" / "nw" / "wandb").exists()


# -----------------------------------------------------------------------------
# 8. Which changes of --stage-args a run accepts


def test_run_settings_accept_flags_that_change_no_result(tmp_path, capsys):
    old = "profile=cpu seed=42 base=[--eval-every 100] rl=[--num-steps 8]"
    for stage in ("base", "rl"):
        (tmp_path / f".done_{stage}").touch()
    ok = (
        "profile=cpu seed=42 base=[--eval-every 50 --keep-last 1] rl=[--num-steps 8 --attn-every 2]"
    )
    assert check_run_settings.problems(tmp_path, old, ok) == []
    assert "--stage-args for base changed" in capsys.readouterr().out
    bad = "profile=cpu seed=42 base=[--eval-every 100] rl=[--num-steps 9]"
    assert check_run_settings.problems(tmp_path, old, bad) == ["rl (finished): --num-steps 8 -> 9"]
    # a stage that has not finished decides on its own resume (it refuses training flags itself)
    pending = "profile=cpu seed=42 base=[--eval-every 100] rl=[--num-steps 8] sft=[--lr 3]"
    assert check_run_settings.problems(tmp_path, old, pending) == []
    assert check_run_settings.problems(tmp_path, old, old.replace("seed=42", "seed=1")) == [
        "run settings: profile=cpu seed=42 -> profile=cpu seed=1"
    ]
    (tmp_path / ".done_eval_mid").touch()  # evaluations are not resumable: any change is refused
    assert check_run_settings.problems(tmp_path, old, old + " eval=[--max-problems 9]") != []


# -----------------------------------------------------------------------------
# 11. .env and W&B logins


def test_env_file_expands_home(tmp_path, monkeypatch):
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    env_path = tmp_path / ".env"
    env_path.write_text("NANOCHAT_BASE_DIR=~/nanochat-base\nWANDB_PROJECT=p\n")
    lines = envfile.export_lines(str(env_path))
    assert f"export NANOCHAT_BASE_DIR={tmp_path}/nanochat-base" in lines
    assert not any("~" in line for line in lines)


def test_base_dir_from_the_environment_expands_home(monkeypatch, tmp_path):
    from nanochat.files import get_base_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NANOCHAT_BASE_DIR", "~/base-here")
    assert Path(get_base_dir()) == tmp_path / "base-here"


def test_wandb_login_key_is_read_from_netrc(tmp_path, monkeypatch):
    """`wandb login` stores the key in ~/.netrc: the runs are then online, not offline."""
    from nanochat.tracking import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    assert wandb_login.stored_api_key() is None and wandb_mode() == "offline"
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc123key\n")
    netrc.chmod(0o600)
    assert wandb_login.stored_api_key() == "abc123key"
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # another server's key
    assert wandb_login.stored_api_key() is None


# -----------------------------------------------------------------------------
# 3. The manual set-up's curl helper, in bash and in zsh (macOS's default shell)


def _manual_helper() -> str:
    text = (REPO / "LAMBDA_MANUAL_SETUP.md").read_text()
    start = text.index("lambda_api() {")
    return text[start : text.index("\n}", start) + 2]


@pytest.mark.parametrize("sh", ["bash", "zsh"])
def test_manual_lambda_api_helper_sends_its_body(sh, tmp_path):
    if not shutil.which(sh):
        pytest.skip(f"{sh} is not installed (.ci/run installs zsh)")
    import http.server
    import json
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            seen.append(
                (
                    self.path,
                    self.headers.get("Authorization"),
                    self.headers.get("Content-Type"),
                    body,
                )
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"data": {}}')

        do_GET = do_POST

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/api/v1"
    helper = _manual_helper().replace("https://cloud.lambda.ai/api/v1", base)
    script = (
        helper + '\nlambda_api POST /ssh-keys \'{"name": "laptop"}\'\nlambda_api GET /ssh-keys\n'
    )
    try:
        res = subprocess.run(
            [sh, "-c", script],
            env={**os.environ, "LAMBDA_API_KEY": "k3y"},
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        server.shutdown()
    assert res.returncode == 0, res.stderr
    post, get = seen
    assert post[:3] == ("/api/v1/ssh-keys", "Bearer k3y", "application/json")
    assert json.loads(post[3]) == {"name": "laptop"}
    assert get[3] == b"" and get[2] is None


# -----------------------------------------------------------------------------
# 4. Commands printed to the user work as pasted (uv run ..., not a bare python outside .venv)


def test_printed_commands_run_in_the_project_environment():
    import ast
    import re

    commands = r"python -m (scripts|nanochat)\.|wandb sync|torchrun --"
    bare = re.compile(rf"(?<!uv run )(?<!/)\b({commands})")
    found = []
    for path in [
        *REPO.glob("nanochat/**/*.py"),
        *REPO.glob("scripts/*.py"),
        REPO / "launch_lambda.py",
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for line in node.value.splitlines():
                    if bare.search(line):
                        found.append(f"{path.relative_to(REPO)}: {line.strip()}")
    assert found == []


def test_tracking_says_how_to_sync_with_a_command_that_works(tmp_path, monkeypatch, capsys):
    from nanochat.tracking import check_wandb

    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: refused
    line = check_wandb(tmp_path)
    assert "uv run wandb sync" in line and "needs a W&B key" in line


def test_slow_fake_nvidia_smi_really_dies_of_sigpipe(tmp_path):
    """The stand-in reproduces the bug it guards against: with `| grep -q` under pipefail, the
    pipeline fails although a GPU line was printed."""
    fake_nvidia_smi(tmp_path, "580.65.06", gpus=40, delay=0.005)
    t0 = time.monotonic()
    res = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {tmp_path}/nvidia-smi -L | grep -q '^GPU '"],
        capture_output=True,
        timeout=30,
    )
    assert res.returncode == 141 and time.monotonic() - t0 < 10


# -----------------------------------------------------------------------------
# 12. gpu_check.sh with a Python that has no torch


def test_gpu_check_says_what_to_run_when_python_has_no_torch(tmp_path):
    """The system python3 of a bare node has no torch: the check stops with what to run, rather
    than reporting "no CUDA device" on a GPU node."""
    res = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path / "out")],
        env={**os.environ, "NANOCHAT_PYTHON": REAL_PYTHON},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "cannot import torch: run the set-up first" in res.stderr
    assert "no CUDA device" not in res.stdout + res.stderr


# -----------------------------------------------------------------------------
# 14. --profile auto on a machine with an NVIDIA GPU


def test_profile_auto_with_a_gpu_says_what_it_starts_before_any_download(tmp_path):
    """torch sees a GPU (a stand-in Python answers the device count with 1): before the data stage
    starts, the script says that this is the gpu profile, what it costs, and how to get the
    laptop demo. (The data stage is then stopped by a flag it does not know: nothing downloads.)"""
    fake_python = tmp_path / "python"
    fake_python.write_text(f"""#!/usr/bin/env bash
if [ "$1" = -c ] && [[ "$2" == *torch.cuda.device_count* ]]; then echo 1; exit 0; fi
exec {sys.executable} "$@"
""")
    fake_python.chmod(0o755)
    res = subprocess.run(
        [
            "bash",
            str(SCRIPT),
            "--no-sync",
            "--run",
            "auto1",
            "--no-wandb",
            "--stage-args",
            "data=--no-such-flag",
        ],
        cwd=REPO,
        env={
            **os.environ,
            "NANOCHAT_PYTHON": str(fake_python),
            "NANOCHAT_BASE_DIR": str(tmp_path / "base"),
        },
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert res.returncode != 0  # the data stage refused its flag
    banner = "[pipeline] --profile auto: torch sees 1 CUDA GPU(s), so this is the gpu profile"
    assert banner in res.stderr and "--profile cpu" in res.stderr, res.stderr
    assert "[pipeline] data:" in res.stdout and not (tmp_path / "base" / "base_data").exists()
