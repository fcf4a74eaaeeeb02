"""One run on several nodes: the orchestrator on each with its --node-rank, node 0 first.

`deploy --hosts H1,H2,...` does it on machines you already have (for example the nodes of a
Lambda 1-Click Cluster, whose InfiniBand multi-node training needs): nothing is launched or
terminated there. `launch --nodes N` launches N instances of one type in one region with one
persistent filesystem and starts them the same way (start_nodes); with --auto-terminate it watches
node 0 and terminates all N.
"""

import shlex
import time

from nanochat.launcher import filesystem
from nanochat.launcher.api import ApiError, api_failure
from nanochat.launcher.cost import money
from nanochat.launcher.deploy import DEFAULT_REMOTE_BASE_DIR, check_gpus, deploy, tmux_session
from nanochat.launcher.errors import EXIT_OK, EXIT_USAGE, InstanceLost, LaunchError
from nanochat.launcher.interconnect import ethernet_paragraph
from nanochat.launcher.launch import (
    Budget,
    acquire_or_clean_up,
    cleanup_after_failure,
    connect_when_active,
    failure_of,
    lookup_type,
    record_launch,
    remote_command,
    watch_fetch_terminate,
)
from nanochat.launcher.settings import remote_env_text
from nanochat.launcher.ssh import Remote
from nanochat.launcher.state import State, timestamp

DEFAULT_MASTER_PORT = 29500  # torchrun's rendezvous port on node 0


def node_command(args, rank, nnodes, master, port, price_cents=None):
    """The orchestrator's command on node `rank`: the run's own (launch.remote_command) plus the
    node flags."""
    argv = shlex.split(remote_command(args, price_cents))
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(rank), "--master-addr", master]
        argv += ["--master-port", str(port)]
    return shlex.join(argv)


def start_nodes(args, nodes, base, env_text, master, port, price_cents=None):
    """nodes: (Remote, tmux session, exports) in rank order. Node 0 first: it hosts torchrun's
    rendezvous, which the others join. Returns each node's command."""
    commands = []
    for rank, (remote, session, exports) in enumerate(nodes):
        print(f"node {rank} of {len(nodes)}: {remote.host}")
        remote.wait_ready(args.ssh_timeout, 2)
        command = node_command(args, rank, len(nodes), master, port, price_cents)
        deploy(remote, args.repo, args.remote_dir, command, base, env_text, session, exports)
        commands.append(command)
    return commands


def cmd_deploy(args, settings):
    hosts = [h.strip() for h in args.hosts.split(",") if h.strip()]
    if not hosts or len(set(hosts)) != len(hosts):
        raise LaunchError(
            f"--hosts wants distinct host names, e.g. h1,h2 (got {args.hosts!r})", EXIT_USAGE
        )
    if len(hosts) > 1 and args.remote_base_dir is None:
        # each node's own ~/.cache/nanochat would scatter the checkpoint shards over the nodes
        raise LaunchError(
            f"--hosts with {len(hosts)} nodes needs --remote-base-dir DIR on storage all of them "
            "share (the cluster's shared filesystem): see docs/nodes.md",
            EXIT_USAGE,
        )
    env_text = remote_env_text(settings, args.forward_env)
    state = State()
    nodes = [
        (
            Remote(host, args.ssh_user, args.ssh_port, args.ssh_key_file, state.known_hosts),
            f"aquarat-node{rank}",
            None,
        )
        for rank, host in enumerate(hosts)
    ]
    master = args.master_addr or hosts[0]
    base = args.remote_base_dir or DEFAULT_REMOTE_BASE_DIR
    start_nodes(args, nodes, base, env_text, master, args.master_port)
    print(
        f"The run is started on {len(hosts)} node(s). Follow node 0: ssh {hosts[0]}, then "
        "`tmux attach -t aquarat-node0`. The machines are yours: nothing here terminates them."
    )
    return EXIT_OK


def launch_nodes(api, state, args, ssh_key, existing_ids, env_text):
    """`launch --nodes N` (N > 1, with --filesystem, whose region args.region already is): N
    instances, the orchestrator on each (node 0's private address as the master), and with
    --auto-terminate the watcher on node 0. The money rule holds for all N: once one exists, any
    failure terminates every one launched (unless --keep-on-failure)."""
    try:
        item = lookup_type(api.instance_types(), args.instance_type)
    except ApiError as e:
        raise api_failure(e, "listing instance types") from e
    price = item["instance_type"]["price_cents_per_hour"]
    gpus = item["instance_type"]["specs"]["gpus"]
    print(ethernet_paragraph(args.nodes, gpus, price, args.run_args))
    # the run's command, as recorded; each node's adds its node flags when it starts
    command = remote_command(args, price * args.nodes)
    args.ssh_key_name = ssh_key  # the one chosen, for a later `resume`
    ids = []
    launched = time.monotonic()
    try:
        for rank in range(args.nodes):
            # One request per node: the spec's InstanceLaunchRequest has no quantity. The client
            # spaces launches by the documented limit (one per 12 s); known ids grow, so a retried
            # request never takes an earlier node for the instance it made.
            iid, region, _ = acquire_or_clean_up(
                api, state, args, ssh_key, set(existing_ids) | set(ids)
            )
            ids.append(iid)
            args.region = region  # the rest in the same region (the filesystem's)
            print(
                f"Launched node {rank}: {iid} ({args.instance_type}, {region}) at "
                f"{money(price)}/hour. Billing has started."
            )
            record_launch(state, args, iid, region, price, command)
            state.update(iid, node_rank=rank)
        for iid in ids:  # every node's record names them all: `resume` and `status` read it
            state.update(iid, nodes=ids)
        return run_on_nodes(api, state, args, ids, price, env_text, launched)
    except (KeyboardInterrupt, Exception) as e:
        failure = failure_of(e)
    for iid in ids:
        cleanup_after_failure(api, state, iid, args.keep_on_failure, failure)
    if isinstance(failure, InstanceLost):
        run = filesystem.run_name(command)
        print(
            f"[launch_lambda] {failure}; the run's files are safe on filesystem "
            f"{args.filesystem}: go on on {args.nodes} new instances with "
            f"`uv run launch_lambda.py resume {run}`"
        )
    raise failure


def run_on_nodes(api, state, args, ids, price, env_text, launched):
    total = price * len(ids)
    remotes, instances = [], []
    for iid in ids:  # they boot side by side: waiting for each in turn costs no more
        remote, inst = connect_when_active(api, state, args, iid, price, launched)
        state.update(iid, private_ip=inst.get("private_ip"))
        remotes.append(remote)
        instances.append(inst)
    if args.no_deploy:
        print(
            f"--no-deploy: nothing started. The {len(ids)} instances keep billing "
            f"({money(total)}/hour) until you terminate each: "
            + "; ".join(f"uv run launch_lambda.py terminate {iid}" for iid in ids)
        )
        return EXIT_OK
    # The other nodes reach node 0 by its private address when the API reports one: traffic
    # inside the region, not out through the public interface.
    master = instances[0].get("private_ip") or instances[0]["ip"]
    run = filesystem.run_name(remote_command(args))
    nodes = []
    for rank, (iid, remote) in enumerate(zip(ids, remotes)):
        remote.wait_ready(args.ssh_timeout, args.poll_interval)
        if not args.skip_gpu_check:
            check_gpus(remote, args.repo)
        exports = {"NANOCHAT_INSTANCE_ID": iid}
        gone = filesystem.lock_to_take_over(api, remote, args.remote_base_dir, run, iid, rank)
        if gone:
            exports["NANOCHAT_LOCK_TAKEOVER"] = gone
        nodes.append((remote, tmux_session(iid), exports))
    commands = start_nodes(
        args, nodes, args.remote_base_dir, env_text, master, DEFAULT_MASTER_PORT, total
    )
    for iid, command in zip(ids, commands):
        state.update(iid, command=command, deployed_at=timestamp())
    if not args.auto_terminate:
        print(
            f"The run continues on {len(ids)} nodes without this laptop; they bill "
            f"({money(total)}/hour) until you terminate each, whether the run succeeds or fails.\n"
            f"  Follow node 0: uv run launch_lambda.py logs {ids[0]} --follow\n"
            f"  Results: uv run launch_lambda.py fetch {ids[0]}\n"
            "  STOP BILLING when done: "
            + "; ".join(f"uv run launch_lambda.py terminate {iid}" for iid in ids)
        )
        return EXIT_OK
    # Node 0 runs the single-process stages and writes the report; a node that stops stops the
    # stage on every node (the orchestrator), so node 0's exit code is the run's.
    return watch_fetch_terminate(
        api, state, args, remotes[0], ids[0], total, launched, Budget(args), others=ids[1:]
    )
