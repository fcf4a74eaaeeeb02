"""The `launch` and `resume` subcommands: check, launch, wait, deploy, and (with
--auto-terminate) watch, fetch and terminate; with --filesystem the run lives on a persistent
filesystem, and a lost instance is replaced by `resume` (or, with --auto-resume, by the watcher).

The money rule: once an instance exists, every failure (an error, a bug, Ctrl-C, SIGTERM/SIGHUP)
terminates it before the launcher exits, unless --keep-on-failure asks to keep it.
"""

import argparse
import secrets
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from nanochat.launcher import filesystem
from nanochat.launcher.api import ApiError, LambdaAPI, api_failure
from nanochat.launcher.cost import duration, money
from nanochat.launcher.deploy import (
    GONE,
    check_gpus,
    deploy,
    follow_run,
    git_succeeds,
    tmux_session,
    tree_to_ship,
)
from nanochat.launcher.errors import (
    EXIT_CONFIG,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_NO_CAPACITY,
    EXIT_NOT_READY,
    EXIT_OK,
    EXIT_RUN_FAILED,
    EXIT_USAGE,
    InstanceLost,
    LaunchError,
)
from nanochat.launcher.fetch import default_dest, fetch_artifacts
from nanochat.launcher.interconnect import ethernet_paragraph
from nanochat.launcher.settings import remote_env_text, require_api_key
from nanochat.launcher.ssh import Remote, check_key_usable, shown
from nanochat.launcher.state import State, timestamp

DEFAULT_COMMAND = "bash run_aquarat_small.sh"


def cmd_launch(args, settings):
    api, env_text = check_before_launching(args, settings)
    if args.dry_run:
        return dry_run(api, args)
    ssh_key, existing_ids = look_at_account(api, args)
    if args.filesystem:
        try:
            types = api.instance_types()
        except ApiError as e:
            raise api_failure(e, "listing instance types") from e
        lookup_type(types, args.instance_type)
        filesystem.prepare(api, args, types)
    return run_launch(api, State(), args, ssh_key, existing_ids, env_text)


def run_launch(api, state, args, ssh_key, existing_ids, env_text):
    if args.nodes > 1:
        # nodes.py builds on this module (and `deploy --hosts`), so it is imported here
        from nanochat.launcher.nodes import launch_nodes

        return launch_nodes(api, state, args, ssh_key, existing_ids, env_text)
    return launch_and_run(api, state, args, ssh_key, existing_ids, env_text)


class Budget:
    """--max-hours and --max-cost over every instance of one launcher (the first and the ones
    --auto-resume adds): what has been spent, and when the current instance must stop."""

    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()
        self.spent_cents = 0.0
        self.instances = 0

    def add(self, price_cents, launched):
        self.spent_cents += price_cents * (time.monotonic() - launched) / 3600
        self.instances += 1

    def limit(self, price_cents, launched):
        """(seconds after `launched` the instance may run, the cap that sets it) or (None, None)."""
        limits = []
        if self.args.max_hours:
            hours_left = self.started + self.args.max_hours * 3600 - launched
            limits.append((hours_left, f"--max-hours ({self.args.max_hours:g} h)"))
        if self.args.max_cost:
            cents_left = self.args.max_cost * 100 - self.spent_cents
            limits.append(
                (cents_left / price_cents * 3600, f"--max-cost (${self.args.max_cost:g})")
            )
        return min(limits) if limits else (None, None)

    def exhausted(self):
        """Why no replacement may be launched, or None."""
        args = self.args
        spent = money(self.spent_cents)
        if args.max_cost and self.spent_cents >= args.max_cost * 100:
            cap = f"--max-cost ${args.max_cost:g}"
            return f"{spent} spent on {self.instances} instance(s) reaches {cap}"
        if args.max_hours and time.monotonic() - self.started >= args.max_hours * 3600:
            return f"--max-hours ({args.max_hours:g} h) has passed ({spent} spent)"
        return None


def launch_and_run(api, state, args, ssh_key, existing_ids, env_text):
    """Launches, deploys and (with --auto-terminate) watches; with --auto-resume, an instance
    that is lost under the run is replaced by a new one on the same filesystem, within the
    budget."""
    budget = Budget(args)
    while True:
        instance_id, region, price = acquire_or_clean_up(api, state, args, ssh_key, existing_ids)
        launched = time.monotonic()
        command = remote_command(args, price)
        print(
            f"Launched {instance_id} ({args.instance_type}, {region}) at {money(price)}/hour. "
            "Billing has started."
        )
        args.ssh_key_name = ssh_key  # the one chosen, for a later `resume`
        # From here on, any failure terminates the instance (unless --keep-on-failure).
        try:
            record_launch(state, args, instance_id, region, price, command)
            return after_launch(
                api, state, args, instance_id, price, command, env_text, budget, launched
            )
        except (KeyboardInterrupt, Exception) as e:
            failure = failure_of(e)
        cleanup_after_failure(api, state, instance_id, args.keep_on_failure, failure)
        budget.add(price, launched)
        if not (isinstance(failure, InstanceLost) and args.filesystem):
            raise failure
        run = filesystem.run_name(command)
        resume = f"uv run launch_lambda.py resume {run}"
        if not args.auto_resume:
            print(
                f"[launch_lambda] {failure}; the run's files are safe on filesystem "
                f"{args.filesystem}: go on on a new instance with `{resume}`"
            )
            raise failure
        stop = budget.exhausted()
        if stop:
            print(f"[launch_lambda] {failure}; --auto-resume stops: {stop}. Later: `{resume}`")
            raise LaunchError(f"auto-resume stopped: {stop}", EXIT_RUN_FAILED) from failure
        print(
            f"[launch_lambda] {failure}; --auto-resume: launching a replacement on filesystem "
            f"{args.filesystem} ({money(budget.spent_cents)} spent so far)"
        )
        existing_ids.add(instance_id)
        args.command, args.resumed_from = command, instance_id
        args.name = f"nanochat-aquarat-{secrets.token_hex(3)}"


def failure_of(error):
    """The LaunchError that ends a launch after `error`, once instances exist. Any exception
    counts: a bug must not leave a billed instance behind either."""
    if isinstance(error, KeyboardInterrupt):
        return LaunchError("interrupted (Ctrl-C or signal)", EXIT_INTERRUPTED)
    if isinstance(error, LaunchError):
        return error
    if isinstance(error, ApiError):
        return api_failure(error, "API error after launch")
    return LaunchError(f"unexpected error: {type(error).__name__}: {error}", EXIT_ERROR)


def check_before_launching(args, settings):
    """Everything that can be checked locally, before any API call: (api or None, remote .env).
    A mistake found here costs nothing; found on the node, it costs a launch."""
    key = None if args.dry_run and not settings.get("LAMBDA_API_KEY") else require_api_key(settings)
    if not settings.get("WANDB_API_KEY"):
        print(
            "warning: WANDB_API_KEY is not set (environment or .env): the run will log to W&B "
            "offline on the instance; metrics are still mirrored under runs/ and fetched."
        )
    env_text = remote_env_text(settings, args.forward_env)
    if args.filesystem:
        filesystem.check_name(args.filesystem)
    if args.ssh_key_file and not Path(args.ssh_key_file).is_file():
        raise LaunchError(f"--ssh-key-file {args.ssh_key_file} does not exist", EXIT_CONFIG)
    if not args.no_deploy:
        tree, _, _ = tree_to_ship(args.repo)
        if args.command is None and not git_succeeds(
            args.repo, "cat-file", "-e", f"{tree}:run_aquarat_small.sh"
        ):
            raise LaunchError(
                f"run_aquarat_small.sh is not in the git tree of {args.repo}; commit it or pass "
                "--command",
                EXIT_CONFIG,
            )
    # The name is how a lost launch answer is recognised later (LambdaAPI.launch): make it ours.
    args.name = args.name or f"nanochat-aquarat-{secrets.token_hex(3)}"
    api = LambdaAPI(args.api_base, key) if key else None
    return api, env_text


def look_at_account(api, args):
    """(SSH key name to attach, ids of the instances that exist before we launch). Refuses, before
    anything is billed, a key that ssh could not use without a prompt."""
    try:
        keys = {k["name"]: k.get("public_key") for k in api.ssh_keys()}
        ssh_key = choose_ssh_key(list(keys), args.ssh_key_name)
        existing = api.instances()
    except ApiError as e:
        raise api_failure(e, "preparing the launch") from e
    if not args.no_deploy:  # with --no-deploy the user logs in by hand and may type a passphrase
        check_key_usable(args.ssh_key_file, ssh_key, keys[ssh_key])
    if existing:
        listed = ", ".join(
            f"{i['id']} ({i['instance_type']['name']}, {i['status']})" for i in existing
        )
        print(f"note: you already have {len(existing)} instance(s) running: {listed}")
    return ssh_key, {i["id"] for i in existing}


def choose_ssh_key(names, wanted):
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
        print(f"  [{i}] {name}")
    choice = input("Which SSH key should the instance accept? number: ").strip()
    if not choice.isdigit() or not 1 <= int(choice) <= len(names):
        raise LaunchError(f"no such key number: {choice!r}", EXIT_USAGE)
    return names[int(choice) - 1]


def lookup_type(types, name):
    if name not in types:
        raise LaunchError(
            f"--instance-type {name!r} does not exist; run `uv run launch_lambda.py types`. "
            f"Known: {', '.join(sorted(types))}",
            EXIT_CONFIG,
        )
    return types[name]


# -----------------------------------------------------------------------------
# Getting an instance


def acquire_or_clean_up(api, state, args, ssh_key, existing_ids):
    """(instance id, region, price in cents/hour). A Ctrl-C here may land while a launch request
    is in flight, so before giving up we look for an instance that request made and terminate it."""
    try:
        return acquire_instance(api, args, ssh_key, existing_ids)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("Interrupted; checking that no instance was launched ...")
        try:
            for inst in api.new_instances(args.name, existing_ids):
                cleanup_after_failure(api, state, inst["id"], args.keep_on_failure, "interrupted")
        except ApiError as e:
            print(
                f"!!! could not check ({e}): look at https://cloud.lambda.ai/instances "
                f"for '{args.name}'"
            )
        raise LaunchError("interrupted before the instance was ready", EXIT_INTERRUPTED) from None
    except ApiError as e:
        raise api_failure(e, "launch failed") from e


def acquire_instance(api, args, ssh_key, known_ids):
    """Launches in the requested region (or any region with capacity), waiting for capacity if
    asked to."""
    deadline = time.monotonic() + 60 * (args.wait_capacity or 0)
    body = {"instance_type_name": args.instance_type, "ssh_key_names": [ssh_key], "name": args.name}
    if args.filesystem:
        body["file_system_names"] = [args.filesystem]
    while True:
        item = lookup_type(api.instance_types(), args.instance_type)
        available = [r["name"] for r in item["regions_with_capacity_available"]]
        if args.region == "auto":
            candidates = available
        else:
            candidates = [args.region] if args.region in available else []
        if not candidates:
            print(
                f"No capacity for {args.instance_type} in {args.region}; regions with capacity "
                f"now: {', '.join(available) or 'none'}"
            )
        for region in candidates:
            print(f"Launching {args.instance_type} in {region} as '{args.name}' ...")
            try:
                instance_id = api.launch(dict(body, region_name=region), known_ids)
            except ApiError as e:
                if e.code == LambdaAPI.WRONG_REGION:
                    raise LaunchError(
                        f"filesystem {args.filesystem} is not in region {region}, where the "
                        f"launch asked for it: {e}",
                        EXIT_CONFIG,
                    ) from e
                # Capacity can vanish between the listing and the launch: try the next region.
                if e.code != LambdaAPI.CAPACITY:
                    raise api_failure(e, "launch failed") from e
                print(f"  {region}: insufficient capacity")
                continue
            return instance_id, region, item["instance_type"]["price_cents_per_hour"]
        left = deadline - time.monotonic()
        if left <= 0:
            hint = " Try --region auto, another type, or --wait-capacity MINUTES."
            if args.wait_capacity:
                hint = ""
            raise LaunchError(
                f"no capacity for {args.instance_type} in {args.region}.{hint}", EXIT_NO_CAPACITY
            )
        print(f"  waiting for capacity ({left / 60:.1f} min left of --wait-capacity) ...")
        time.sleep(min(args.poll_interval, max(left, 0.1)))


def record_launch(state, args, instance_id, region, price, command):
    """What later `status`, `logs`, `fetch` and `ssh` calls need, from any directory."""
    state.update(
        instance_id,
        name=args.name,
        instance_type=args.instance_type,
        region=region,
        status="booting",
        price_cents_per_hour=price,
        launched_at=timestamp(),
        ssh_user=args.ssh_user,
        ssh_port=args.ssh_port,
        ssh_key_file=args.ssh_key_file,
        remote_dir=args.remote_dir,
        remote_base_dir=args.remote_base_dir,
        tmux_session=tmux_session(instance_id),
        command=command,
        run=filesystem.run_name(command),
        filesystem=args.filesystem,
        resumed_from=getattr(args, "resumed_from", None),
        # what `resume` needs to launch the same run again (no secret: those come from .env)
        launch={k: json_value(getattr(args, k, None)) for k in RESUMABLE},
    )


def json_value(value):
    return str(value) if isinstance(value, Path) else value


# The launch flags a `resume` reuses (the ssh key name is the one chosen at launch).
RESUMABLE = (
    "instance_type",
    "region",
    "ssh_key_name",
    "ssh_key_file",
    "ssh_user",
    "ssh_port",
    "ssh_timeout",
    "active_timeout",
    "poll_interval",
    "wait_capacity",
    "skip_gpu_check",
    "auto_terminate",
    "max_hours",
    "max_cost",
    "auto_resume",
    "keep_on_failure",
    "repo",
    "remote_dir",
    "forward_env",
    "filesystem",
    "nodes",
    "run_args",  # a run on several nodes gets its node flags added to these at each start
)


def remote_command(args, price_cents=None):
    """The command run on the node. The default one asks for the gpu profile outright (a node
    whose torch cannot see its GPUs then stops at once instead of running the cpu profile on a
    billed machine) and passes the instance's price for the report's cost per stage, unless the
    user's own flags say otherwise."""
    if args.command:
        return args.command
    argv = shlex.split(DEFAULT_COMMAND) + args.run_args
    if "--profile" not in args.run_args:
        argv += ["--profile", "gpu"]
    if price_cents is not None and "--gpu-hourly-price" not in args.run_args:
        argv += ["--gpu-hourly-price", f"{price_cents / 100:.2f}"]
    return shlex.join(argv)


# -----------------------------------------------------------------------------
# After the launch: everything here runs under cmd_launch's terminate-on-failure guard


def after_launch(api, state, args, instance_id, price, command, env_text, budget, launched):
    remote, _ = connect_when_active(api, state, args, instance_id, price, launched)
    if args.no_deploy:
        print(
            f"--no-deploy: nothing started. The instance keeps billing until "
            f"`uv run launch_lambda.py terminate {instance_id}`."
        )
        return EXIT_OK
    remote.wait_ready(args.ssh_timeout, args.poll_interval)
    if not args.skip_gpu_check:
        check_gpus(remote, args.repo)
    session = tmux_session(instance_id)
    exports = {"NANOCHAT_INSTANCE_ID": instance_id}
    if args.filesystem:
        run = filesystem.run_name(command)
        gone = filesystem.lock_to_take_over(api, remote, args.remote_base_dir, run, instance_id)
        if gone:
            exports["NANOCHAT_LOCK_TAKEOVER"] = gone
    deploy(
        remote,
        args.repo,
        args.remote_dir,
        command,
        args.remote_base_dir,
        env_text,
        session,
        exports,
    )
    state.update(instance_id, deployed_at=timestamp())
    if not args.auto_terminate:
        print(
            "The run continues without this laptop, and the instance bills until you terminate "
            "it, whether the run succeeds or fails. "
            f"Follow: uv run launch_lambda.py logs {instance_id} --follow\n"
            f"  Results: uv run launch_lambda.py fetch {instance_id}\n"
            f"  STOP BILLING when done: uv run launch_lambda.py terminate {instance_id}"
        )
        return EXIT_OK
    return watch_fetch_terminate(api, state, args, remote, instance_id, price, launched, budget)


def connect_when_active(api, state, args, instance_id, price, launched):
    """(a Remote for the instance once it is active, the API's view of it)."""
    inst = wait_active(api, instance_id, args.active_timeout, args.poll_interval)
    state.update(instance_id, ip=inst["ip"], status="active")
    if args.filesystem:
        fs = filesystem.find(api, args.filesystem)
        if fs is None:
            raise LaunchError(f"filesystem {args.filesystem} vanished from the account", EXIT_ERROR)
        args.remote_base_dir = filesystem.base_dir(fs, inst)
        state.update(instance_id, remote_base_dir=args.remote_base_dir)
        print(f"  NANOCHAT_BASE_DIR on the instance: {args.remote_base_dir} (filesystem)")
    remote = Remote(
        inst["ip"],
        args.ssh_user,
        args.ssh_port,
        args.ssh_key_file,
        state.known_hosts,
        connect_timeout=min(10, max(1, args.ssh_timeout)),
    )
    remote.forget_host()
    so_far = price * (time.monotonic() - launched) / 3600
    print(
        f"Instance {instance_id} is active at {inst['ip']}.\n"
        f"  SSH:  {remote.human_command()}   (or: uv run launch_lambda.py ssh {instance_id})\n"
        f"  Cost: {money(price)}/hour, ~{money(so_far)} so far"
    )
    return remote, inst


def wait_active(api, instance_id, timeout, poll):
    deadline = time.monotonic() + timeout
    while True:
        try:
            inst = api.instance(instance_id)
            status = inst["status"]
        except ApiError as e:
            if e.code != LambdaAPI.NOT_FOUND:  # a brand-new instance can briefly be unknown
                raise api_failure(e, f"polling instance {instance_id}") from e
            inst, status = {}, "not visible yet"
        if status == "active" and inst.get("ip"):
            return inst
        if status in GONE:
            raise LaunchError(
                f"instance {instance_id} became {status} while booting", EXIT_NOT_READY
            )
        if time.monotonic() >= deadline:
            raise LaunchError(
                f"instance {instance_id} was not active after {timeout:.0f}s (status: {status})",
                EXIT_NOT_READY,
            )
        print(f"  instance {instance_id}: {status} ...")
        time.sleep(poll)


def watch_fetch_terminate(
    api, state, args, remote, instance_id, price, launched, budget, others=()
):
    """Follows the run on instance_id; when it ends well, fetches and terminates it and `others`
    (the other nodes of a run on several; price is then all of theirs)."""
    print(
        "--auto-terminate: watching the run. Ctrl-C, or closing this terminal, fetches what the "
        "run has written so far and then terminates the instance (a second Ctrl-C skips the "
        "fetch). To close the terminal and keep the run going, start the launcher inside tmux "
        "or under nohup."
    )
    max_seconds, limit_name = budget.limit(price, launched)
    dest = args.dest or default_dest(instance_id)
    try:
        code = follow_run(
            remote,
            args.remote_dir,
            tmux_session(instance_id),
            args.poll_interval,
            args.ssh_timeout,
            max_seconds,
            api,
            instance_id,
            started=launched,  # --max-hours counts from the launch: that is when billing began
            limit_name=limit_name,
        )
    except InstanceLost:
        raise  # nothing to fetch from a lost machine; a filesystem keeps the run's files
    except LaunchError as e:
        if e.exit_code == EXIT_RUN_FAILED:  # bring home whatever exists before terminating
            fetch_what_exists(remote, args, dest)
        raise
    except KeyboardInterrupt:
        print("Interrupted: fetching what the run has written so far, then terminating ...")
        try:
            fetch_what_exists(remote, args, dest)
        except KeyboardInterrupt:
            print("  fetch skipped (interrupted again)")
        raise
    dest = fetch_artifacts(remote, args.remote_dir, args.remote_base_dir, dest)
    hours = (time.monotonic() - launched) / 3600
    if code != 0:
        raise LaunchError(
            f"the remote command exited with code {code}; log and artifacts are in {dest}",
            EXIT_RUN_FAILED,
        )
    ids = [instance_id, *others]
    print(f"Run finished OK. Terminating {', '.join(ids)} ...")
    for iid in ids:
        terminate_instance(api, state, iid)
    print(
        f"Terminated {', '.join(ids)} after {duration(hours)} (~{money(price * hours)}). "
        f"Results in {dest}"
    )
    return EXIT_OK


def fetch_what_exists(remote, args, dest):
    try:
        fetch_artifacts(remote, args.remote_dir, args.remote_base_dir, dest)
    except (LaunchError, subprocess.TimeoutExpired) as fetch_error:
        print(f"  could not fetch artifacts: {fetch_error}")


# -----------------------------------------------------------------------------
# Terminating


def terminate_instance(api, state, instance_id):
    try:
        api.terminate(instance_id)
    except ApiError as e:
        if e.code != LambdaAPI.NOT_FOUND:
            raise
        print(f"  {instance_id} was already gone")
    if state.get(instance_id):
        state.update(instance_id, status="terminated", terminated_at=timestamp())


def cleanup_after_failure(api, state, instance_id, keep, reason):
    print(f"FAILED after launching {instance_id}: {reason}")
    if keep:
        print(
            f"--keep-on-failure: instance {instance_id} is STILL RUNNING and billed. Inspect it "
            f"with `uv run launch_lambda.py ssh {instance_id}`, then "
            f"`uv run launch_lambda.py terminate {instance_id}`."
        )
        return
    print(
        f"Terminating {instance_id} so it does not keep billing (use --keep-on-failure to keep "
        "it) ..."
    )
    # An impatient second Ctrl-C must not cut the termination short and leave the node billing.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        terminate_instance(api, state, instance_id)
        print(f"Terminated {instance_id}.")
    except Exception as e:
        # Say it loudly and go on to exit: the user must act, and retrying here could hang.
        print(
            f"!!! COULD NOT TERMINATE {instance_id}: {e}\n"
            "!!! It may still be billing. Terminate it now at https://cloud.lambda.ai/instances "
            f"or with `uv run launch_lambda.py terminate {instance_id}`."
        )
    finally:
        signal.signal(signal.SIGINT, previous)


# -----------------------------------------------------------------------------
# --dry-run


def dry_run(api, args):
    print("DRY RUN: nothing will be launched, shipped or terminated.")
    if api is None:
        print("  (no LAMBDA_API_KEY: not checking types, capacity or SSH keys)")
        price = None
    else:
        price = show_type_and_key(api, args)
        if args.filesystem:
            try:
                types = api.instance_types()
            except ApiError as e:
                raise api_failure(e, "dry run") from e
            filesystem.prepare(api, args, types, create=False)
    command = remote_command(args, None if price is None else price * args.nodes)
    wait = f" (wait up to {args.wait_capacity} min for capacity)" if args.wait_capacity else ""
    count = f"{args.nodes} x " if args.nodes > 1 else ""
    print(
        f"  plan:      launch {count}{args.instance_type} in region {args.region} named "
        f"{args.name}{wait}"
    )
    if args.nodes > 1:
        print(
            f"  nodes:     each runs the orchestrator with --nnodes {args.nodes} --node-rank R "
            "--master-addr <node 0's private IP>, node 0 first"
        )
    if args.no_deploy:
        print(
            "  then:      nothing (--no-deploy): print the SSH command "
            "and leave the instance running"
        )
    else:
        print(
            f"  then:      ship {args.repo} (git archive) to {shown(args.remote_dir)}, "
            f"write .env (600), run in tmux: {command}"
        )
        where = args.remote_base_dir
        if args.filesystem:
            where = f"{{mount point of {args.filesystem}}}/{filesystem.BASE_SUBDIR}"
        print(f"  NANOCHAT_BASE_DIR on the instance: {where}")
        if args.auto_terminate:
            afterwards = "watch, fetch artifacts, terminate (--auto-terminate)"
        else:
            afterwards = "leave it running: you terminate it yourself"
        print(f"  finally:   {afterwards}")
    if price is not None:
        hours = [args.max_hours] if args.max_hours else [1, 4, 8]
        total = price * args.nodes
        estimates = ", ".join(f"{h:g} h = {money(total * h)}" for h in hours)
        print(f"  cost:      {money(total)}/hour; {estimates}")
        if args.nodes > 1:
            print(ethernet_paragraph(args.nodes, args.gpus, price, args.run_args))
    if args.command is None:
        show_stage_plan(args, price)
    return EXIT_OK


def show_stage_plan(args, price_cents):
    """The pipeline's own plan (scripts/plan_run.py: every stage's time and cost at stated
    assumptions). It needs torch, which the launcher never imports: it runs with the checkout's
    .venv when the laptop has one, and otherwise says how to get it."""
    flags = shlex.split(remote_command(args, price_cents))
    depth = flags[flags.index("--depth") + 1] if "--depth" in flags else "8"
    gpus = str(getattr(args, "gpus", None) or 8)
    plan = ["-m", "scripts.plan_run", "--depth", depth, "--gpus", gpus]
    if price_cents is not None:
        plan += ["--hourly-price", f"{price_cents / 100:.2f}"]
    python = Path(args.repo) / ".venv" / "bin" / "python"
    if not python.is_file():
        print(
            "  stages:    on a machine set up for the pipeline, `bash run_aquarat_small.sh --plan "
            f"--depth {depth} --nproc {gpus}` prints every stage's time and cost"
        )
        return
    print("  stages (scripts/plan_run.py):")
    proc = subprocess.run(
        [str(python), *plan], cwd=args.repo, capture_output=True, text=True, timeout=120
    )
    for line in (proc.stdout + proc.stderr).splitlines():
        print(f"    {line}")


def show_type_and_key(api, args):
    """The dry run's look at the account: type, capacity now, SSH key. Returns the price."""
    try:
        item = lookup_type(api.instance_types(), args.instance_type)
        public_keys = {k["name"]: k.get("public_key") for k in api.ssh_keys()}
    except ApiError as e:
        raise api_failure(e, "dry run") from e
    keys = list(public_keys)
    regions = [r["name"] for r in item["regions_with_capacity_available"]]
    args.gpus = item["instance_type"].get("specs", {}).get("gpus")
    print(f"  type:      {args.instance_type}: {item['instance_type']['description']}")
    print(f"  capacity:  {', '.join(regions) or 'none right now'}")
    if args.ssh_key_name and args.ssh_key_name not in keys:
        raise LaunchError(
            f"--ssh-key-name {args.ssh_key_name!r} is not on your account; keys: {keys}",
            EXIT_CONFIG,
        )
    if args.ssh_key_name:
        key = args.ssh_key_name
    else:
        key = keys[0] if len(keys) == 1 else "ask among " + ", ".join(keys)
    print(f"  ssh key:   {key}")
    if key in public_keys and not args.no_deploy:
        check_key_usable(args.ssh_key_file, key, public_keys[key])  # what the launch would refuse
    return item["instance_type"]["price_cents_per_hour"]


# -----------------------------------------------------------------------------
# resume


def cmd_resume(args, settings):
    """A fresh instance for a run whose instance is gone: same type, filesystem (so region) and
    command. The pipeline skips the stages done, resumes the interrupted one from its last
    complete checkpoint, and downloads nothing twice: all of that is on the filesystem."""
    state = State()
    old_id, rec = find_record(state, args.target)
    if not rec.get("filesystem") or not rec.get("launch"):
        raise LaunchError(
            f"{args.target}: that run lived on instance {old_id}'s own disk (launched without "
            "--filesystem), which went with the instance: there is nothing to resume from. "
            "Launch it again with --filesystem NAME, so that the next one survives its instance.",
            EXIT_USAGE,
        )
    api = LambdaAPI(args.api_base, require_api_key(settings))
    for node_id in rec.get("nodes") or [old_id]:  # every node of a run on several
        status = filesystem.instance_status(api, node_id)
        if node_id == old_id:
            old_status = status
        if status not in filesystem.GONE_OR_UNKNOWN:
            # its pipeline may still run and write the same checkpoints: never two at once
            raise LaunchError(
                f"instance {node_id} of run {rec.get('run')} is still {status}: its pipeline may "
                f"still be running. Follow it (uv run launch_lambda.py logs {node_id} --follow), "
                f"or terminate it (uv run launch_lambda.py terminate {node_id}) and then resume.",
                EXIT_USAGE,
            )
        if (state.get(node_id) or {}).get("status") != "terminated":
            state.update(node_id, status="terminated")
    launch = argparse.Namespace(**rec["launch"])
    for flag in ("auto_terminate", "max_hours", "auto_resume", "max_cost", "keep_on_failure"):
        if getattr(args, flag) is not None:
            setattr(launch, flag, getattr(args, flag))
    launch.nodes = rec["launch"].get("nodes") or 1  # launches from before --nodes existed: 1
    launch.command, launch.run_args, launch.resumed_from = rec["command"], [], old_id
    if launch.nodes > 1:  # each node's command is the run's flags plus its own node flags
        launch.command, launch.run_args = None, rec["launch"]["run_args"]
    launch.name = f"nanochat-aquarat-{secrets.token_hex(3)}"
    launch.dest, launch.remote_base_dir, launch.dry_run, launch.no_deploy = (
        args.dest,
        None,
        False,
        False,
    )
    check_watch_flags(launch)
    check_nodes_flags(launch)
    env_text = remote_env_text(settings, launch.forward_env)
    try:
        types = api.instance_types()
        existing = {i["id"] for i in api.instances()}
    except ApiError as e:
        raise api_failure(e, "preparing the resume") from e
    lookup_type(types, launch.instance_type)
    if filesystem.find(api, launch.filesystem) is None:
        raise LaunchError(
            f"filesystem {launch.filesystem} of run {rec.get('run')} is no longer on the account: "
            "the run's files went with it; launch the run again",
            EXIT_CONFIG,
        )
    filesystem.prepare(api, launch, types)
    instances = f"{launch.nodes} new" if launch.nodes > 1 else "a new"
    print(
        f"Resuming run {rec.get('run')} (its instance {old_id} is {old_status}) on {instances} "
        f"{launch.instance_type} in {launch.region} with filesystem {launch.filesystem}: done "
        "stages are skipped, the interrupted one goes on from its last complete checkpoint."
    )
    return run_launch(api, state, launch, launch.ssh_key_name, existing, env_text)


def find_record(state, target):
    """(instance id, record) for an instance id, or for the newest launch of a run name."""
    records = state.load()
    if target in records:
        return target, records[target]
    of_run = [r for r in records.values() if r.get("run") == target]
    if not of_run:
        runs = sorted({r["run"] for r in records.values() if r.get("run")})
        raise LaunchError(
            f"no instance or run {target!r} launched from here ({state.path}); runs: "
            f"{', '.join(runs) or 'none'}",
            EXIT_USAGE,
        )
    newest = max(of_run, key=lambda r: r.get("launched_at", ""))
    return newest["id"], newest


def check_watch_flags(args):
    """--max-hours, --max-cost and --auto-resume act through the watcher (--auto-terminate)."""
    for flag, value in (("--max-hours", args.max_hours), ("--max-cost", args.max_cost)):
        if value is not None and not args.auto_terminate:
            # Without --auto-terminate nothing watches the run, so no cap could be kept: refused
            # rather than accepted and silently ignored (the node would bill past it).
            raise LaunchError(
                f"{flag} needs --auto-terminate: without it the launcher leaves once the run has "
                "started, and nothing would stop the instance at that cap",
                EXIT_USAGE,
            )
        if value is not None and value <= 0:
            raise LaunchError(f"{flag} must be > 0", EXIT_USAGE)
    if args.auto_resume:
        missing = [
            need
            for need, ok in (
                ("--auto-terminate (the watcher notices the lost instance)", args.auto_terminate),
                ("--filesystem NAME (where the run outlives its instance)", args.filesystem),
                ("--max-cost USD (a cap on the dollars of all its instances)", args.max_cost),
            )
            if not ok
        ]
        if missing:
            raise LaunchError("--auto-resume needs " + ", ".join(missing), EXIT_USAGE)
        if args.keep_on_failure:
            raise LaunchError(
                "--auto-resume terminates a lost instance before launching its replacement (its "
                "pipeline could still hold the run); it cannot be combined with --keep-on-failure",
                EXIT_USAGE,
            )


def check_nodes_flags(args):
    """--nodes N: N instances, one run, the orchestrator on each with its --node-rank."""
    if args.nodes < 1:
        raise LaunchError(f"--nodes must be 1 or more (got {args.nodes})", EXIT_USAGE)
    if args.nodes == 1:
        return
    if not args.filesystem:
        # each instance's own disk would scatter the checkpoint shards over the nodes
        raise LaunchError(
            f"--nodes {args.nodes} needs --filesystem NAME: the nodes keep the run (data, "
            "checkpoints, report) in one base dir on a persistent filesystem they all mount",
            EXIT_USAGE,
        )
    if args.command is not None:
        raise LaunchError(
            "--nodes starts the orchestrator on every node with its own --node-rank: give its "
            "flags after -- instead of --command",
            EXIT_USAGE,
        )
    if args.auto_resume:
        raise LaunchError(
            "--auto-resume replaces one lost instance; with --nodes, terminate the nodes and "
            "`resume` the run (it relaunches every node)",
            EXIT_USAGE,
        )
