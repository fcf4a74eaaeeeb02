#!/usr/bin/env python3
"""
Rent a Lambda Cloud GPU node, run the nanochat-aquarat pipeline on it, bring the results home,
and never leave a billed instance behind by accident.

Runs on a laptop: needs only `requests` and `python-dotenv` (no torch) plus the OpenSSH client
(`ssh`; `rsync` is used for fetching when present, else tar over ssh).

    python launch_lambda.py types
    python launch_lambda.py --instance-type gpu_8x_h100_sxm5 --region us-west-1      # = launch
    python launch_lambda.py launch --instance-type gpu_1x_a10 --region auto --auto-terminate
    python launch_lambda.py status | logs ID [--follow] | fetch ID | ssh ID | terminate ID

Keys come from the environment or a .env file: LAMBDA_API_KEY (required for the API),
WANDB_API_KEY (forwarded to the instance's .env; the run logs to W&B offline without it).
Secrets never go into argv, request bodies, user_data, temp files or printed output: the remote
.env is written through ssh's stdin with mode 600.

The API is Lambda Cloud API v1 (OpenAPI 1.8.3): envelopes {"data": ...} / {"error": {"code",
"message", "suggestion"}}; decisions are made on `code`, never on `message`. Documented limits:
1 request/s, one launch per 12 s. 429 and 5xx are retried with backoff.
"""

import argparse
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import requests
from dotenv import dotenv_values

REPO_ROOT = Path(__file__).resolve().parent
DEFAULT_API_BASE = "https://cloud.lambda.ai/api/v1"
DEFAULT_COMMAND = "bash run_aquarat_small.sh"
DEFAULT_REMOTE_DIR = "nanochat-aquarat"  # relative paths are relative to the remote home
DEFAULT_REMOTE_BASE_DIR = "~/.cache/nanochat"  # the remote NANOCHAT_BASE_DIR
SUBCOMMANDS = ("types", "launch", "status", "logs", "fetch", "terminate", "ssh")
# Non-secret and secret settings forwarded into the instance's .env when set locally.
FORWARDED_ENV = ("WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_MODE", "HF_TOKEN")

# Exit codes (also listed in --help and QUICKSTART.md).
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_CONFIG = 3  # missing/rejected keys, bad flags, no SSH key, unknown instance type
EXIT_API = 4  # API error that retries did not fix (quota, invalid parameters, outage)
EXIT_NO_CAPACITY = 5  # no capacity for the type/region (after --wait-capacity, if given)
EXIT_NOT_READY = 6  # instance never became active, or SSH never answered
EXIT_DEPLOY = 7  # an SSH step failed: no GPU listed, shipping code, writing .env, starting tmux,
#                        reading logs, fetching
EXIT_RUN_FAILED = 8  # the remote command exited non-zero, vanished, or exceeded --max-hours
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM / SIGHUP
EXIT_CODES_HELP = """exit codes: 0 ok, 1 unexpected error, 2 usage, 3 config/credentials, 4 API error,
  5 no capacity, 6 instance/SSH never ready, 7 deploy/transfer over SSH failed, 8 remote run failed,
  130 interrupted.
Every failure after a successful launch terminates the instance unless --keep-on-failure."""


class LaunchError(Exception):
    """A failure with a message for the user and the exit code that names it."""

    def __init__(self, message, exit_code=EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


def say(*parts):
    print(*parts, flush=True)


def env_float(name, default):
    # Test knobs (documented in QUICKSTART.md): the real limits are the defaults.
    value = os.environ.get(name)
    return float(value) if value else default


def utc_now():
    return datetime.now(timezone.utc)


def money(cents):
    return f"${cents / 100:,.2f}"


def duration(hours):
    return f"{hours * 60:.0f} min" if hours < 1 else f"{hours:.2f} h"


def home_relative(path):
    """Remote paths are absolute or relative to the remote home; '~/x' means 'x' (ssh starts in $HOME)."""
    if path in ("~", "~/"):
        return "."
    return path[2:] if path.startswith("~/") else path


def shown(path):
    """How a remote path reads in messages: '~/x' for home-relative ones."""
    path = home_relative(path)
    return path if path.startswith("/") else "~/" + path.removeprefix("./")


# -----------------------------------------------------------------------------
# Environment and secrets


def load_settings(env_file):
    """Environment wins over .env; the .env file is looked up in the cwd, then beside this script."""
    candidates = [Path(env_file)] if env_file else [Path.cwd() / ".env", REPO_ROOT / ".env"]
    settings = {}
    for path in candidates:
        if path.exists() and not path.is_dir():
            settings = {k: v for k, v in dotenv_values(path).items() if v is not None}
            break
        if env_file:
            raise LaunchError(f"--env-file {path} does not exist", EXIT_CONFIG)
    settings.update({k: v for k, v in os.environ.items() if v != ""})
    return settings


def require_api_key(settings):
    key = settings.get("LAMBDA_API_KEY", "").strip()
    if not key:
        raise LaunchError(
            "LAMBDA_API_KEY is not set. Create one at https://cloud.lambda.ai/api-keys and put it in "
            "the environment or in .env (see .env.template).",
            EXIT_CONFIG,
        )
    return key


def remote_env_text(settings, extra_keys=()):
    """The instance's .env: forwarded settings, one KEY='value' per line (valid for bash and dotenv)."""
    if "LAMBDA_API_KEY" in extra_keys:
        raise LaunchError(
            "--forward-env LAMBDA_API_KEY refused: the account key stays on this machine",
            EXIT_CONFIG,
        )
    lines = []
    for key in list(FORWARDED_ENV) + [k for k in extra_keys if k not in FORWARDED_ENV]:
        value = settings.get(key)
        if not value:
            continue
        if "'" in value or "\n" in value or "\\" in value:
            raise LaunchError(
                f"{key} contains a quote, backslash or newline; the launcher will not "
                "forward it (fix the value in your environment/.env)",
                EXIT_CONFIG,
            )
        lines.append(f"{key}='{value}'")
    return "".join(line + "\n" for line in lines)


# -----------------------------------------------------------------------------
# Local state: what this laptop launched (never secrets)


class State:
    """instances.json (mode 600) and the launcher's own known_hosts, in LAMBDA_LAUNCHER_STATE_DIR
    or ~/.config/nanochat-aquarat."""

    def __init__(self, directory=None):
        default = (
            Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "nanochat-aquarat"
        )
        self.dir = Path(directory or os.environ.get("LAMBDA_LAUNCHER_STATE_DIR") or default)
        self.path = self.dir / "instances.json"
        self.known_hosts = self.dir / "known_hosts"

    def load(self):
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as e:
            raise LaunchError(
                f"{self.path} is not valid JSON ({e}); fix or move it away", EXIT_CONFIG
            )

    def get(self, instance_id):
        return self.load().get(instance_id)

    def update(self, instance_id, **fields):
        data = self.load()
        data.setdefault(instance_id, {"id": instance_id}).update(fields)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, self.path)  # atomic: a crash never leaves a half-written state file
        os.chmod(self.path, 0o600)


# -----------------------------------------------------------------------------
# Lambda Cloud API client


class ApiError(Exception):
    def __init__(self, status, code, message, suggestion=None):
        super().__init__(message)
        self.status, self.code, self.message, self.suggestion = status, code, message, suggestion

    @property
    def retryable(self):
        # 0 = network error (no HTTP answer), 429 = rate limited, 5xx = server/provider trouble
        return self.status == 0 or self.status == 429 or self.status >= 500

    def __str__(self):
        text = f"{self.message} [{self.code}, HTTP {self.status}]"
        return text + (f" Suggestion: {self.suggestion}" if self.suggestion else "")


class RateLimiter:
    """Client-side spacing of calls so we stay under the documented limits instead of hitting 429s.
    The interval is counted from the end of the previous call: the server saw it before then, so this
    spacing holds on the server's clock too, whatever the network delays."""

    def __init__(self, interval):
        self.interval = interval
        self.last = None

    def wait(self, label=None):
        if self.last is not None:
            delay = self.last + self.interval - time.monotonic()
            if delay > 0:
                if label and delay > 2:
                    say(f"  waiting {delay:.0f}s ({label})")
                time.sleep(delay)

    def done(self):
        self.last = time.monotonic()


class LambdaAPI:
    CAPACITY = "instance-operations/launch/insufficient-capacity"
    NOT_FOUND = "global/object-does-not-exist"
    AUTH_CODES = ("global/invalid-api-key", "global/account-inactive", "global/invalid-address")

    def __init__(self, base, api_key, retries=None):
        self.base = base.rstrip("/")
        self.session = requests.Session()
        self.session.headers.update(
            {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        )
        self.limiter = RateLimiter(env_float("LAMBDA_RATE_LIMIT_S", 1.0))
        self.launch_limiter = RateLimiter(env_float("LAMBDA_LAUNCH_RATE_LIMIT_S", 12.0))
        self.backoff = env_float("LAMBDA_RETRY_BACKOFF_S", 2.0)
        self.retries = int(env_float("LAMBDA_RETRIES", 5)) if retries is None else retries
        self.timeout = env_float("LAMBDA_HTTP_TIMEOUT_S", 30.0)

    def request(self, method, path, body=None, before_retry=None):
        """Returns the envelope's data. Retries 429/5xx/network errors with exponential backoff
        (honouring Retry-After); before_retry() may return a result that makes retrying unnecessary."""
        is_launch = path.startswith("/instance-operations/launch")
        for attempt in range(self.retries + 1):
            if is_launch:
                self.launch_limiter.wait("Lambda allows one launch per 12 s")
            self.limiter.wait()
            retry_after = None
            try:
                r = self.session.request(method, self.base + path, json=body, timeout=self.timeout)
            except requests.RequestException as e:
                r, err = None, ApiError(0, "network/error", f"{type(e).__name__}: {e}")
            self.limiter.done()
            if is_launch:
                self.launch_limiter.done()
            if r is not None:
                try:
                    payload = r.json()
                except ValueError:
                    payload = None
                if r.ok and isinstance(payload, dict) and "data" in payload:
                    return payload["data"]
                error = payload.get("error") if isinstance(payload, dict) else None
                if isinstance(error, dict) and error.get("code"):
                    err = ApiError(
                        r.status_code,
                        error["code"],
                        error.get("message", ""),
                        error.get("suggestion"),
                    )
                else:
                    err = ApiError(
                        r.status_code,
                        f"http/{r.status_code}",
                        f"unexpected response: {r.text[:200]!r}",
                    )
                if r.headers.get("Retry-After", "").isdigit():
                    retry_after = float(r.headers["Retry-After"])
            if not err.retryable or attempt == self.retries:
                raise err
            if before_retry is not None:
                result = before_retry()
                if result is not None:
                    return result
            delay = retry_after if retry_after is not None else min(self.backoff * 2**attempt, 60.0)
            say(
                f"  API {method} {path}: {err.code} (HTTP {err.status}); retry {attempt + 1}/{self.retries} "
                f"in {delay:.1f}s"
            )
            time.sleep(delay)

    def instance_types(self):
        return self.request("GET", "/instance-types")

    def instances(self):
        return self.request("GET", "/instances")

    def instance(self, instance_id):
        return self.request("GET", f"/instances/{instance_id}")

    def ssh_keys(self):
        return self.request("GET", "/ssh-keys")

    def launch(self, body, known_ids):
        """Launch one instance and return its id. An error or lost answer may still have launched it,
        so before any retry we look for a new instance with our name: never two instances for one call."""

        def already_launched():
            for inst in self.instances():
                if inst.get("name") == body["name"] and inst["id"] not in known_ids:
                    say(f"  the failed launch request did create {inst['id']}; using it")
                    return {"instance_ids": [inst["id"]]}
            return None

        return self.request(
            "POST", "/instance-operations/launch", body, before_retry=already_launched
        )["instance_ids"][0]

    def terminate(self, instance_id):
        return self.request(
            "POST", "/instance-operations/terminate", {"instance_ids": [instance_id]}
        )


def api_failure(err, what):
    """Turn an ApiError into a LaunchError with the right exit code, deciding on the code only."""
    if err.code in LambdaAPI.AUTH_CODES:
        return LaunchError(
            f"{what}: the API rejected the credentials: {err}. Check LAMBDA_API_KEY "
            "(https://cloud.lambda.ai/api-keys) and your account/billing.",
            EXIT_CONFIG,
        )
    if err.code == LambdaAPI.CAPACITY:
        return LaunchError(f"{what}: {err}", EXIT_NO_CAPACITY)
    return LaunchError(f"{what}: {err}", EXIT_API)


# -----------------------------------------------------------------------------
# SSH: every remote action is a real `ssh` (or rsync over ssh) subprocess


class Remote:
    def __init__(self, host, user, port, key_file, known_hosts, connect_timeout=10):
        self.host, self.user, self.port = host, user, int(port)
        self.key_file, self.known_hosts = key_file, Path(known_hosts)
        self.connect_timeout = int(connect_timeout)

    @property
    def target(self):
        return f"{self.user}@{self.host}"

    def options(self, batch=True):
        # Host keys: trust on first use, recorded in the launcher's own known_hosts; a changed key is refused.
        opts = [
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            f"ConnectTimeout={self.connect_timeout}",
            "-o",
            "ServerAliveInterval=15",
            "-o",
            "ServerAliveCountMax=4",
            "-o",
            "LogLevel=ERROR",
        ]
        if self.key_file:
            opts += ["-i", str(self.key_file), "-o", "IdentitiesOnly=yes"]
        if batch:
            opts += ["-o", "BatchMode=yes"]  # never hang on a password/passphrase prompt
        return opts

    def ssh_argv(self, command=None, batch=True, tty=False):
        argv = (
            ["ssh", "-p", str(self.port)]
            + self.options(batch)
            + (["-t"] if tty else [])
            + [self.target]
        )
        return argv + ([command] if command else [])

    def human_command(self):
        parts = (
            ["ssh"]
            + (["-i", str(self.key_file)] if self.key_file else [])
            + (["-p", str(self.port)] if self.port != 22 else [])
            + [self.target]
        )
        return shlex.join(parts)

    def run(self, command, input_text=None, stdin=None, timeout=None, check=True, capture=True):
        if input_text is None and stdin is None:
            stdin = subprocess.DEVNULL  # never let ssh swallow the terminal's keystrokes
        proc = subprocess.run(
            self.ssh_argv(command),
            input=input_text.encode() if input_text is not None else None,
            stdin=stdin,
            capture_output=capture,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            err = (proc.stderr or b"").decode(errors="replace").strip()[-500:]
            raise LaunchError(
                f"ssh {self.target} failed (exit {proc.returncode}): {err or 'no output'}",
                EXIT_DEPLOY,
            )
        return proc

    def forget_host(self):
        """A new instance may reuse an IP whose old host key we recorded: forget it before first contact."""
        if self.known_hosts.exists():
            name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
            subprocess.run(
                ["ssh-keygen", "-R", name, "-f", str(self.known_hosts)], capture_output=True
            )

    def wait_ready(self, timeout, poll):
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                proc = self.run("true", check=False, timeout=self.connect_timeout + 10)
                if proc.returncode == 0:
                    return
                last = proc.stderr.decode(errors="replace").strip()
            except subprocess.TimeoutExpired:
                last = "ssh timed out"
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"SSH to {self.target} port {self.port} never answered within {timeout:.0f}s "
                    f"(last error: {last or 'none'})",
                    EXIT_NOT_READY,
                )
            say(
                f"  waiting for sshd on {self.host}:{self.port} ... ({last.splitlines()[-1] if last else 'no answer'})"
            )
            time.sleep(poll)


# -----------------------------------------------------------------------------
# Remote layout: <remote_dir>/ holds the shipped tree, .env (600) and .launcher/{run.sh,run.log,exit_code}


def check_gpus(remote):
    """Before anything is shipped: the node must list its GPUs. A driver problem found now costs a minute
    of billing, not a pipeline that stops (or crawls on the CPU) after its set-up."""
    proc = remote.run("nvidia-smi -L", check=False, timeout=60)
    out = (proc.stdout or b"").decode(errors="replace")
    gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
    if proc.returncode != 0 or not gpus:
        detail = (out + (proc.stderr or b"").decode(errors="replace")).strip()[-300:] or "no output"
        raise LaunchError(
            f"the instance lists no GPU (`nvidia-smi -L` exit {proc.returncode}: {detail}); "
            f"nothing was started. A custom --command that needs no GPU: --skip-gpu-check",
            EXIT_DEPLOY,
        )
    model = gpus[0].split(":", 1)[1].split("(UUID")[0].strip()
    say(f"GPUs on the instance: {len(gpus)} x {model}")


def run_script(command, remote_base_dir):
    """The script tmux runs. It holds no secret: those are sourced from .env at run time."""
    base = home_relative(remote_base_dir)
    base_expr = shlex.quote(base) if base.startswith("/") else '"$HOME"/' + shlex.quote(base)
    return f"""#!/usr/bin/env bash
# Written by launch_lambda.py. Runs the pipeline, appends its output to run.log, records the exit code.
cd "$(dirname "$0")/.." || exit 1
rm -f .launcher/exit_code
if [ -f .env ]; then set -a; . ./.env; set +a; fi
export NANOCHAT_BASE_DIR={base_expr}
mkdir -p "$NANOCHAT_BASE_DIR"
echo "[launcher] $(date -u +%FT%TZ) starting in $PWD: "{shlex.quote(command)} | tee -a .launcher/run.log
(
{command}
) 2>&1 | tee -a .launcher/run.log
code=${{PIPESTATUS[0]}}
echo "[launcher] $(date -u +%FT%TZ) finished with exit code $code" | tee -a .launcher/run.log
echo "$code" > .launcher/exit_code.tmp && mv .launcher/exit_code.tmp .launcher/exit_code
"""


def tmux_session(instance_id):
    return f"aquarat-{instance_id[:8]}"


def git(repo, *args):
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(
            f"git {' '.join(args)} in {repo} failed: {proc.stderr.strip()}", EXIT_CONFIG
        )
    return proc.stdout.strip()


def tree_to_ship(repo):
    """HEAD plus uncommitted changes to tracked files (`git stash create` touches no ref or file)."""
    git(repo, "rev-parse", "--verify", "HEAD")
    if (
        subprocess.run(
            ["git", "-C", str(repo), "ls-files", "--error-unmatch", ".env"], capture_output=True
        ).returncode
        == 0
    ):
        raise LaunchError(
            f"{repo}/.env is tracked by git: it would be shipped. `git rm --cached .env` first.",
            EXIT_CONFIG,
        )
    stash = git(
        repo,
        "-c",
        "user.name=launch_lambda",
        "-c",
        "user.email=launcher@localhost",
        "stash",
        "create",
    )
    untracked = [l for l in git(repo, "status", "--porcelain").splitlines() if l.startswith("??")]
    return stash or "HEAD", bool(stash), len(untracked)


def deploy(remote, repo, remote_dir, command, remote_base_dir, env_text, session):
    rdir = shlex.quote(home_relative(remote_dir))
    tree, dirty, n_untracked = tree_to_ship(repo)
    say(
        f"Shipping {git(repo, 'rev-parse', '--short', 'HEAD')}{' + uncommitted changes' if dirty else ''} "
        f"to {remote.target}:{shown(remote_dir)} (git archive over ssh)"
    )
    if n_untracked:
        say(
            f"  note: {n_untracked} untracked file(s) are not shipped (git add them to include them)"
        )
    archive = subprocess.Popen(
        ["git", "-C", str(repo), "archive", "--format=tar", tree], stdout=subprocess.PIPE
    )
    try:
        remote.run(f"mkdir -p {rdir}/.launcher && tar -xf - -C {rdir}", stdin=archive.stdout)
    finally:
        archive.stdout.close()
        if archive.wait() != 0:
            raise LaunchError("git archive failed", EXIT_DEPLOY)
    # Secrets travel only on ssh's stdin. The old file is removed first so the new one is created under
    # umask 077: it is never readable by others, not even for a moment.
    say(
        f"Writing {shown(remote_dir)}/.env (mode 600) with: "
        f"{', '.join(l.split('=')[0] for l in env_text.splitlines()) or 'nothing to forward'}"
    )
    remote.run(
        f"umask 077 && rm -f {rdir}/.env && cat > {rdir}/.env && chmod 600 {rdir}/.env",
        input_text=env_text,
    )
    # One more round trip: write the run script (no secrets in it) and start it in a detached tmux session.
    remote.run(
        f"cd {rdir} && cat > .launcher/run.sh && "
        "{ command -v tmux >/dev/null || { echo 'tmux is not installed on the instance' >&2; exit 1; }; } && "
        f"tmux new-session -d -s {session} \"bash '$PWD/.launcher/run.sh'\"",
        input_text=run_script(command, remote_base_dir),
    )
    say(
        f"Started `{command}` in tmux session '{session}' (log: {shown(remote_dir)}/.launcher/run.log)"
    )


def poll_run(remote, remote_dir, session, offset):
    """One look at the run: (exit_code or None, tmux alive, new log bytes)."""
    rdir = shlex.quote(home_relative(remote_dir))
    # Read the exit code before the log size: the log is complete once the exit code exists.
    cmd = (
        f"cd {rdir} && e=$(cat .launcher/exit_code 2>/dev/null || echo -); "
        f"s=$(stat -c %s .launcher/run.log 2>/dev/null || echo 0); "
        f'if tmux has-session -t ={session} 2>/dev/null; then a=1; else a=0; fi; echo "$e $s $a"; '
        f'if [ "$s" -gt {offset} ]; then tail -c +{offset + 1} .launcher/run.log | head -c $((s - {offset})); fi'
    )
    proc = remote.run(cmd, timeout=remote.connect_timeout + 60)
    head, _, chunk = proc.stdout.partition(b"\n")
    code, _, alive = head.decode().split()
    return (None if code == "-" else int(code)), alive == "1", chunk


def follow_run(
    remote, remote_dir, session, poll, ssh_timeout, max_seconds=None, api=None, instance_id=None
):
    """Stream the remote log until the run finishes; returns its exit code. Tolerates short SSH outages."""
    offset, started, down_since = 0, time.monotonic(), None
    while True:
        try:
            code, alive, chunk = poll_run(remote, remote_dir, session, offset)
            down_since = None
        except (LaunchError, subprocess.TimeoutExpired) as e:
            down_since = down_since or time.monotonic()
            if api is not None:
                status = api.instance(instance_id)["status"]
                if status in ("terminated", "terminating", "preempted"):
                    raise LaunchError(
                        f"instance {instance_id} is {status}; the run is gone", EXIT_RUN_FAILED
                    )
            if time.monotonic() - down_since > ssh_timeout:
                raise LaunchError(
                    f"lost SSH to the instance for more than {ssh_timeout:.0f}s: {e}",
                    EXIT_NOT_READY,
                )
            say(f"  ssh hiccup ({e}); retrying")
            time.sleep(poll)
            continue
        if chunk:
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            offset += len(chunk)
        if code is not None:
            return code
        if not alive:
            raise LaunchError(
                f"the run stopped without recording an exit code (tmux session '{session}' is gone)",
                EXIT_RUN_FAILED,
            )
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            raise LaunchError(
                f"the run exceeded --max-hours ({max_seconds / 3600:g} h)", EXIT_RUN_FAILED
            )
        time.sleep(poll)


def fetch_artifacts(remote, remote_dir, remote_base_dir, dest):
    """Report, runs/ metrics (and the runs' own tokenizers), the tokenizer (needed to use the checkpoints),
    the last complete checkpoint step of every stage/tag, and the run log."""
    base = home_relative(remote_base_dir)
    qbase = shlex.quote(base)
    listing = (
        remote.run(
            f"cd {qbase} 2>/dev/null || exit 0; for p in report runs tokenizer; do [ -e $p ] && echo $p; done; "
            f"ls checkpoints/*/*/step_*/meta.json 2>/dev/null; true"
        )
        .stdout.decode()
        .split()
    )
    last_steps = {}
    for p in listing:
        # a step is complete once its meta.json exists (written last): a save killed midway is skipped
        if p.startswith("checkpoints/") and p.endswith("/meta.json"):
            p = p.rpartition("/")[0]
            parent, _, leaf = p.rpartition("/")
            if re.fullmatch(r"step_\d+", leaf):
                last_steps[parent] = max(
                    last_steps.get(parent, p), p, key=lambda q: int(q.rsplit("_", 1)[1])
                )
    paths = [p for p in listing if not p.startswith("checkpoints/")] + sorted(last_steps.values())
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    say(
        f"Fetching into {dest}: {', '.join(paths) if paths else '(no artifacts found under ' + base + ')'}"
    )
    if paths:
        if shutil.which("rsync"):
            ssh_cmd = shlex.join(["ssh", "-p", str(remote.port)] + remote.options())
            proc = subprocess.run(
                [
                    "rsync",
                    "-a",
                    "-r",
                    "--files-from=-",
                    "-e",
                    ssh_cmd,
                    f"{remote.target}:{base}/",
                    str(dest) + "/",
                ],
                input="\n".join(paths).encode(),
                capture_output=True,
            )
            if proc.returncode != 0:
                raise LaunchError(
                    f"rsync failed: {proc.stderr.decode(errors='replace')[-500:]}", EXIT_DEPLOY
                )
        else:  # no local rsync (e.g. a bare Windows laptop): stream a tar over ssh
            tar = subprocess.Popen(
                remote.ssh_argv(f"cd {qbase} && tar -cf - -- {shlex.join(paths)}"),
                stdout=subprocess.PIPE,
            )
            untar = subprocess.run(["tar", "-xf", "-", "-C", str(dest)], stdin=tar.stdout)
            tar.stdout.close()
            if tar.wait() != 0 or untar.returncode != 0:
                raise LaunchError("fetching artifacts with tar over ssh failed", EXIT_DEPLOY)
    log = remote.run(f"cat {shlex.quote(home_relative(remote_dir))}/.launcher/run.log", check=False)
    if log.returncode == 0:
        (dest / "run.log").write_bytes(log.stdout)
    return dest


# -----------------------------------------------------------------------------
# Launch: choose, acquire, wait, deploy, watch; a guard terminates on any failure after launch


def choose_ssh_key(api, wanted):
    names = [k["name"] for k in api.ssh_keys()]
    if wanted:
        if wanted not in names:
            raise LaunchError(
                f"--ssh-key-name {wanted!r} is not on your account; keys: {names or 'none'}",
                EXIT_CONFIG,
            )
        return wanted
    if len(names) == 1:
        return names[0]
    if not names:
        raise LaunchError(
            "your Lambda account has no SSH key: add your public key at "
            "https://cloud.lambda.ai/ssh-keys (see LAMBDA_MANUAL_SETUP.md) and retry",
            EXIT_CONFIG,
        )
    if not sys.stdin.isatty():
        raise LaunchError(
            f"several SSH keys on the account ({', '.join(names)}): pass --ssh-key-name",
            EXIT_CONFIG,
        )
    for i, name in enumerate(names, 1):
        say(f"  [{i}] {name}")
    choice = input("Which SSH key should the instance accept? number: ").strip()
    if not choice.isdigit() or not 1 <= int(choice) <= len(names):
        raise LaunchError(f"no such key number: {choice!r}", EXIT_USAGE)
    return names[int(choice) - 1]


def lookup_type(types, name):
    if name not in types:
        raise LaunchError(
            f"--instance-type {name!r} does not exist; run `python launch_lambda.py types`. "
            f"Known: {', '.join(sorted(types))}",
            EXIT_CONFIG,
        )
    return types[name]


def acquire_instance(api, args, ssh_key, known_ids):
    """Launch in the requested region (or any region with capacity), waiting for capacity if asked."""
    deadline = time.monotonic() + 60 * (args.wait_capacity or 0)
    body = {"instance_type_name": args.instance_type, "ssh_key_names": [ssh_key], "name": args.name}
    while True:
        item = lookup_type(api.instance_types(), args.instance_type)
        available = [r["name"] for r in item["regions_with_capacity_available"]]
        candidates = (
            available if args.region == "auto" else [r for r in [args.region] if r in available]
        )
        if not candidates:
            say(
                f"No capacity for {args.instance_type} in {args.region}; regions with capacity now: "
                f"{', '.join(available) or 'none'}"
            )
        for region in candidates:
            say(f"Launching {args.instance_type} in {region} as '{args.name}' ...")
            try:
                return (
                    api.launch(dict(body, region_name=region), known_ids),
                    region,
                    item["instance_type"],
                )
            except ApiError as e:
                if e.code != LambdaAPI.CAPACITY:
                    raise api_failure(e, "launch failed")
                say(f"  {region}: insufficient capacity")
        left = deadline - time.monotonic()
        if left <= 0:
            hint = (
                ""
                if args.wait_capacity
                else " Try --region auto, another type, or --wait-capacity MINUTES."
            )
            raise LaunchError(
                f"no capacity for {args.instance_type} in {args.region}.{hint}", EXIT_NO_CAPACITY
            )
        say(f"  waiting for capacity ({left / 60:.1f} min left of --wait-capacity) ...")
        time.sleep(min(args.poll_interval, max(left, 0.1)))


def wait_active(api, instance_id, timeout, poll):
    deadline = time.monotonic() + timeout
    while True:
        try:
            inst = api.instance(instance_id)
            status = inst["status"]
        except ApiError as e:
            if e.code != LambdaAPI.NOT_FOUND:  # a brand-new instance can briefly be unknown
                raise api_failure(e, f"polling instance {instance_id}")
            inst, status = {}, "not visible yet"
        if status == "active" and inst.get("ip"):
            return inst
        if status in ("terminated", "terminating", "preempted"):
            raise LaunchError(
                f"instance {instance_id} became {status} while booting", EXIT_NOT_READY
            )
        if time.monotonic() >= deadline:
            raise LaunchError(
                f"instance {instance_id} was not active after {timeout:.0f}s (status: {status})",
                EXIT_NOT_READY,
            )
        say(f"  instance {instance_id}: {status} ...")
        time.sleep(poll)


def terminate_instance(api, state, instance_id):
    try:
        api.terminate(instance_id)
    except ApiError as e:
        if e.code != LambdaAPI.NOT_FOUND:
            raise
        say(f"  {instance_id} was already gone")
    if state.get(instance_id):
        state.update(instance_id, status="terminated", terminated_at=utc_now().isoformat())


def cleanup_after_failure(api, state, instance_id, keep, reason):
    say(f"FAILED after launching {instance_id}: {reason}")
    if keep:
        say(
            f"--keep-on-failure: instance {instance_id} is STILL RUNNING and billed. Inspect it with "
            f"`python launch_lambda.py ssh {instance_id}`, then `python launch_lambda.py terminate {instance_id}`."
        )
        return
    say(
        f"Terminating {instance_id} so it does not keep billing (use --keep-on-failure to keep it) ..."
    )
    previous = signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # a second Ctrl-C must not skip termination
    try:
        terminate_instance(api, state, instance_id)
        say(f"Terminated {instance_id}.")
    except Exception as e:
        say(
            f"!!! COULD NOT TERMINATE {instance_id}: {e}\n!!! It may still be billing. Terminate it now at "
            f"https://cloud.lambda.ai/instances or with `python launch_lambda.py terminate {instance_id}`."
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def remote_command(args, price_cents=None):
    """The command run on the node. The default one asks for the gpu profile outright (a node whose torch
    cannot see its GPUs then stops at once instead of running the cpu profile on a billed machine) and
    passes the instance's price for the report's cost per stage, unless the user's own flags say otherwise."""
    if args.command:
        return args.command
    argv = shlex.split(DEFAULT_COMMAND) + args.run_args
    if "--profile" not in args.run_args:
        argv += ["--profile", "gpu"]
    if price_cents is not None and "--gpu-hourly-price" not in args.run_args:
        argv += ["--gpu-hourly-price", f"{price_cents / 100:.2f}"]
    return shlex.join(argv)


def cmd_launch(args, settings):
    command = remote_command(args)
    key = None if args.dry_run and not settings.get("LAMBDA_API_KEY") else require_api_key(settings)
    if not settings.get("WANDB_API_KEY"):
        say(
            "warning: WANDB_API_KEY is not set (environment or .env): the run will log to W&B offline "
            "on the instance; metrics are still mirrored under runs/ and fetched."
        )
    env_text = remote_env_text(settings, args.forward_env)
    if args.ssh_key_file and not Path(args.ssh_key_file).is_file():
        raise LaunchError(f"--ssh-key-file {args.ssh_key_file} does not exist", EXIT_CONFIG)
    if not args.no_deploy:
        tree, _, _ = tree_to_ship(args.repo)
        if (
            args.command is None
            and subprocess.run(
                ["git", "-C", str(args.repo), "cat-file", "-e", f"{tree}:run_aquarat_small.sh"],
                capture_output=True,
            ).returncode
            != 0
        ):
            raise LaunchError(
                f"run_aquarat_small.sh is not in the git tree of {args.repo}; commit it or pass "
                "--command",
                EXIT_CONFIG,
            )
    args.name = args.name or f"nanochat-aquarat-{secrets.token_hex(3)}"
    api = LambdaAPI(args.api_base, key) if key else None
    if args.dry_run:
        return dry_run(api, args, command)
    try:
        ssh_key = choose_ssh_key(api, args.ssh_key_name)
        existing = api.instances()
    except ApiError as e:
        raise api_failure(e, "preparing the launch")
    if existing:
        say(
            f"note: you already have {len(existing)} instance(s) running: "
            + ", ".join(
                f"{i['id']} ({i['instance_type']['name']}, {i['status']})" for i in existing
            )
        )
    state = State()
    try:
        instance_id, region, itype = acquire_instance(
            api, args, ssh_key, {i["id"] for i in existing}
        )
    except KeyboardInterrupt:
        # Ctrl-C may have landed while a launch request was in flight: find and terminate what it made.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        say("Interrupted; checking that no instance was launched ...")
        known = {i["id"] for i in existing}
        try:
            for inst in api.instances():
                if inst.get("name") == args.name and inst["id"] not in known:
                    cleanup_after_failure(
                        api, state, inst["id"], args.keep_on_failure, "interrupted"
                    )
        except ApiError as e:
            say(
                f"!!! could not check ({e}): look at https://cloud.lambda.ai/instances for '{args.name}'"
            )
        raise LaunchError("interrupted before the instance was ready", EXIT_INTERRUPTED)
    except ApiError as e:
        raise api_failure(e, "launch failed")
    price = itype["price_cents_per_hour"]
    command = remote_command(args, price)
    say(
        f"Launched {instance_id} ({args.instance_type}, {region}) at {money(price)}/hour. Billing has started."
    )
    try:  # from here on, any failure terminates the instance (unless --keep-on-failure)
        state.update(
            instance_id,
            name=args.name,
            instance_type=args.instance_type,
            region=region,
            status="booting",
            price_cents_per_hour=price,
            launched_at=utc_now().isoformat(),
            ssh_user=args.ssh_user,
            ssh_port=args.ssh_port,
            ssh_key_file=args.ssh_key_file,
            remote_dir=args.remote_dir,
            remote_base_dir=args.remote_base_dir,
            tmux_session=tmux_session(instance_id),
            command=command,
        )
        return after_launch(api, state, args, instance_id, price, command, env_text)
    except KeyboardInterrupt:
        failure = LaunchError("interrupted (Ctrl-C or signal)", EXIT_INTERRUPTED)
    except LaunchError as e:
        failure = e
    except ApiError as e:
        failure = api_failure(e, "API error after launch")
    except Exception as e:  # a bug must not leave a billed instance behind either
        failure = LaunchError(f"unexpected error: {type(e).__name__}: {e}", EXIT_ERROR)
    cleanup_after_failure(api, state, instance_id, args.keep_on_failure, failure)
    raise failure


def after_launch(api, state, args, instance_id, price, command, env_text):
    launched = time.monotonic()
    inst = wait_active(api, instance_id, args.active_timeout, args.poll_interval)
    state.update(instance_id, ip=inst["ip"], status="active")
    remote = Remote(
        inst["ip"],
        args.ssh_user,
        args.ssh_port,
        args.ssh_key_file,
        state.known_hosts,
        connect_timeout=min(10, max(1, args.ssh_timeout)),
    )
    remote.forget_host()
    say(
        f"Instance {instance_id} is active at {inst['ip']}.\n"
        f"  SSH:  {remote.human_command()}   (or: python launch_lambda.py ssh {instance_id})\n"
        f"  Cost: {money(price)}/hour, ~{money(price * (time.monotonic() - launched) / 3600)} so far"
    )
    if args.no_deploy:
        say(
            f"--no-deploy: nothing started. The instance keeps billing until "
            f"`python launch_lambda.py terminate {instance_id}`."
        )
        return EXIT_OK
    remote.wait_ready(args.ssh_timeout, args.poll_interval)
    if not args.skip_gpu_check:
        check_gpus(remote)
    session = tmux_session(instance_id)
    deploy(remote, args.repo, args.remote_dir, command, args.remote_base_dir, env_text, session)
    state.update(instance_id, deployed_at=utc_now().isoformat())
    if not args.auto_terminate:
        say(
            f"The run continues without this laptop. Follow: python launch_lambda.py logs {instance_id} --follow\n"
            f"  Results: python launch_lambda.py fetch {instance_id}\n"
            f"  STOP BILLING when done: python launch_lambda.py terminate {instance_id}"
        )
        return EXIT_OK
    say("--auto-terminate: watching the run (Ctrl-C terminates the instance) ...")
    max_seconds = args.max_hours * 3600 if args.max_hours else None
    try:
        code = follow_run(
            remote,
            args.remote_dir,
            session,
            args.poll_interval,
            args.ssh_timeout,
            max_seconds,
            api,
            instance_id,
        )
    except LaunchError as e:
        if e.exit_code == EXIT_RUN_FAILED:  # still bring home whatever exists before terminating
            try:
                fetch_artifacts(
                    remote,
                    args.remote_dir,
                    args.remote_base_dir,
                    args.dest or default_dest(instance_id),
                )
            except (LaunchError, subprocess.TimeoutExpired) as fetch_error:
                say(f"  could not fetch artifacts: {fetch_error}")
        raise
    dest = fetch_artifacts(
        remote, args.remote_dir, args.remote_base_dir, args.dest or default_dest(instance_id)
    )
    hours = (time.monotonic() - launched) / 3600
    if code != 0:
        raise LaunchError(
            f"the remote command exited with code {code}; log and artifacts are in {dest}",
            EXIT_RUN_FAILED,
        )
    say(f"Run finished OK. Terminating {instance_id} ...")
    terminate_instance(api, state, instance_id)
    say(
        f"Terminated {instance_id} after {duration(hours)} (~{money(price * hours)}). Results in {dest}"
    )
    return EXIT_OK


def dry_run(api, args, command):
    say("DRY RUN: nothing will be launched, shipped or terminated.")
    price = None
    if api is None:
        say("  (no LAMBDA_API_KEY: not checking types, capacity or SSH keys)")
    else:
        try:
            item = lookup_type(api.instance_types(), args.instance_type)
            keys = [k["name"] for k in api.ssh_keys()]
        except ApiError as e:
            raise api_failure(e, "dry run")
        price = item["instance_type"]["price_cents_per_hour"]
        command = remote_command(args, price)
        regions = [r["name"] for r in item["regions_with_capacity_available"]]
        say(f"  type:      {args.instance_type}: {item['instance_type']['description']}")
        say(f"  capacity:  {', '.join(regions) or 'none right now'}")
        if args.ssh_key_name and args.ssh_key_name not in keys:
            raise LaunchError(
                f"--ssh-key-name {args.ssh_key_name!r} is not on your account; keys: {keys}",
                EXIT_CONFIG,
            )
        say(
            f"  ssh key:   {args.ssh_key_name or (keys[0] if len(keys) == 1 else 'ask among ' + ', '.join(keys))}"
        )
    say(
        f"  plan:      launch {args.instance_type} in region {args.region} named {args.name}"
        + (f" (wait up to {args.wait_capacity} min for capacity)" if args.wait_capacity else "")
    )
    if args.no_deploy:
        say(
            "  then:      nothing (--no-deploy): print the SSH command and leave the instance running"
        )
    else:
        say(
            f"  then:      ship {args.repo} (git archive) to {shown(args.remote_dir)}, write .env (600), "
            f"run in tmux: {command}"
        )
        say(f"  NANOCHAT_BASE_DIR on the instance: {args.remote_base_dir}")
        say(
            "  finally:   "
            + (
                "watch, fetch artifacts, terminate (--auto-terminate)"
                if args.auto_terminate
                else "leave it running: you terminate it yourself"
            )
        )
    if price is not None:
        hours = [args.max_hours] if args.max_hours else [1, 4, 8]
        say(
            f"  cost:      {money(price)}/hour; "
            + ", ".join(f"{h:g} h = {money(price * h)}" for h in hours)
        )
    return EXIT_OK


def default_dest(instance_id):
    return Path("lambda-results") / instance_id


# -----------------------------------------------------------------------------
# The other subcommands


def cmd_types(args, settings):
    api = LambdaAPI(args.api_base, require_api_key(settings))
    try:
        types = api.instance_types()
    except ApiError as e:
        raise api_failure(e, "listing instance types")
    rows = sorted(types.values(), key=lambda it: it["instance_type"]["price_cents_per_hour"])
    say(f"{'instance type':28} {'gpus':>4}  {'gpu':28} {'$/hour':>8}  regions with capacity now")
    for it in rows:
        t = it["instance_type"]
        if t["specs"]["gpus"] <= 0:
            continue
        regions = ", ".join(r["name"] for r in it["regions_with_capacity_available"]) or "-"
        say(
            f"{t['name']:28} {t['specs']['gpus']:>4}  {t['gpu_description'][:28]:28} "
            f"{t['price_cents_per_hour'] / 100:>8.2f}  {regions}"
        )
    return EXIT_OK


def cmd_status(args, settings):
    state = State()
    api = LambdaAPI(args.api_base, require_api_key(settings))
    mine = state.load()
    try:
        live = [api.instance(args.id)] if args.id else api.instances()
    except ApiError as e:
        raise api_failure(e, "status")
    if not live:
        say("No running instances on the account.")
    for inst in live:
        rec = mine.get(inst["id"], {})
        price = inst["instance_type"]["price_cents_per_hour"]
        line = (
            f"{inst['id']}  {inst.get('name', '')}  {inst['instance_type']['name']}  {inst['region']['name']}  "
            f"{inst['status']}  ip={inst.get('ip', '-')}  {money(price)}/h"
        )
        if rec.get("launched_at") and inst["status"] not in ("terminated",):
            hours = (utc_now() - datetime.fromisoformat(rec["launched_at"])).total_seconds() / 3600
            line += f"  up {duration(hours)} ~{money(price * hours)}"
        say(line + ("" if rec else "  (not launched from here)"))
        if args.id and rec.get("deployed_at") and inst.get("ip") and inst["status"] == "active":
            remote = remote_for(args, state, inst["id"], rec, inst["ip"])
            try:
                code, alive, _ = poll_run(
                    remote, rec.get("remote_dir", DEFAULT_REMOTE_DIR), rec["tmux_session"], 10**12
                )
                say(
                    f"  run: {'finished, exit code ' + str(code) if code is not None else 'running' if alive else 'not running'}"
                )
            except (LaunchError, subprocess.TimeoutExpired) as e:
                say(f"  run: unknown (ssh failed: {e})")
    live_ids = {i["id"] for i in live}
    if not args.id:
        for iid, rec in mine.items():
            if iid not in live_ids and rec.get("status") != "terminated":
                say(
                    f"{iid}  {rec.get('name', '')}  recorded here as {rec.get('status')} but not running on the account"
                )
                state.update(iid, status="terminated")
    return EXIT_OK


def remote_for(args, state, instance_id, rec=None, ip=None, settings=None):
    """SSH settings: flags, else what the launch recorded, else defaults; the IP from the state or the API."""
    rec = rec if rec is not None else (state.get(instance_id) or {})
    ip = ip or rec.get("ip")
    if not ip or rec.get("status") == "terminated":
        api = LambdaAPI(args.api_base, require_api_key(settings or {}))
        try:
            inst = api.instance(instance_id)
        except ApiError as e:
            raise api_failure(e, f"looking up {instance_id}")
        if inst["status"] != "active" or not inst.get("ip"):
            raise LaunchError(
                f"instance {instance_id} is {inst['status']}, not reachable", EXIT_NOT_READY
            )
        ip = inst["ip"]
    return Remote(
        ip,
        args.ssh_user or rec.get("ssh_user") or "ubuntu",
        args.ssh_port or rec.get("ssh_port") or 22,
        args.ssh_key_file or rec.get("ssh_key_file"),
        state.known_hosts,
    )


def remote_dirs(args, rec):
    return (
        args.remote_dir or rec.get("remote_dir") or DEFAULT_REMOTE_DIR,
        args.remote_base_dir or rec.get("remote_base_dir") or DEFAULT_REMOTE_BASE_DIR,
    )


def cmd_logs(args, settings):
    state = State()
    rec = state.get(args.id) or {}
    remote = remote_for(args, state, args.id, rec, settings=settings)
    remote_dir, _ = remote_dirs(args, rec)
    session = rec.get("tmux_session") or tmux_session(args.id)
    if args.follow:
        code = follow_run(remote, remote_dir, session, args.poll_interval, 120)
        say(f"[launch_lambda] the run finished with exit code {code}")
        return EXIT_OK if code == 0 else EXIT_RUN_FAILED
    proc = remote.run(
        f"tail -n {int(args.lines)} {shlex.quote(home_relative(remote_dir))}/.launcher/run.log",
        check=False,
    )
    if proc.returncode != 0:
        raise LaunchError(
            f"could not read the log on {remote.target}: {proc.stderr.decode(errors='replace').strip()}",
            EXIT_DEPLOY,
        )
    sys.stdout.write(proc.stdout.decode(errors="replace"))
    return EXIT_OK


def cmd_fetch(args, settings):
    state = State()
    rec = state.get(args.id) or {}
    remote = remote_for(args, state, args.id, rec, settings=settings)
    remote_dir, base_dir = remote_dirs(args, rec)
    dest = fetch_artifacts(remote, remote_dir, base_dir, args.dest or default_dest(args.id))
    say(f"Fetched into {dest}. The instance is still running: terminate it when done.")
    return EXIT_OK


def cmd_terminate(args, settings):
    api = LambdaAPI(args.api_base, require_api_key(settings))
    if not args.yes:
        if not sys.stdin.isatty():
            raise LaunchError(
                "terminate destroys the instance and its local disk: pass --yes to confirm",
                EXIT_USAGE,
            )
        if input(f"Terminate {args.id}? Its local disk is lost. [y/N] ").strip().lower() not in (
            "y",
            "yes",
        ):
            say("Not terminated.")
            return EXIT_OK
    try:
        terminate_instance(api, State(), args.id)
    except ApiError as e:
        raise api_failure(e, f"terminating {args.id}")
    say(f"Terminated {args.id}.")
    return EXIT_OK


def cmd_ssh(args, settings):
    state = State()
    rec = state.get(args.id) or {}
    remote = remote_for(args, state, args.id, rec, settings=settings)
    extra = args.remote_args
    if not extra:
        print(
            f"(the run lives in tmux: `tmux attach -t {rec.get('tmux_session') or tmux_session(args.id)}`)",
            file=sys.stderr,
        )
    argv = remote.ssh_argv(batch=False) + ([shlex.join(extra)] if extra else [])
    sys.stdout.flush()
    os.execvp("ssh", argv)


# -----------------------------------------------------------------------------
# Command line


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api-base",
        default=os.environ.get("LAMBDA_API_BASE", DEFAULT_API_BASE),
        help="API base URL (env LAMBDA_API_BASE; default %(default)s)",
    )
    common.add_argument(
        "--env-file",
        default=None,
        help="read keys from this file (default: ./.env, else the repo's .env)",
    )
    sshp = argparse.ArgumentParser(add_help=False)
    sshp.add_argument(
        "--ssh-user", default=None, help="remote user (default: recorded at launch, else ubuntu)"
    )
    sshp.add_argument(
        "--ssh-port", type=int, default=None, help="remote sshd port (default: recorded, else 22)"
    )
    sshp.add_argument(
        "--ssh-key-file",
        default=None,
        help="private key for ssh -i (default: recorded / your ssh defaults)",
    )
    sshp.add_argument(
        "--remote-dir",
        default=None,
        help=f"remote checkout dir (default: recorded, else ~/{DEFAULT_REMOTE_DIR})",
    )
    sshp.add_argument(
        "--remote-base-dir",
        default=None,
        help="remote NANOCHAT_BASE_DIR (default: recorded, else ~/.cache/nanochat)",
    )

    parser = argparse.ArgumentParser(
        description="Launch the nanochat-aquarat pipeline on a Lambda Cloud GPU node (and clean up after it).",
        epilog=EXIT_CODES_HELP + "\nWith no subcommand, the arguments mean `launch`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)

    sub.add_parser(
        "types",
        parents=[common],
        help="instance types with GPUs, $/hour and regions with capacity now",
    )

    p = sub.add_parser(
        "launch",
        parents=[common],
        help="launch an instance, deploy, run (default subcommand)",
        epilog=EXIT_CODES_HELP + "\nArguments after `--` are appended to the default command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--instance-type", required=True, help="e.g. gpu_8x_h100_sxm5 (see `types`)")
    p.add_argument(
        "--region",
        default="auto",
        help="region name, or 'auto' for any region with capacity (default)",
    )
    p.add_argument("--name", default=None, help="instance name (default nanochat-aquarat-<random>)")
    p.add_argument(
        "--ssh-key-name", default=None, help="Lambda SSH key name (default: the only key, else ask)"
    )
    p.add_argument("--ssh-key-file", default=None, help="matching private key file for ssh -i")
    p.add_argument("--ssh-user", default="ubuntu", help="remote user (default %(default)s)")
    p.add_argument(
        "--ssh-port", type=int, default=22, help="remote sshd port (default %(default)s)"
    )
    p.add_argument(
        "--ssh-timeout",
        type=float,
        default=600,
        help="seconds to wait for sshd once active (default %(default)s)",
    )
    p.add_argument(
        "--active-timeout",
        type=float,
        default=1200,
        help="seconds to wait for status active (default %(default)s)",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=10,
        help="seconds between status/log polls (default %(default)s)",
    )
    p.add_argument(
        "--wait-capacity",
        type=float,
        default=0,
        metavar="MINUTES",
        help="keep polling for capacity this long instead of failing (default 0)",
    )
    p.add_argument(
        "--command",
        default=None,
        help=f"remote command (default: {DEFAULT_COMMAND} + args after --)",
    )
    p.add_argument("--no-deploy", action="store_true", help="only launch and print the SSH command")
    p.add_argument(
        "--skip-gpu-check",
        action="store_true",
        help="deploy even if `nvidia-smi -L` on the instance lists no GPU",
    )
    p.add_argument(
        "--auto-terminate", action="store_true", help="watch the run, fetch results, then terminate"
    )
    p.add_argument(
        "--max-hours",
        type=float,
        default=None,
        help="with --auto-terminate: stop, fetch and terminate after this many hours",
    )
    p.add_argument(
        "--keep-on-failure",
        action="store_true",
        help="do not terminate when something fails (still billed!)",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="print the plan and cost estimate; launch nothing"
    )
    p.add_argument(
        "--dest",
        default=None,
        help="where --auto-terminate puts results (default lambda-results/<id>)",
    )
    p.add_argument(
        "--repo", default=str(REPO_ROOT), help="git checkout to ship (default: this script's repo)"
    )
    p.add_argument(
        "--remote-dir",
        default=DEFAULT_REMOTE_DIR,
        help="remote checkout dir, relative to home (default %(default)s)",
    )
    p.add_argument(
        "--remote-base-dir",
        default=DEFAULT_REMOTE_BASE_DIR,
        help="remote NANOCHAT_BASE_DIR (default %(default)s)",
    )
    p.add_argument(
        "--forward-env",
        action="append",
        default=[],
        metavar="KEY",
        help=f"also forward this variable to the remote .env (always: {', '.join(FORWARDED_ENV)})",
    )

    p = sub.add_parser(
        "status", parents=[common, sshp], help="running instances, cost so far, run state"
    )
    p.add_argument("id", nargs="?")
    p = sub.add_parser("logs", parents=[common, sshp], help="show the run log")
    p.add_argument("id")
    p.add_argument("--follow", action="store_true", help="stream until the run finishes")
    p.add_argument(
        "--lines",
        type=int,
        default=100,
        help="lines to show without --follow (default %(default)s)",
    )
    p.add_argument(
        "--poll-interval", type=float, default=5, help="seconds between polls with --follow"
    )
    p = sub.add_parser(
        "fetch",
        parents=[common, sshp],
        help="download report, metrics, tokenizer, final checkpoints, log",
    )
    p.add_argument("id")
    p.add_argument("--dest", default=None, help="local directory (default lambda-results/<id>)")
    p = sub.add_parser("terminate", parents=[common], help="terminate an instance (stops billing)")
    p.add_argument("id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = sub.add_parser(
        "ssh", parents=[common, sshp], help="open a shell (or run a command after --)"
    )
    p.add_argument("id")
    return parser


def parse_args(argv):
    # Everything after `--` belongs to the remote side (pipeline flags for launch, a command for ssh).
    remote_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, remote_args = argv[:i], argv[i + 1 :]
    if not argv:
        argv = ["--help"]
    if argv[0] not in SUBCOMMANDS + ("-h", "--help"):
        argv = [
            "launch"
        ] + argv  # the seed's form: `launch_lambda.py --instance-type ... --region ...`
    args = build_parser().parse_args(argv)
    args.run_args = remote_args if args.cmd == "launch" else []
    args.remote_args = remote_args if args.cmd == "ssh" else []
    if args.cmd == "launch":
        if args.command is not None and remote_args:
            raise LaunchError(
                "arguments after -- only extend the default command; put them in --command instead",
                EXIT_USAGE,
            )
        for name in ("ssh_timeout", "active_timeout", "poll_interval"):
            if getattr(args, name) <= 0:
                raise LaunchError(f"--{name.replace('_', '-')} must be > 0", EXIT_USAGE)
        args.repo = Path(args.repo).resolve()
        if (
            args.ssh_key_file
        ):  # recorded in the state file, so later `logs`/`fetch` work from any directory
            args.ssh_key_file = str(Path(args.ssh_key_file).expanduser().resolve())
    return args


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    # SIGTERM/SIGHUP (terminal closed) get the same money-safe cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _raise_interrupt)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        settings = load_settings(args.env_file)
        handler = {
            "types": cmd_types,
            "launch": cmd_launch,
            "status": cmd_status,
            "logs": cmd_logs,
            "fetch": cmd_fetch,
            "terminate": cmd_terminate,
            "ssh": cmd_ssh,
        }[args.cmd]
        return handler(args, settings)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except ApiError as e:  # safety net; commands normally translate these themselves
        print(f"error: Lambda API: {e}", file=sys.stderr, flush=True)
        return EXIT_API
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
