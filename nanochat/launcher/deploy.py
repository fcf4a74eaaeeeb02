"""Put the run on the node and watch it.

Remote layout: <remote_dir>/ holds the shipped tree, .env (mode 600) and
.launcher/{run.sh, run.log, exit_code}; the pipeline runs in a detached tmux session, so it goes on
when the laptop disconnects.
"""

import shlex
import subprocess
import sys
import time
from pathlib import Path

from nanochat.driver_check import driver_problem
from nanochat.launcher.api import ApiError
from nanochat.launcher.errors import (
    EXIT_CONFIG,
    EXIT_DEPLOY,
    EXIT_NOT_READY,
    EXIT_RUN_FAILED,
    InstanceLost,
    LaunchError,
)
from nanochat.launcher.ssh import home_relative, shown

DEFAULT_REMOTE_DIR = "nanochat-aquarat"  # relative paths are relative to the remote home
DEFAULT_REMOTE_BASE_DIR = "~/.cache/nanochat"  # the remote NANOCHAT_BASE_DIR
GONE = ("terminated", "terminating", "preempted")  # instance states with no run left on them
# what the watcher treats as a lost instance: an unhealthy one may come back, but its run is
# stuck meanwhile, and a replacement can go on from the filesystem
LOST = (*GONE, "unhealthy")


def tmux_session(instance_id):
    return f"aquarat-{instance_id[:8]}"


def check_gpus(remote, repo):
    """Before anything is shipped, the node must list its GPUs, with a driver new enough for the
    torch that repo's uv.lock installs. A driver problem found now costs a minute of billing, not a
    pipeline that stops (or crawls on the CPU) after minutes of set-up."""
    proc = remote.run("nvidia-smi -L", check=False, timeout=60)
    out = (proc.stdout or b"").decode(errors="replace")
    gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
    if proc.returncode != 0 or not gpus:
        detail = (out + (proc.stderr or b"").decode(errors="replace")).strip()[-300:]
        raise LaunchError(
            f"the instance lists no GPU (`nvidia-smi -L` exit {proc.returncode}: "
            f"{detail or 'no output'}); nothing was started. "
            "A custom --command that needs no GPU: --skip-gpu-check",
            EXIT_DEPLOY,
        )
    model = gpus[0].split(":", 1)[1].split("(UUID")[0].strip()
    query = remote.run(
        "nvidia-smi --query-gpu=driver_version --format=csv,noheader", check=False, timeout=60
    )
    driver = ((query.stdout or b"").decode(errors="replace").strip().splitlines() or ["?"])[0]
    print(f"GPUs on the instance: {len(gpus)} x {model}, driver {driver}")
    problem = driver_problem(driver, Path(repo) / "uv.lock")
    if problem:
        raise LaunchError(
            f"{problem} Nothing was started on the instance. (A custom --command that brings "
            "its own torch: --skip-gpu-check.)",
            EXIT_DEPLOY,
        )


# -----------------------------------------------------------------------------
# What is shipped: the local git tree


def git(repo, *args):
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchError(
            f"git {' '.join(args)} in {repo} failed: {proc.stderr.strip()}", EXIT_CONFIG
        )
    return proc.stdout.strip()


def git_succeeds(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True).returncode == 0


def tree_to_ship(repo):
    """HEAD plus uncommitted changes to tracked files: (tree-ish, dirty?, untracked file count).
    `git stash create` makes that commit without touching any ref or file of the checkout."""
    git(repo, "rev-parse", "--verify", "HEAD")
    if git_succeeds(repo, "ls-files", "--error-unmatch", ".env"):
        raise LaunchError(
            f"{repo}/.env is tracked by git: it would be shipped. `git rm --cached .env` first.",
            EXIT_CONFIG,
        )
    identity = ["-c", "user.name=launch_lambda", "-c", "user.email=launcher@localhost"]
    stash = git(repo, *identity, "stash", "create")
    status = git(repo, "status", "--porcelain").splitlines()
    untracked = [line for line in status if line.startswith("??")]
    return stash or "HEAD", bool(stash), len(untracked)


# -----------------------------------------------------------------------------
# Deploy: three ssh round trips (code, secrets, start)


def deploy(remote, repo, remote_dir, command, remote_base_dir, env_text, session, exports=None):
    """exports: variables (no secrets) for the run script, e.g. NANOCHAT_INSTANCE_ID."""
    rdir = shlex.quote(home_relative(remote_dir))
    ship_tree(remote, repo, remote_dir, rdir)
    write_remote_env(remote, remote_dir, rdir, env_text)
    start_in_tmux(remote, rdir, run_script(command, remote_base_dir, exports), session)
    print(
        f"Started `{command}` in tmux session '{session}' "
        f"(log: {shown(remote_dir)}/.launcher/run.log)"
    )


def ship_tree(remote, repo, remote_dir, rdir):
    tree, dirty, n_untracked = tree_to_ship(repo)
    head = git(repo, "rev-parse", "--short", "HEAD")
    print(
        f"Shipping {head}{' + uncommitted changes' if dirty else ''} "
        f"to {remote.target}:{shown(remote_dir)} (git archive over ssh)"
    )
    if n_untracked:
        print(
            f"  note: {n_untracked} untracked file(s) are not shipped "
            "(git add them to include them)"
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


def write_remote_env(remote, remote_dir, rdir, env_text):
    # Secrets travel only on ssh's stdin, never in argv. The old file is removed first so that the
    # new one is created under umask 077: it is never readable by others, not even for a moment.
    names = ", ".join(line.split("=")[0] for line in env_text.splitlines())
    print(f"Writing {shown(remote_dir)}/.env (mode 600) with: {names or 'nothing to forward'}")
    remote.run(
        f"umask 077 && rm -f {rdir}/.env && cat > {rdir}/.env && chmod 600 {rdir}/.env",
        input_text=env_text,
    )


def start_in_tmux(remote, rdir, script, session):
    # One round trip: write the run script (it holds no secret) and start it detached.
    no_tmux = "{ echo 'tmux is not installed on the instance' >&2; exit 1; }"
    remote.run(
        f"cd {rdir} && cat > .launcher/run.sh && "
        f"{{ command -v tmux >/dev/null || {no_tmux}; }} && "
        f"tmux new-session -d -s {session} \"bash '$PWD/.launcher/run.sh'\"",
        input_text=script,
    )


def run_script(command, remote_base_dir, exports=None):
    """The script tmux runs. It holds no secret: those are sourced from .env at run time. The exit
    code is written last, through a rename, so a reader that sees it knows the log is complete."""
    base = home_relative(remote_base_dir)
    base_expr = shlex.quote(base) if base.startswith("/") else '"$HOME"/' + shlex.quote(base)
    quoted = shlex.quote(command)
    exported = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in (exports or {}).items())
    return f"""#!/usr/bin/env bash
# Written by launch_lambda.py. Runs the pipeline, appends its output to run.log,
# records the exit code.
cd "$(dirname "$0")/.." || exit 1
log=.launcher/run.log
rm -f .launcher/exit_code
if [ -f .env ]; then set -a; . ./.env; set +a; fi
export NANOCHAT_BASE_DIR={base_expr}
{exported}mkdir -p "$NANOCHAT_BASE_DIR"
echo "[launcher] $(date -u +%FT%TZ) starting in $PWD: "{quoted} | tee -a "$log"
(
{command}
) 2>&1 | tee -a "$log"
code=${{PIPESTATUS[0]}}
echo "[launcher] $(date -u +%FT%TZ) finished with exit code $code" | tee -a "$log"
echo "$code" > .launcher/exit_code.tmp && mv .launcher/exit_code.tmp .launcher/exit_code
"""


# -----------------------------------------------------------------------------
# Watching the run


def poll_run(remote, remote_dir, session, offset):
    """One look at the run: (exit code or None, tmux session alive, log bytes after offset)."""
    rdir = shlex.quote(home_relative(remote_dir))
    # Order matters. tmux is asked first: the script writes its exit code before its session
    # ends, so a session seen gone has left its code for the next read (asked last, a run ending
    # between the reads looked lost). The exit code is read before the log size: once the exit
    # code exists the log is complete, so a run seen as finished never loses its last lines.
    cmd = (
        f"cd {rdir} && if tmux has-session -t ={session} 2>/dev/null; then a=1; else a=0; fi; "
        "e=$(cat .launcher/exit_code 2>/dev/null || echo -); "
        "s=$(stat -c %s .launcher/run.log 2>/dev/null || echo 0); "
        'echo "$e $s $a"; '
        f'if [ "$s" -gt {offset} ]; then '
        f"tail -c +{offset + 1} .launcher/run.log | head -c $((s - {offset})); fi"
    )
    proc = remote.run(cmd, timeout=remote.connect_timeout + 60)
    head, _, chunk = proc.stdout.partition(b"\n")
    code, _, alive = head.decode().split()
    return (None if code == "-" else int(code)), alive == "1", chunk


def follow_run(
    remote,
    remote_dir,
    session,
    poll,
    ssh_timeout,
    max_seconds=None,
    api=None,
    instance_id=None,
    started=None,
    limit_name=None,
):
    """Streams the remote log until the run finishes and returns its exit code. SSH outages up to
    ssh_timeout are ridden out; with an api, an instance that is gone or unhealthy ends the wait
    at once (InstanceLost, as does an instance silent for longer than ssh_timeout). max_seconds
    counts from `started` (time.monotonic(); default: now); limit_name names that cap."""
    offset = 0
    started = time.monotonic() if started is None else started
    down_since = None
    seen_gone = False
    while True:
        try:
            code, alive, chunk = poll_run(remote, remote_dir, session, offset)
            down_since = None
        except (LaunchError, subprocess.TimeoutExpired) as e:
            down_since = down_since or time.monotonic()
            check_instance(api, instance_id)
            if time.monotonic() - down_since > ssh_timeout:
                raise InstanceLost(
                    f"instance {instance_id} stopped answering SSH for more than "
                    f"{ssh_timeout:.0f}s ({e})",
                    EXIT_NOT_READY,
                ) from e
            print(f"  ssh hiccup ({e}); retrying")
            time.sleep(poll)
            continue
        if chunk:
            sys.stdout.write(chunk.decode(errors="replace"))
            sys.stdout.flush()
            offset += len(chunk)
        if code is not None:
            return code
        if not alive:
            if seen_gone:
                check_instance(api, instance_id)  # a run that vanished with its machine
                raise LaunchError(
                    f"the run stopped without recording an exit code (tmux session '{session}' "
                    "is gone)",
                    EXIT_RUN_FAILED,
                )
            # Looked at once more before it is called failed: a dying machine may answer one last
            # poll after its processes are gone and before its API knows; the next look then
            # meets an SSH outage, where the API is asked until it says the instance is lost.
            seen_gone = True
        if max_seconds is not None and time.monotonic() - started > max_seconds:
            limit = limit_name or f"--max-hours ({max_seconds / 3600:g} h)"
            raise LaunchError(f"the run exceeded {limit}", EXIT_RUN_FAILED)
        time.sleep(poll)


def check_instance(api, instance_id):
    """Raises InstanceLost when the API reports the instance gone or unhealthy (or no longer
    knows it); without an api there is nothing to ask."""
    if api is None:
        return
    try:
        status = api.instance(instance_id)["status"]
    except ApiError as e:
        if e.code != "global/object-does-not-exist":
            return  # the API's own trouble says nothing about the instance: SSH decides
        status = "unknown to the API"
    if status in LOST or status == "unknown to the API":
        raise InstanceLost(f"instance {instance_id} is {status}: its run is gone", EXIT_RUN_FAILED)
