"""`deploy --hosts H1,H2,...`: the run on machines you already have (for example the nodes of a
Lambda 1-Click Cluster, whose InfiniBand multi-node training needs), one orchestrator per node with
its --node-rank, node 0 first. Nothing is launched or terminated: the machines are yours."""

import shlex

from nanochat.launcher.deploy import DEFAULT_REMOTE_BASE_DIR, deploy
from nanochat.launcher.errors import EXIT_OK, EXIT_USAGE, LaunchError
from nanochat.launcher.launch import DEFAULT_COMMAND
from nanochat.launcher.settings import remote_env_text
from nanochat.launcher.ssh import Remote
from nanochat.launcher.state import State


def node_command(args, rank, nnodes, master):
    argv = shlex.split(DEFAULT_COMMAND) + args.run_args
    if "--profile" not in args.run_args:
        argv += ["--profile", "gpu"]
    if nnodes > 1:
        argv += ["--nnodes", str(nnodes), "--node-rank", str(rank), "--master-addr", master]
        argv += ["--master-port", str(args.master_port)]
    return shlex.join(argv)


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
    master = args.master_addr or hosts[0]
    base = args.remote_base_dir or DEFAULT_REMOTE_BASE_DIR
    for rank, host in enumerate(hosts):  # node 0 first: it hosts torchrun's rendezvous
        print(f"node {rank} of {len(hosts)}: {host}")
        remote = Remote(host, args.ssh_user, args.ssh_port, args.ssh_key_file, state.known_hosts)
        remote.wait_ready(args.ssh_timeout, 2)
        command = node_command(args, rank, len(hosts), master)
        deploy(remote, args.repo, args.remote_dir, command, base, env_text, f"aquarat-node{rank}")
    print(
        f"The run is started on {len(hosts)} node(s). Follow node 0: ssh {hosts[0]}, then "
        "`tmux attach -t aquarat-node0`. The machines are yours: nothing here terminates them."
    )
    return EXIT_OK
