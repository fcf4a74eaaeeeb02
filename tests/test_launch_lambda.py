"""
launch_lambda.py (and its package, nanochat/launcher/) against a loopback test double of the
Lambda API (validated against the OpenAPI spec in ../shared when present) and a real OpenSSH
server on loopback: a real deploy (git archive over ssh, .env through stdin, tmux, log, rsync
fetch) and every failure path ending with no running instance and a telling exit code. No secret
may appear in output, ssh argv, request bodies, or files (other than the remote .env and the local
.env the test wrote).
"""

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lambda_fake_api import FakeLambda  # noqa: E402

from nanochat.launcher import errors, fetch  # noqa: E402
from nanochat.launcher.api import LambdaAPI  # noqa: E402
from nanochat.launcher.cli import build_parser  # noqa: E402
from nanochat.launcher.deploy import tmux_session  # noqa: E402
from nanochat.launcher.settings import remote_env_text  # noqa: E402
from nanochat.launcher.ssh import Remote  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "nanochat" / "launcher"
SPEC_PATH = REPO_ROOT.parent / "shared" / "specs" / "lambda-cloud-openapi.json"
LAUNCHER = REPO_ROOT / "launch_lambda.py"
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
LAMBDA_KEY = "lambda-secret-3f9c2e71a0b84d56"
WANDB_KEY = "wandbsecret0123456789abcdef0123456789abcd"
SECRETS = (LAMBDA_KEY, WANDB_KEY)

FAKE_PIPELINE = r"""#!/usr/bin/env bash
# Stand-in for the real orchestrator: writes a report, metrics and checkpoints into
# NANOCHAT_BASE_DIR.
set -e
sleep_s=0; code=0; args="$*"
while [ $# -gt 0 ]; do
  case "$1" in --sleep) sleep_s=$2; shift ;; --exit) code=$2; shift ;; esac; shift
done
echo "pipeline running with base $NANOCHAT_BASE_DIR, args: $args"
echo "wandb key present: ${WANDB_API_KEY:+yes}, project: $WANDB_PROJECT"
cd "$NANOCHAT_BASE_DIR"
mkdir -p report runs/r1 tokenizer checkpoints/rl/d4/step_000005
mkdir -p checkpoints/sft/d4/step_000002 checkpoints/sft/d4/step_000010
mkdir -p checkpoints/sft/d4/step_000011.tmp  # not a step directory: never fetched
echo "# fake report" > report/report.md
echo "fake tokenizer" > tokenizer/tokenizer.pkl
echo '{"step": 1, "rl/acc": 0.5}' > runs/r1/rl.jsonl
for d in checkpoints/*/d4/step_*; do echo weights > "$d/model.pt"; echo '{}' > "$d/meta.json"; done
# a save killed midway: weights but no meta.json
mkdir -p checkpoints/sft/d4/step_000012 && echo half > checkpoints/sft/d4/step_000012/model.pt
sleep "$sleep_s"
echo "pipeline done"
exit "$code"
"""


# -----------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def spec():
    return json.loads(SPEC_PATH.read_text()) if SPEC_PATH.is_file() else None


@pytest.fixture
def fake(spec):
    fake = FakeLambda(LAMBDA_KEY, spec).start()
    fake.on_terminate = lambda inst: kill_tmux(
        inst["id"]
    )  # a terminated machine takes its processes with it
    yield fake
    fake.stop()
    for iid in fake.instances:
        kill_tmux(iid)
    assert not fake.violations, "requests/responses that break the OpenAPI spec:\n" + "\n".join(
        fake.violations
    )
    for r in fake.requests:  # the key travels only in the Authorization header
        assert not any(s in r["raw"] or s in r["path"] for s in SECRETS), r
    for r in fake.launches():
        assert "user_data" not in (r["body"] or {})


def kill_tmux(instance_id):
    subprocess.run(
        ["tmux", "kill-session", "-t", "=" + tmux_session(instance_id)], capture_output=True
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A real sshd on a free loopback port, with its own host key, accepting one generated user
    key."""
    if not Path(SSHD).is_file():
        pytest.skip(
            f"OpenSSH server not installed ({SSHD} missing): "
            "apt-get install openssh-server (.ci/run does)"
        )
    if not shutil.which("tmux"):
        pytest.skip("tmux not installed: apt-get install tmux (.ci/run does)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "user_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True
        )
    shutil.copy(d / "user_key.pub", d / "authorized_keys")
    # The "GPU node": an nvidia-smi on the sessions' PATH, listing 8 GPUs unless <dir>/no_gpu
    # exists, with driver 580.65.06 unless <dir>/driver says another
    (d / "bin").mkdir()
    (d / "bin" / "nvidia-smi").write_text(f"""#!/bin/sh
if [ -e {d}/no_gpu ]; then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."; exit 9
fi
for i in 0 1 2 3 4 5 6 7; do
  case "$*" in
    *driver_version*) cat {d}/driver 2>/dev/null || echo 580.65.06 ;;
    *) echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)" ;;
  esac
done
""")
    (d / "bin" / "nvidia-smi").chmod(0o755)
    port = free_port()
    # SHLVL=1: the sessions' bash then skips ~/.bashrc, as bash does in any shell below the top
    # level. The machine's own ~/.bashrc is not the instance's: here it runs pyenv's rehash, whose
    # lock a session SIGKILLed inside it (the tests kill "machines") leaves behind, and every later
    # session would wait 60 s for it.
    (d / "sshd_config").write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
PidFile {d}/sshd.pid
AuthorizedKeysFile {d}/authorized_keys
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
LogLevel VERBOSE
SetEnv PATH={d}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin SHLVL=1
""")
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
    proc = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=open(d / "sshd.log", "wb")
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(64).startswith(b"SSH-"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"sshd did not start: {(d / 'sshd.log').read_text()}")
        time.sleep(0.1)
    import getpass

    yield {"port": port, "key": str(d / "user_key"), "user": getpass.getuser(), "dir": d}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def project(tmp_path):
    """A tiny git checkout to ship: the fake pipeline, a committed file with an uncommitted edit,
    an untracked file."""
    repo = tmp_path / "project"
    repo.mkdir()
    (repo / "run_aquarat_small.sh").write_text(FAKE_PIPELINE)
    (repo / "notes.txt").write_text("committed\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "init"], check=True)
    (repo / "notes.txt").write_text("edited, not committed\n")
    (repo / "scratch.txt").write_text("untracked\n")
    return repo


@pytest.fixture
def env(tmp_path, fake):
    """Environment for launcher subprocesses: secrets only in a .env file, tiny limits, ssh argv
    logged."""
    shim = tmp_path / "shim"
    shim.mkdir()
    for tool in ("ssh", "scp", "rsync"):
        real = shutil.which(tool)
        if real:
            (shim / tool).write_text(
                f'#!/bin/sh\nprintf "%s\\n" "{tool} $*" >> "$ARGV_LOG"\nexec {real} "$@"\n'
            )
            (shim / tool).chmod(0o755)
    (tmp_path / "secrets.env").write_text(
        f"LAMBDA_API_KEY={LAMBDA_KEY}\nWANDB_API_KEY={WANDB_KEY}\nWANDB_PROJECT=aquarat-test\n"
    )
    (tmp_path / "home").mkdir()
    e = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LAMBDA_", "WANDB_", "HF_TOKEN", "NANOCHAT_RUN"))
    }
    e.update(
        PATH=f"{shim}:{os.environ['PATH']}",
        ARGV_LOG=str(tmp_path / "argv.log"),
        HOME=str(tmp_path / "home"),
        PYTHONUNBUFFERED="1",
        LAMBDA_API_BASE=fake.url,
        LAMBDA_LAUNCHER_STATE_DIR=str(tmp_path / "state"),
        LAMBDA_RATE_LIMIT_S="0.01",
        LAMBDA_LAUNCH_RATE_LIMIT_S="0.05",
        LAMBDA_RETRY_BACKOFF_S="0.05",
        LAMBDA_RETRIES="3",
    )
    yield e
    argv_log = tmp_path / "argv.log"
    if argv_log.exists():
        assert not any(s in argv_log.read_text() for s in SECRETS), (
            "a secret reached an ssh/rsync command line"
        )
    allowed = {tmp_path / "secrets.env"}
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != ".env" and path not in allowed:
            data = path.read_bytes()
            assert not any(s.encode() in data for s in SECRETS), f"a secret was written to {path}"


def launcher_command(env, args, env_file=True):
    """argv for `python launch_lambda.py ARGS`, reading the test's secrets.env (before any `--`,
    which hands the rest to the remote side)."""
    args = list(args)
    if env_file:
        cut = args.index("--") if "--" in args else len(args)
        args[cut:cut] = ["--env-file", str(Path(env["ARGV_LOG"]).parent / "secrets.env")]
    return [sys.executable, str(LAUNCHER), *args]


def launcher(env, *args, env_file=True, cwd=None, timeout=60):
    proc = subprocess.run(
        launcher_command(env, args, env_file),
        env=env,
        cwd=cwd or Path(env["HOME"]).parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = proc.stdout + proc.stderr
    assert not any(s in out for s in SECRETS), "a secret was printed:\n" + out
    return proc, out


def ssh_flags(sshd, remote_home):
    return [
        "--ssh-user",
        sshd["user"],
        "--ssh-port",
        str(sshd["port"]),
        "--ssh-key-file",
        sshd["key"],
        "--remote-dir",
        str(remote_home / "nanochat-aquarat"),
        "--remote-base-dir",
        str(remote_home / "base"),
    ]


def launch_args(*extra):
    return [
        "launch",
        "--instance-type",
        "gpu_8x_h100_sxm5",
        "--region",
        "us-west-1",
        "--poll-interval",
        "0.1",
        "--active-timeout",
        "10",
        "--ssh-timeout",
        "10",
        *extra,
    ]


def deploy_args(sshd, project, remote_home, *extra):
    """launch_args for a real deploy of `project` to the loopback sshd, into remote_home."""
    return launch_args("--repo", str(project), *ssh_flags(sshd, remote_home), *extra)


def state_of(env):
    path = Path(env["LAMBDA_LAUNCHER_STATE_DIR"]) / "instances.json"
    return json.loads(path.read_text()) if path.exists() else {}


# -----------------------------------------------------------------------------
# static properties


# Run in a fresh interpreter where torch, numpy and wandb cannot be imported, as on a laptop with
# only requests and python-dotenv: import the entry point and every module of the package, write
# the names of the loaded modules to argv[1], then run `launch_lambda.py --help`.
IMPORT_WITHOUT_TORCH = textwrap.dedent("""
    import importlib, json, pkgutil, sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "numpy", "wandb"):
                raise ImportError(f"{name} is not installed on this laptop")

    sys.meta_path.insert(0, NotInstalled())
    import launch_lambda
    import nanochat.launcher

    for info in pkgutil.iter_modules(nanochat.launcher.__path__):
        importlib.import_module("nanochat.launcher." + info.name)
    with open(sys.argv[1], "w") as f:
        json.dump(sorted(sys.modules), f)
    launch_lambda.main(["--help"])
""")
# What the launcher may load from nanochat outside its own package: stdlib-only modules.
NANOCHAT_OUTSIDE_LAUNCHER = {
    "nanochat",
    "nanochat.files",
    "nanochat.driver_check",
    "nanochat.wandb_login",
}


def test_no_torch_in_import_graph(tmp_path):
    (tmp_path / "probe.py").write_text(IMPORT_WITHOUT_TORCH)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "probe.py"), str(tmp_path / "modules.json")],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "usage: " in proc.stdout, proc.stdout + proc.stderr
    loaded = json.loads((tmp_path / "modules.json").read_text())
    package = {f"nanochat.launcher.{p.stem}" for p in PACKAGE_DIR.glob("*.py")}
    package.discard("nanochat.launcher.__init__")
    assert package <= set(loaded)  # every module was imported, so the check covers them all
    bad = sorted(
        m
        for m in loaded
        if m.split(".")[0] in ("torch", "numpy", "wandb")
        or (
            m.split(".")[0] == "nanochat"
            and not m.startswith("nanochat.launcher")
            and m not in NANOCHAT_OUTSIDE_LAUNCHER
        )
    )
    assert not bad


def test_only_requests_and_dotenv_beyond_the_stdlib():
    """Read from the source, so an import inside a function that no test runs is caught too."""
    imported = set()
    outside = [REPO_ROOT / (m.replace(".", "/") + ".py") for m in NANOCHAT_OUTSIDE_LAUNCHER]
    for path in [LAUNCHER, *PACKAGE_DIR.glob("*.py"), *(p for p in outside if p.is_file())]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module)
    nanochat = {m for m in imported if m.split(".")[0] == "nanochat"}
    assert {
        m for m in nanochat if not m.startswith("nanochat.launcher")
    } <= NANOCHAT_OUTSIDE_LAUNCHER
    third_party = {m.split(".")[0] for m in imported - nanochat}
    assert third_party - set(sys.stdlib_module_names) == {"requests", "dotenv"}


def test_spec_validation_is_active(spec):
    if spec is None:
        pytest.skip(
            f"{SPEC_PATH} is absent: "
            "request/response validation against the OpenAPI spec is skipped"
        )
    from lambda_fake_api import SpecValidator

    v = SpecValidator(spec)
    assert v.check_request(
        "POST", "/api/v1/instance-operations/launch", {"region_name": "us-west-1"}
    )
    assert v.check_response("GET", "/api/v1/instances", 200, {"data": [{"id": "x"}]})
    assert not v.check_response(
        "POST",
        "/api/v1/instance-operations/launch",
        400,
        {"error": {"code": LambdaAPI.CAPACITY, "message": "m"}},
    )


def test_remote_env_text_quotes_and_refuses_unsafe_values():
    text = remote_env_text(
        {"WANDB_API_KEY": "abc", "WANDB_PROJECT": "p", "LAMBDA_API_KEY": "never", "X": "1"},
        extra_keys=["X"],
    )
    assert (
        text == "WANDB_API_KEY='abc'\nWANDB_PROJECT='p'\nX='1'\n"
    )  # the Lambda key never goes to the instance
    with pytest.raises(errors.LaunchError) as e:
        remote_env_text({"WANDB_API_KEY": "a'b"})
    assert "WANDB_API_KEY" in str(e.value) and "a'b" not in str(e.value)


def test_client_rate_limits(fake, monkeypatch):
    monkeypatch.setenv("LAMBDA_RATE_LIMIT_S", "0.15")
    monkeypatch.setenv("LAMBDA_LAUNCH_RATE_LIMIT_S", "0.4")
    fake.launch_window = 0.4  # the fake answers 429 to launches closer than this
    api = LambdaAPI(fake.url, LAMBDA_KEY, retries=0)
    for _ in range(3):
        api.instance_types()
    body = {
        "instance_type_name": "gpu_1x_a10",
        "ssh_key_names": ["laptop"],
        "region_name": "us-east-1",
    }
    ids = [api.launch(dict(body, name=f"n{i}"), set()) for i in range(2)]
    times = [r["time"] for r in fake.requests]
    assert all(b - a >= 0.14 for a, b in zip(times, times[1:])), times
    launch_times = [r["time"] for r in fake.launches()]
    assert launch_times[1] - launch_times[0] >= 0.39 and len(ids) == 2
    assert all(r["status"] == 200 for r in fake.requests)


# -----------------------------------------------------------------------------
# API-only paths


def test_seed_form_dry_run_prints_plan_and_cost(env, fake, project):
    proc, out = launcher(
        env,
        "--instance-type",
        "gpu_8x_h100_sxm5",
        "--region",
        "us-west-1",
        "--dry-run",
        "--repo",
        str(project),
        "--",
        "--depth",
        "20",
    )
    assert proc.returncode == 0, out
    assert "DRY RUN" in out and "$23.92/hour" in out and "4 h = $95.68" in out
    # the default command asks for the gpu profile and passes the instance's price to the report
    assert "bash run_aquarat_small.sh --depth 20 --profile gpu --gpu-hourly-price 23.92" in out
    assert "ssh key:   laptop" in out
    assert all(r["method"] == "GET" for r in fake.requests)
    # a checkout without .venv (no torch on this laptop): how to see the stage plan
    assert "bash run_aquarat_small.sh --plan --depth 20 --nproc 8" in out


def test_dry_run_prints_the_stage_plan_with_the_checkouts_venv(env, fake):
    if not (REPO_ROOT / ".venv" / "bin" / "python").is_file():
        pytest.skip("this checkout has no .venv (uv sync makes it)")
    proc, out = launcher(
        env, *launch_args("--dry-run", "--repo", str(REPO_ROOT), "--", "--depth", "20"), timeout=180
    )
    assert proc.returncode == 0, out
    assert "gpu profile, depth 20" in out and "8 GPU(s)" in out
    assert "| rl | 300 |" in out and "| **total** |" in out


def test_types_lists_prices_and_capacity(env, fake):
    proc, out = launcher(env, "types")
    assert proc.returncode == 0, out
    line = next(row for row in out.splitlines() if row.startswith("gpu_8x_h100_sxm5"))
    assert "23.92" in line and "us-west-1, us-east-1" in line
    assert out.index("gpu_1x_a10") < out.index("gpu_8x_h100_sxm5")  # sorted by price


def test_default_command_needs_the_orchestrator_in_the_tree(env, fake, tmp_path):
    repo = tmp_path / "bare_repo"
    repo.mkdir()
    subprocess.run(["git", "-C", str(repo), "init", "-q"], check=True)
    (repo / "x").write_text("x")
    subprocess.run(["git", "-C", str(repo), "add", "x"], check=True)
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
        check=True,
    )
    proc, out = launcher(env, *launch_args("--repo", str(repo)))
    assert (
        proc.returncode == errors.EXIT_CONFIG
        and "run_aquarat_small.sh is not in the git tree" in out
    )
    assert not fake.requests  # checked before any API call, so nothing is ever launched for it


def test_missing_api_key_is_named(env, fake, tmp_path):
    (tmp_path / "empty.env").write_text("")
    for args in (["types"], launch_args("--no-deploy")):
        proc, out = launcher(env, *args, "--env-file", str(tmp_path / "empty.env"), env_file=False)
        assert proc.returncode == errors.EXIT_CONFIG and "LAMBDA_API_KEY is not set" in out
    assert not fake.requests


def test_rejected_api_key_exits_3_without_launching(env, fake, tmp_path):
    (tmp_path / "bad.env").write_text("LAMBDA_API_KEY=not-the-key\n")
    proc, out = launcher(
        env, *launch_args("--no-deploy"), "--env-file", str(tmp_path / "bad.env"), env_file=False
    )
    assert proc.returncode == errors.EXIT_CONFIG, out
    assert "global/invalid-api-key" in out and "LAMBDA_API_KEY" in out
    assert not fake.launches() and not fake.instances


def test_capacity_errors_then_success_with_wait(env, fake):
    fake.no_capacity_launches = 2
    fake.launch_window = 0.05
    proc, out = launcher(env, *launch_args("--no-deploy", "--wait-capacity", "0.5"))
    assert proc.returncode == 0, out
    assert out.count("us-west-1: insufficient capacity") == 2 and "waiting for capacity" in out
    assert len(fake.launches()) == 3 and all(r["status"] != 429 for r in fake.launches())
    (iid,) = [i["id"] for i in fake.running()]
    assert (
        f"Launched {iid}" in out and "uv run launch_lambda.py ssh" in out and "$23.92/hour" in out
    )
    assert state_of(env)[iid]["status"] == "active"
    assert (
        oct(os.stat(Path(env["LAMBDA_LAUNCHER_STATE_DIR"]) / "instances.json").st_mode & 0o777)
        == "0o600"
    )
    proc, out = launcher(env, "terminate", iid)
    assert proc.returncode == errors.EXIT_USAGE and "--yes" in out and fake.running()
    proc, out = launcher(env, "terminate", iid, "--yes")
    assert (
        proc.returncode == 0 and not fake.running() and state_of(env)[iid]["status"] == "terminated"
    )


def test_region_auto_moves_to_another_region(env, fake):
    fake.no_capacity_launches = 1
    proc, out = launcher(env, *launch_args("--no-deploy", "--region", "auto"))
    assert proc.returncode == 0, out
    assert [r["body"]["region_name"] for r in fake.launches()] == ["us-west-1", "us-east-1"]
    assert [i["region"]["name"] for i in fake.running()] == ["us-east-1"]
    fake.running()[0]["status"] = "terminated"


def test_no_capacity_exits_5_with_advice(env, fake):
    fake.capacity["gpu_8x_h100_sxm5"] = []
    proc, out = launcher(env, *launch_args("--no-deploy"))
    assert proc.returncode == errors.EXIT_NO_CAPACITY, out
    assert "no capacity" in out and "--wait-capacity" in out and not fake.launches()


def test_429_and_5xx_are_retried_without_double_launch(env, fake):
    fake.fail("GET", r"/instance-types$", 429, "global/rate-limited", retry_after=1)
    fake.fail("POST", r"/launch$", 503, "provider/internal-unavailable")
    fake.fail(
        "POST", r"/launch$", 500, "global/internal-error", create=True
    )  # launched, but the answer was lost
    proc, out = launcher(env, *launch_args("--no-deploy"))
    assert proc.returncode == 0, out
    types_calls = [r for r in fake.requests if r["path"].endswith("/instance-types")]
    assert [r["status"] for r in types_calls[:2]] == [429, 200]
    assert types_calls[1]["time"] - types_calls[0]["time"] >= 0.95  # Retry-After honoured
    assert "retry 1/3" in out and "did create" in out
    assert (
        len(fake.instances) == 1 and len(fake.launches()) == 2
    )  # no second launch after the lost answer
    fake.running()[0]["status"] = "terminated"


def test_persistent_5xx_exits_4(env, fake):
    fake.fail("GET", r"/ssh-keys$", 503, "provider/internal-unavailable", times=10)
    proc, out = launcher(env, *launch_args("--no-deploy"))
    assert proc.returncode == errors.EXIT_API, out
    assert "provider/internal-unavailable" in out and not fake.instances


def test_never_active_terminates(env, fake, project):
    fake.never_active = True
    proc, out = launcher(env, *launch_args("--active-timeout", "0.5", "--repo", str(project)))
    assert proc.returncode == errors.EXIT_NOT_READY, out
    assert "not active after" in out and "Terminated" in out
    assert not fake.running() and len(fake.instances) == 1


def test_keep_on_failure_keeps_and_says_so(env, fake, project):
    fake.never_active = True
    proc, out = launcher(
        env, *launch_args("--active-timeout", "0.3", "--keep-on-failure", "--repo", str(project))
    )
    assert proc.returncode == errors.EXIT_NOT_READY, out
    assert "STILL RUNNING" in out and len(fake.running()) == 1
    iid = fake.running()[0]["id"]
    proc, out = launcher(env, "status")
    assert proc.returncode == 0 and iid in out and "$23.92/h" in out
    proc, out = launcher(env, "terminate", iid, "--yes")
    assert proc.returncode == 0 and not fake.running()


def test_ssh_never_answers_terminates(env, fake, project, tmp_path):
    silent = socket.socket()  # accepts TCP connections (backlog) but never speaks SSH
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        proc, out = launcher(
            env,
            *launch_args(
                "--ssh-timeout",
                "1.5",
                "--ssh-user",
                "nobody",
                "--ssh-port",
                str(silent.getsockname()[1]),
                "--repo",
                str(project),
            ),
        )
    finally:
        silent.close()
    assert proc.returncode == errors.EXIT_NOT_READY, out
    assert "never answered" in out and "Terminated" in out and not fake.running()


class Reader:
    """Collects a subprocess's output in a thread so the test can wait for a line."""

    def __init__(self, proc):
        self.text = ""
        self.thread = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self.thread.start()

    def _run(self, proc):
        for line in proc.stdout:
            self.text += line

    def wait_for(self, needle, timeout=30):
        deadline = time.monotonic() + timeout
        while needle not in self.text:
            assert time.monotonic() < deadline, f"never saw {needle!r} in:\n{self.text}"
            time.sleep(0.05)


def start_launcher(env, *args):
    proc = subprocess.Popen(
        launcher_command(env, args),
        env=env,
        cwd=Path(env["HOME"]).parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, Reader(proc)


def interrupt(proc, reader):
    """Ctrl-C the launcher: it exits 130, says it terminated the instance, prints no secret."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == errors.EXIT_INTERRUPTED
    reader.thread.join(5)
    assert "interrupted" in reader.text and "Terminated" in reader.text
    assert not any(s in reader.text for s in SECRETS)


def test_ctrl_c_while_booting_terminates(env, fake, project):
    fake.never_active = True
    proc, reader = start_launcher(
        env, *launch_args("--active-timeout", "60", "--repo", str(project))
    )
    reader.wait_for(": booting")
    interrupt(proc, reader)
    assert not fake.running()


# -----------------------------------------------------------------------------
# real SSH deploys


def test_full_deploy_run_fetch_auto_terminate(env, fake, sshd, project, tmp_path):
    remote_home = tmp_path / "remote_home"
    dest = tmp_path / "results"
    proc, out = launcher(
        env,
        *deploy_args(
            sshd,
            project,
            remote_home,
            "--auto-terminate",
            "--dest",
            str(dest),
            "--",
            "--sleep",
            "0.5",
        ),
    )
    assert proc.returncode == 0, out
    (inst,) = fake.instances.values()
    assert inst["status"] == "terminated" and f"Terminated {inst['id']}" in out
    # shipped: the committed tree plus uncommitted edits to tracked files, not untracked files
    rdir = remote_home / "nanochat-aquarat"
    assert (rdir / "run_aquarat_small.sh").read_text() == FAKE_PIPELINE
    assert (rdir / "notes.txt").read_text() == "edited, not committed\n"
    assert not (rdir / "scratch.txt").exists()
    # the remote .env: mode 600, the forwarded keys only
    assert oct((rdir / ".env").stat().st_mode & 0o777) == "0o600"
    assert (
        rdir / ".env"
    ).read_text() == f"WANDB_API_KEY='{WANDB_KEY}'\nWANDB_PROJECT='aquarat-test'\n"
    # the pipeline ran in tmux with the .env loaded and the user's flags, and its log streamed back
    assert "wandb key present: yes, project: aquarat-test" in out and "pipeline done" in out
    assert "GPUs on the instance: 8 x NVIDIA H100 80GB HBM3, driver 580.65.06" in out
    assert (
        f"pipeline running with base {remote_home / 'base'}, "
        "args: --sleep 0.5 --profile gpu --gpu-hourly-price 23.92" in out
    )
    assert "starting in" in (rdir / ".launcher" / "run.log").read_text() and "--sleep 0.5" in out
    # artifacts: report, metrics, the last complete checkpoint step per stage/tag, and the log
    assert (dest / "report" / "report.md").read_text() == "# fake report\n"
    assert json.loads((dest / "runs" / "r1" / "rl.jsonl").read_text())["rl/acc"] == 0.5
    assert (dest / "tokenizer" / "tokenizer.pkl").exists()
    assert sorted(p.name for p in (dest / "checkpoints" / "sft" / "d4").iterdir()) == [
        "step_000010"
    ]
    assert (dest / "checkpoints" / "rl" / "d4" / "step_000005" / "model.pt").exists()
    assert "pipeline done" in (dest / "run.log").read_text()
    # host key recorded in the launcher's own known_hosts; ssh never told to skip host key checks
    known_hosts = Path(env["LAMBDA_LAUNCHER_STATE_DIR"]) / "known_hosts"
    found = subprocess.run(
        ["ssh-keygen", "-F", f"[127.0.0.1]:{sshd['port']}", "-f", str(known_hosts)],
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0 and "ssh-ed25519" in found.stdout  # (Debian hashes host names)
    argv = (tmp_path / "argv.log").read_text()
    assert "StrictHostKeyChecking=accept-new" in argv and "StrictHostKeyChecking=no" not in argv
    assert "rsync " in argv
    assert state_of(env)[inst["id"]]["status"] == "terminated"


def test_deploy_then_logs_status_fetch_ssh_terminate(env, fake, sshd, project, tmp_path):
    remote_home = tmp_path / "remote_home"
    proc, out = launcher(
        env,
        *deploy_args(
            sshd, project, remote_home, "--command", "bash run_aquarat_small.sh --sleep 1"
        ),
    )
    assert proc.returncode == 0, out
    (inst,) = fake.running()
    iid = inst["id"]
    assert f"logs {iid} --follow" in out and f"terminate {iid}" in out
    proc, out = launcher(env, "logs", iid, "--follow", "--poll-interval", "0.2")
    assert proc.returncode == 0, out
    assert "pipeline done" in out and "exit code 0" in out
    proc, out = launcher(env, "logs", iid, "--lines", "2")
    assert proc.returncode == 0 and "finished with exit code 0" in out and "wandb key" not in out
    proc, out = launcher(env, "status", iid)
    assert proc.returncode == 0 and "run: finished, exit code 0" in out and " min ~$" in out
    proc, out = launcher(env, "fetch", iid, "--dest", str(tmp_path / "got"))
    assert proc.returncode == 0, out
    assert (tmp_path / "got" / "report" / "report.md").exists() and "still running" in out
    proc, out = launcher(
        env, "ssh", iid, "--", "cat", str(remote_home / "nanochat-aquarat" / "notes.txt")
    )
    assert proc.returncode == 0 and out.strip() == "edited, not committed"
    proc, out = launcher(env, "terminate", iid, "--yes")
    assert proc.returncode == 0 and not fake.running()


def test_remote_failure_fetches_then_terminates(env, fake, sshd, project, tmp_path):
    dest = tmp_path / "results"
    proc, out = launcher(
        env,
        *deploy_args(
            sshd,
            project,
            tmp_path / "remote_home",
            "--auto-terminate",
            "--dest",
            str(dest),
            "--command",
            "bash run_aquarat_small.sh --exit 3",
        ),
    )
    assert proc.returncode == errors.EXIT_RUN_FAILED, out
    assert "exited with code 3" in out and "Terminated" in out and not fake.running()
    assert (dest / "report" / "report.md").exists() and "exit code 3" in (
        dest / "run.log"
    ).read_text()


def test_deploy_error_terminates(env, fake, sshd, project, tmp_path):
    remote_home = tmp_path / "remote_home"
    # the later --remote-dir wins: mkdir fails there, even for root
    flags = deploy_args(sshd, project, remote_home, "--remote-dir", "/proc/not-a-place-for-code")
    proc, out = launcher(env, *flags)
    assert proc.returncode == errors.EXIT_DEPLOY, out
    assert (
        "ssh root@127.0.0.1 failed" in out.replace(sshd["user"] + "@", "root@")
        and "Terminated" in out
    )
    assert not fake.running()


def test_node_without_gpus_is_terminated_before_deploying(env, fake, sshd, project, tmp_path):
    remote_home = tmp_path / "remote_home"
    (sshd["dir"] / "no_gpu").touch()
    try:
        proc, out = launcher(
            env,
            *deploy_args(sshd, project, remote_home, "--auto-terminate"),
        )
    finally:
        (sshd["dir"] / "no_gpu").unlink()
    assert proc.returncode == errors.EXIT_DEPLOY, out
    assert "the instance lists no GPU (`nvidia-smi -L` exit 9: NVIDIA-SMI has failed" in out
    assert "Terminated" in out and not fake.running()
    assert not (remote_home / "nanochat-aquarat").exists()  # nothing shipped, nothing started


def test_ctrl_c_during_run_terminates(env, fake, sshd, project, tmp_path):
    proc, reader = start_launcher(
        env,
        *deploy_args(
            sshd,
            project,
            tmp_path / "remote_home",
            "--auto-terminate",
            "--command",
            "bash run_aquarat_small.sh --sleep 30",
        ),
    )
    reader.wait_for("pipeline running")
    interrupt(proc, reader)
    assert not fake.running()
    # what the run had written was brought home before the instance went
    assert "fetching what the run has written so far" in reader.text
    dest = tmp_path / "lambda-results" / fake.instances.popitem()[0]
    assert (dest / "report" / "report.md").read_text() == "# fake report\n"
    assert "pipeline running" in (dest / "run.log").read_text()


def test_fetch_falls_back_to_tar_without_rsync(sshd, tmp_path, monkeypatch):
    base = tmp_path / "base"
    (base / "report").mkdir(parents=True)
    (base / "report" / "report.md").write_text("r\n")
    for step in (99, 100):  # complete steps: meta.json is written last
        (base / "checkpoints" / "base" / "d4" / f"step_{step:06d}").mkdir(parents=True)
        (base / "checkpoints" / "base" / "d4" / f"step_{step:06d}" / "meta.json").write_text("{}")
    # a save killed before its meta.json
    (base / "checkpoints" / "base" / "d4" / "step_000101").mkdir()
    remote = Remote(
        "127.0.0.1", sshd["user"], sshd["port"], sshd["key"], tmp_path / "kh", connect_timeout=5
    )
    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    dest = fetch.fetch_artifacts(remote, str(tmp_path / "nowhere"), str(base), tmp_path / "out")
    assert (dest / "report" / "report.md").read_text() == "r\n"
    assert [p.name for p in (dest / "checkpoints" / "base" / "d4").iterdir()] == ["step_000100"]


def test_docs_mention_only_real_flags_and_codes():
    """QUICKSTART.md and the manual must stay true to the code: every launcher flag they name
    exists."""
    import re

    parser = build_parser()
    flags = set()
    for action in parser._subparsers._group_actions[0].choices.values():
        flags |= {s for a in action._actions for s in a.option_strings}
    pipeline_flags = {
        "--depth",
        "--run",
        "--help",
        "--profile",
        "--gpu-hourly-price",
        "--plan",
    }  # the orchestrator's
    for doc in ("QUICKSTART.md",):
        text = (REPO_ROOT / doc).read_text()
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text))
        assert named - flags - pipeline_flags == set(), f"{doc} names flags the launcher lacks"
        for code in (
            errors.EXIT_CONFIG,
            errors.EXIT_API,
            errors.EXIT_NO_CAPACITY,
            errors.EXIT_NOT_READY,
            errors.EXIT_DEPLOY,
            errors.EXIT_RUN_FAILED,
            errors.EXIT_INTERRUPTED,
        ):
            assert f"| {code} |" in text
    launch_flags = {
        s
        for a in parser._subparsers._group_actions[0].choices["launch"]._actions
        for s in a.option_strings
    }
    quick = (REPO_ROOT / "QUICKSTART.md").read_text()
    assert {f for f in launch_flags if f not in ("-h", "--help", "--env-file", "--name")} <= set(
        re.findall(r"--[a-z][a-z-]+", quick)
    ), "a launch flag is missing from QUICKSTART.md"


# -----------------------------------------------------------------------------
# A newcomer's first launch (issue 23): what would fail or bill by surprise is refused first


def test_old_driver_on_the_node_is_refused_before_shipping(env, fake, sshd, project, tmp_path):
    """The node's driver is older than the locked torch's CUDA needs: terminated before anything
    is shipped, with the fix in the message."""
    lock = '[[package]]\nname = "nvidia-cuda-runtime"\nversion = "13.0.96"\n'
    (project / "uv.lock").write_text(lock)
    (sshd["dir"] / "driver").write_text("550.90.07\n")
    remote_home = tmp_path / "remote_home"
    try:
        proc, out = launcher(env, *deploy_args(sshd, project, remote_home, "--auto-terminate"))
    finally:
        (sshd["dir"] / "driver").unlink()
    assert proc.returncode == errors.EXIT_DEPLOY, out
    assert "NVIDIA driver 550.90.07 is too old" in out and "needs driver >= 580" in out
    assert "Terminated" in out and not fake.running()
    assert not (remote_home / "nanochat-aquarat").exists()


def test_max_hours_without_auto_terminate_is_refused(env, fake, project):
    proc, out = launcher(env, *launch_args("--max-hours", "2", "--repo", str(project)))
    assert proc.returncode == errors.EXIT_USAGE, out
    assert "--max-hours needs --auto-terminate" in out and not fake.launches()


def test_max_hours_counts_from_the_launch(monkeypatch):
    """An instance that took 10 s to boot and deploy, under a 5 s cap, is over it at once."""
    from nanochat.launcher import deploy

    monkeypatch.setattr(deploy, "poll_run", lambda *a: (None, True, b""))
    with pytest.raises(errors.LaunchError, match="exceeded --max-hours"):
        deploy.follow_run(None, "d", "s", 0.01, 1, max_seconds=5, started=time.monotonic() - 10)


def make_key(path, passphrase=""):
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", str(path)], check=True
    )
    return (path.parent / f"{path.name}.pub").read_text()


def test_key_with_a_passphrase_not_in_an_agent_is_refused_before_launch(env, fake, project):
    """BatchMode ssh can never use it: refused before the launch, so nothing bills."""
    key = Path(env["HOME"]) / "locked_key"
    fake.ssh_keys[0]["public_key"] = make_key(key, "s3cret phrase").strip()
    env = {k: v for k, v in env.items() if k != "SSH_AUTH_SOCK"}  # no agent
    proc, out = launcher(env, *launch_args("--repo", str(project), "--ssh-key-file", str(key)))
    assert proc.returncode == errors.EXIT_CONFIG, out
    assert f"{key} has a passphrase and is not loaded in ssh-agent" in out
    assert f"ssh-add {key}" in out and not fake.launches()
    # the default keys too (no --ssh-key-file): ~/.ssh/id_ed25519 with a passphrase
    ssh_dir = Path(env["HOME"]) / ".ssh"
    ssh_dir.mkdir(exist_ok=True)
    fake.ssh_keys[0]["public_key"] = make_key(ssh_dir / "id_ed25519", "other phrase").strip()
    proc, out = launcher(env, *launch_args("--repo", str(project), "--dry-run"))
    assert proc.returncode == errors.EXIT_CONFIG, out
    assert "id_ed25519 has a passphrase and is not loaded in ssh-agent" in out


def test_key_loaded_in_an_agent_is_usable(tmp_path, monkeypatch):
    from nanochat.launcher.ssh import check_key_usable

    key = tmp_path / "agent_key"
    public = make_key(key, "pass phrase")
    with pytest.raises(errors.LaunchError, match="not loaded in ssh-agent"):
        monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
        check_key_usable(str(key), "laptop", public)
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        askpass = tmp_path / "askpass"
        askpass.write_text("#!/bin/sh\necho 'pass phrase'\n")
        askpass.chmod(0o700)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        added = subprocess.run(
            ["ssh-add", str(key)],
            env={**os.environ, "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=20,
        )
        assert added.returncode == 0, added.stderr
        check_key_usable(str(key), "laptop", public)  # no error: the agent holds it
    finally:
        agent.terminate()
        agent.wait(timeout=10)


def test_wandb_login_key_and_server_are_forwarded(tmp_path, monkeypatch):
    from nanochat.launcher.settings import load_settings

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / ".netrc").write_text("machine wandb.example.com login u password k3yfromlogin\n")
    (tmp_path / ".netrc").chmod(0o600)
    env_file = tmp_path / "my.env"
    env_file.write_text("WANDB_BASE_URL=https://wandb.example.com\n")
    settings = load_settings(str(env_file))
    text = remote_env_text(settings)
    assert "WANDB_API_KEY='k3yfromlogin'" in text
    assert "WANDB_BASE_URL='https://wandb.example.com'" in text


def test_uv_runs_the_launcher_in_its_own_small_environment(tmp_path):
    """`uv run launch_lambda.py` (the laptop's one command, no pip install, no `python`): the
    script's own header names exactly what it imports beyond the standard library, and uv runs it
    from those alone, not from the project's environment with torch."""
    import re

    header = re.search(r"# /// script\n(.*?)# ///", LAUNCHER.read_text(), re.S).group(1)
    deps = re.findall(r'"([A-Za-z0-9_.-]+)[<>=!~]', header)
    assert sorted(deps) == ["python-dotenv", "requests"]
    uv = shutil.which("uv") or str(Path.home() / ".local" / "bin" / "uv")
    if not Path(uv).is_file():
        pytest.skip("uv is not installed here (scripts/install_uv.sh installs it)")
    proc = subprocess.run(
        [uv, "run", "-v", str(LAUNCHER), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: launch_lambda.py" in proc.stdout
    assert "Reading inline script metadata" in proc.stderr
    # The interpreter that ran it is the script's own environment, not the project's .venv (uv -v
    # may still mention .venv while it looks for a base interpreter, e.g. under `uv run pytest`).
    ran_with = re.findall(r"Using Python \S+ interpreter at: (\S+)", proc.stderr)
    assert ran_with, proc.stderr[-2000:]
    assert str(REPO_ROOT / ".venv") not in ran_with[-1], ran_with


class ShellHere:
    """A stand-in for Remote that runs the poll's shell command here, in `home`."""

    connect_timeout = 1

    def __init__(self, home, path):
        self.home, self.path = home, path

    def run(self, command, timeout=None, **_):
        env = {**os.environ, "PATH": self.path}
        return subprocess.run(
            ["bash", "-c", command], cwd=self.home, env=env, capture_output=True, check=True
        )


def test_a_run_finishing_between_the_polls_two_looks_is_seen_as_finished(tmp_path):
    """The run writes its exit code and its tmux session ends in the instant between the poll's
    reads. Here tmux itself finishes the run when asked: a poll that reads the exit code before
    asking tmux sees no code and no session, and calls a clean run lost (CI saw this once)."""
    from nanochat.launcher import deploy

    run_dir = tmp_path / "home" / "proj"
    (run_dir / ".launcher").mkdir(parents=True)
    (run_dir / ".launcher" / "run.log").write_text("done\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_tmux = bin_dir / "tmux"
    fake_tmux.write_text("#!/bin/bash\necho 0 > .launcher/exit_code\nexit 1\n")
    fake_tmux.chmod(0o755)
    remote = ShellHere(tmp_path / "home", f"{bin_dir}:{os.environ['PATH']}")
    assert deploy.follow_run(remote, "proj", "s", 0.01, 1) == 0


def test_a_machine_dying_under_a_poll_is_lost_not_failed(tmp_path):
    """The machine dies while a poll is on it: that poll sees the run's session gone with no exit
    code, the next cannot connect, and the API says the instance is terminated only a few looks
    later. The run is lost with its instance (resume it elsewhere), not failed (CI saw this)."""
    from nanochat.launcher import deploy

    (tmp_path / "home" / "proj" / ".launcher").mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "tmux").write_text("#!/bin/bash\nexit 1\n")  # no session: its processes are gone
    (bin_dir / "tmux").chmod(0o755)

    class DyingMachine(ShellHere):
        looks = 0

        def run(self, command, timeout=None, **_):
            self.looks += 1
            if self.looks > 1:
                raise errors.LaunchError("ssh: connect to host port 22: Connection refused")
            return super().run(command)

    class LaggingApi:
        asked = 0

        def instance(self, instance_id):
            self.asked += 1
            return {"status": "active" if self.asked < 3 else "terminated"}

    remote = DyingMachine(tmp_path / "home", f"{bin_dir}:{os.environ['PATH']}")
    with pytest.raises(errors.InstanceLost, match="is terminated: its run is gone"):
        deploy.follow_run(remote, "proj", "s", 0.01, 30, api=LaggingApi(), instance_id="i1")
