"""The subcommands other than `launch`: types, status, logs, fetch, terminate, ssh. Those that
reach a node take their SSH settings from the flags, else from what the launch recorded."""

import os
import shlex
import subprocess
import sys

from nanochat.launcher.api import ApiError, LambdaAPI, api_failure
from nanochat.launcher.cost import duration, money
from nanochat.launcher.deploy import (
    DEFAULT_REMOTE_BASE_DIR,
    DEFAULT_REMOTE_DIR,
    follow_run,
    poll_run,
    tmux_session,
)
from nanochat.launcher.errors import (
    EXIT_DEPLOY,
    EXIT_NOT_READY,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    LaunchError,
)
from nanochat.launcher.fetch import default_dest, fetch_artifacts
from nanochat.launcher.launch import terminate_instance
from nanochat.launcher.settings import require_api_key
from nanochat.launcher.ssh import Remote, home_relative
from nanochat.launcher.state import State, hours_since


def cmd_types(args, settings):
    api = LambdaAPI(args.api_base, require_api_key(settings))
    try:
        types = api.instance_types()
    except ApiError as e:
        raise api_failure(e, "listing instance types") from e
    rows = sorted(types.values(), key=lambda it: it["instance_type"]["price_cents_per_hour"])
    print(f"{'instance type':28} {'gpus':>4}  {'gpu':28} {'$/hour':>8}  regions with capacity now")
    for row in rows:
        t = row["instance_type"]
        if t["specs"]["gpus"] <= 0:
            continue
        regions = ", ".join(r["name"] for r in row["regions_with_capacity_available"]) or "-"
        print(
            f"{t['name']:28} {t['specs']['gpus']:>4}  {t['gpu_description'][:28]:28} "
            f"{t['price_cents_per_hour'] / 100:>8.2f}  {regions}"
        )
    return EXIT_OK


def cmd_status(args, settings):
    state = State()
    api = LambdaAPI(args.api_base, require_api_key(settings))
    recorded = state.load()
    try:
        live = [api.instance(args.id)] if args.id else api.instances()
    except ApiError as e:
        raise api_failure(e, "status") from e
    if not live:
        print("No running instances on the account.")
    for inst in live:
        rec = recorded.get(inst["id"], {})
        print(status_line(inst, rec))
        if args.id and rec.get("deployed_at") and inst.get("ip") and inst["status"] == "active":
            print(run_state_line(args, state, inst, rec))
    if not args.id:
        forget_vanished(state, recorded, {i["id"] for i in live})
    return EXIT_OK


def status_line(inst, rec):
    price = inst["instance_type"]["price_cents_per_hour"]
    line = (
        f"{inst['id']}  {inst.get('name', '')}  {inst['instance_type']['name']}  "
        f"{inst['region']['name']}  {inst['status']}  ip={inst.get('ip', '-')}  {money(price)}/h"
    )
    if rec.get("nodes"):
        line += f"  node {rec['node_rank']} of {len(rec['nodes'])}"
    if rec.get("launched_at") and inst["status"] != "terminated":
        hours = hours_since(rec["launched_at"])
        line += f"  up {duration(hours)} ~{money(price * hours)}"
    return line + ("" if rec else "  (not launched from here)")


def run_state_line(args, state, inst, rec):
    remote = remote_for(args, state, inst["id"], rec, inst["ip"])
    remote_dir = rec.get("remote_dir", DEFAULT_REMOTE_DIR)
    try:
        # An offset past any log: only the exit code and the tmux state come back.
        code, alive, _ = poll_run(remote, remote_dir, rec["tmux_session"], 10**12)
    except (LaunchError, subprocess.TimeoutExpired) as e:
        return f"  run: unknown (ssh failed: {e})"
    if code is not None:
        return f"  run: finished, exit code {code}"
    return "  run: running" if alive else "  run: not running"


def forget_vanished(state, recorded, live_ids):
    """Instances recorded here that the account no longer lists were terminated elsewhere."""
    for iid, rec in recorded.items():
        if iid not in live_ids and rec.get("status") != "terminated":
            print(
                f"{iid}  {rec.get('name', '')}  recorded here as {rec.get('status')} "
                "but not running on the account"
            )
            state.update(iid, status="terminated")


def remote_for(args, state, instance_id, rec, ip=None, settings=None):
    """The node's SSH settings: flags, else what the launch recorded, else defaults; the IP from
    the state, else from the API."""
    ip = ip or rec.get("ip")
    if not ip or rec.get("status") == "terminated":
        api = LambdaAPI(args.api_base, require_api_key(settings or {}))
        try:
            inst = api.instance(instance_id)
        except ApiError as e:
            raise api_failure(e, f"looking up {instance_id}") from e
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


def recorded_remote(args, settings):
    """(what the launch recorded for args.id, a Remote for it)."""
    state = State()
    rec = state.get(args.id) or {}
    return rec, remote_for(args, state, args.id, rec, settings=settings)


def remote_dirs(args, rec):
    return (
        args.remote_dir or rec.get("remote_dir") or DEFAULT_REMOTE_DIR,
        args.remote_base_dir or rec.get("remote_base_dir") or DEFAULT_REMOTE_BASE_DIR,
    )


def cmd_logs(args, settings):
    rec, remote = recorded_remote(args, settings)
    remote_dir, _ = remote_dirs(args, rec)
    session = rec.get("tmux_session") or tmux_session(args.id)
    if args.follow:
        code = follow_run(remote, remote_dir, session, args.poll_interval, 120)
        print(f"[launch_lambda] the run finished with exit code {code}")
        return EXIT_OK if code == 0 else EXIT_RUN_FAILED
    log = f"{shlex.quote(home_relative(remote_dir))}/.launcher/run.log"
    proc = remote.run(f"tail -n {int(args.lines)} {log}", check=False)
    if proc.returncode != 0:
        raise LaunchError(
            f"could not read the log on {remote.target}: "
            f"{proc.stderr.decode(errors='replace').strip()}",
            EXIT_DEPLOY,
        )
    sys.stdout.write(proc.stdout.decode(errors="replace"))
    return EXIT_OK


def cmd_fetch(args, settings):
    rec, remote = recorded_remote(args, settings)
    remote_dir, base_dir = remote_dirs(args, rec)
    dest = fetch_artifacts(remote, remote_dir, base_dir, args.dest or default_dest(args.id))
    print(f"Fetched into {dest}. The instance is still running: terminate it when done.")
    return EXIT_OK


def cmd_terminate(args, settings):
    api = LambdaAPI(args.api_base, require_api_key(settings))
    if not args.yes:
        if not sys.stdin.isatty():
            raise LaunchError(
                "terminate destroys the instance and its local disk: pass --yes to confirm",
                EXIT_USAGE,
            )
        answer = input(f"Terminate {args.id}? Its local disk is lost. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("Not terminated.")
            return EXIT_OK
    try:
        terminate_instance(api, State(), args.id)
    except ApiError as e:
        raise api_failure(e, f"terminating {args.id}") from e
    print(f"Terminated {args.id}.")
    return EXIT_OK


def cmd_ssh(args, settings):
    rec, remote = recorded_remote(args, settings)
    if not args.remote_args:
        session = rec.get("tmux_session") or tmux_session(args.id)
        print(f"(the run lives in tmux: `tmux attach -t {session}`)", file=sys.stderr)
    argv = remote.ssh_argv(batch=False)
    if args.remote_args:
        argv.append(shlex.join(args.remote_args))
    sys.stdout.flush()
    os.execvp("ssh", argv)
