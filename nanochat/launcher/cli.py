"""The command line: `uv run launch_lambda.py SUBCOMMAND ...` (with no subcommand, `launch`)."""

import argparse
import os
import signal
import sys
from pathlib import Path

from nanochat.launcher.api import DEFAULT_API_BASE, ApiError
from nanochat.launcher.commands import (
    cmd_fetch,
    cmd_logs,
    cmd_ssh,
    cmd_status,
    cmd_terminate,
    cmd_types,
)
from nanochat.launcher.deploy import DEFAULT_REMOTE_BASE_DIR, DEFAULT_REMOTE_DIR
from nanochat.launcher.errors import (
    EXIT_API,
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    LaunchError,
)
from nanochat.launcher.launch import (
    DEFAULT_COMMAND,
    check_nodes_flags,
    check_watch_flags,
    cmd_launch,
    cmd_resume,
)
from nanochat.launcher.nodes import DEFAULT_MASTER_PORT, cmd_deploy
from nanochat.launcher.settings import FORWARDED_ENV, REPO_ROOT, load_settings

COMMANDS = {
    "types": cmd_types,
    "launch": cmd_launch,
    "resume": cmd_resume,
    "deploy": cmd_deploy,
    "status": cmd_status,
    "logs": cmd_logs,
    "fetch": cmd_fetch,
    "terminate": cmd_terminate,
    "ssh": cmd_ssh,
}


def main(argv=None):
    # Progress lines must reach a pipe or a log file as they happen, not when a buffer fills.
    sys.stdout.reconfigure(line_buffering=True)
    # SIGTERM/SIGHUP (terminal closed) get the same money-safe cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, raise_interrupt)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, raise_interrupt)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        settings = load_settings(args.env_file)
        return COMMANDS[args.cmd](args, settings)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except ApiError as e:  # safety net; commands normally translate these themselves
        print(f"error: Lambda API: {e}", file=sys.stderr, flush=True)
        return EXIT_API
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv):
    # Everything after `--` belongs to the remote side (pipeline flags for launch, a command for
    # ssh), so argparse never sees it.
    remote_args = []
    if "--" in argv:
        i = argv.index("--")
        argv, remote_args = argv[:i], argv[i + 1 :]
    if not argv:
        argv = ["--help"]
    if argv[0] not in (*COMMANDS, "-h", "--help"):
        # the seed's form: `launch_lambda.py --instance-type ... --region ...`
        argv = ["launch", *argv]
    args = build_parser().parse_args(argv)
    args.run_args = remote_args if args.cmd in ("launch", "deploy") else []
    args.remote_args = remote_args if args.cmd == "ssh" else []
    if args.cmd == "launch":
        check_launch_args(args, remote_args)
    if args.cmd == "deploy":
        args.repo = Path(args.repo).resolve()
    return args


def check_launch_args(args, remote_args):
    if args.command is not None and remote_args:
        raise LaunchError(
            "arguments after -- only extend the default command; put them in --command instead",
            EXIT_USAGE,
        )
    check_watch_flags(args)
    check_nodes_flags(args)
    for name in ("ssh_timeout", "active_timeout", "poll_interval"):
        if getattr(args, name) <= 0:
            raise LaunchError(f"--{name.replace('_', '-')} must be > 0", EXIT_USAGE)
    args.repo = Path(args.repo).resolve()
    if args.ssh_key_file:
        # absolute, because it is recorded in the state file for later `logs`/`fetch` calls
        # that may run from any directory
        args.ssh_key_file = str(Path(args.ssh_key_file).expanduser().resolve())


def build_parser():
    common = common_parent()
    node = node_parent()
    parser = argparse.ArgumentParser(
        description="Launch the nanochat-aquarat pipeline on a Lambda Cloud GPU node "
        "(and clean up after it).",
        epilog=EXIT_CODES_HELP + "\nWith no subcommand, the arguments mean `launch`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser(
        "types",
        parents=[common],
        help="instance types with GPUs, $/hour and regions with capacity now",
    )
    add_launch_parser(sub, common)
    p = sub.add_parser(
        "status", parents=[common, node], help="running instances, cost so far, run state"
    )
    p.add_argument("id", nargs="?")
    p = sub.add_parser("logs", parents=[common, node], help="show the run log")
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
        parents=[common, node],
        help="download report, metrics, tokenizer, final checkpoints, log",
    )
    p.add_argument("id")
    p.add_argument("--dest", default=None, help="local directory (default lambda-results/<id>)")
    add_resume_parser(sub, common)
    add_deploy_parser(sub, common)
    p = sub.add_parser("terminate", parents=[common], help="terminate an instance (stops billing)")
    p.add_argument("id")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p = sub.add_parser(
        "ssh", parents=[common, node], help="open a shell (or run a command after --)"
    )
    p.add_argument("id")
    return parser


def common_parent():
    """Flags every subcommand takes."""
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
    return common


def node_parent():
    """SSH flags of the subcommands that reach a launched node; None means "as recorded"."""
    node = argparse.ArgumentParser(add_help=False)
    node.add_argument(
        "--ssh-user", default=None, help="remote user (default: recorded at launch, else ubuntu)"
    )
    node.add_argument(
        "--ssh-port", type=int, default=None, help="remote sshd port (default: recorded, else 22)"
    )
    node.add_argument(
        "--ssh-key-file",
        default=None,
        help="private key for ssh -i (default: recorded / your ssh defaults)",
    )
    node.add_argument(
        "--remote-dir",
        default=None,
        help=f"remote checkout dir (default: recorded, else ~/{DEFAULT_REMOTE_DIR})",
    )
    node.add_argument(
        "--remote-base-dir",
        default=None,
        help="remote NANOCHAT_BASE_DIR (default: recorded, else ~/.cache/nanochat)",
    )
    return node


def add_resume_budget_flags(p, default):
    """--auto-resume and --max-cost; `resume` defaults them (None) to what the launch recorded."""
    p.add_argument(
        "--auto-resume",
        action=argparse.BooleanOptionalAction if default is None else "store_true",
        default=default,
        help="with --auto-terminate, --filesystem and --max-cost: when the watcher finds the "
        "instance lost (unreachable, unhealthy, terminated), terminate it and launch a "
        "replacement that resumes the run (default off)",
    )
    p.add_argument(
        "--max-cost",
        type=float,
        default=None,
        metavar="USD",
        help="with --auto-terminate: stop (fetch, terminate) once the instances of this launch, "
        "replacements included, have cost this many dollars",
    )


def add_resume_parser(sub, common):
    p = sub.add_parser(
        "resume",
        parents=[common],
        help="go on with a run on a new instance (its filesystem keeps what was done)",
        description="Launch a fresh instance for a run launched with --filesystem whose instance "
        "is gone: same type, filesystem and command. Done stages are skipped, the interrupted one "
        "resumes from its last complete checkpoint. Refused while the old instance still runs.",
    )
    p.add_argument("target", metavar="RUN|INSTANCE_ID", help="the run name, or its instance id")
    p.add_argument(
        "--auto-terminate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="watch, fetch and terminate (default: as launched)",
    )
    p.add_argument("--max-hours", type=float, default=None, help="default: as launched")
    p.add_argument(
        "--keep-on-failure",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="default: as launched",
    )
    add_resume_budget_flags(p, default=None)
    p.add_argument("--dest", default=None, help="where results go (default lambda-results/<id>)")


def add_deploy_parser(sub, common):
    p = sub.add_parser(
        "deploy",
        parents=[common],
        help="start the run on machines you already have (one or several nodes)",
        description="Ship this checkout to each host, write its .env, and start the orchestrator "
        "in tmux with its --node-rank, node 0 first. Arguments after -- go to the orchestrator.",
    )
    p.add_argument("--hosts", required=True, help="H1,H2,...: node 0 first")
    p.add_argument("--ssh-user", default="ubuntu", help="remote user (default %(default)s)")
    p.add_argument("--ssh-port", type=int, default=22, help="sshd port (default %(default)s)")
    p.add_argument("--ssh-key-file", default=None, help="private key file for ssh -i")
    p.add_argument("--ssh-timeout", type=float, default=60, help="seconds to wait for each sshd")
    p.add_argument(
        "--master-addr",
        default=None,
        help="node 0's address as the other nodes reach it (default: the first host)",
    )
    p.add_argument(
        "--master-port", type=int, default=DEFAULT_MASTER_PORT, help="default %(default)s"
    )
    p.add_argument(
        "--remote-dir",
        default=DEFAULT_REMOTE_DIR,
        help="checkout dir on each node, relative to home (default %(default)s)",
    )
    p.add_argument(
        "--remote-base-dir",
        default=None,
        help="NANOCHAT_BASE_DIR on the nodes: required for several hosts, on storage they share",
    )
    p.add_argument("--repo", default=str(REPO_ROOT), help="git checkout to ship")
    p.add_argument(
        "--forward-env", action="append", default=[], metavar="KEY", help="as for launch"
    )
    p.set_defaults(command=None)  # deploy always runs the orchestrator (launch's --command)


def add_launch_parser(sub, common):
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
        help="with --auto-terminate (required): fetch and terminate this many hours after the "
        "launch, whatever the run is doing",
    )
    p.add_argument(
        "--keep-on-failure",
        action="store_true",
        help="do not terminate when something fails (still billed!)",
    )
    p.add_argument(
        "--filesystem",
        default=None,
        metavar="NAME",
        help="keep the run (data, checkpoints, report) on this Lambda persistent filesystem, "
        "created in the region if it does not exist: the run then survives its instance "
        "(`resume`). See docs/nodes.md",
    )
    p.add_argument(
        "--nodes",
        type=int,
        default=1,
        metavar="N",
        help="launch N instances of the type in one region, all with --filesystem, and run the "
        "pipeline across them (node 0 first); without InfiniBand they talk over ethernet: the "
        "launcher prints the expected cost of that first. See docs/nodes.md (default 1)",
    )
    add_resume_budget_flags(p, default=False)
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
