# ruff: noqa: F811  (the launcher tests' fixtures, imported below, are redefined as parameters)
"""A run that survives its node (issue 29): the run's base dir on a Lambda persistent filesystem
(a shared local directory stands in for it, mounted where the API test double says), `resume` on
a new instance, the lock of a machine that is gone, the watcher's --auto-resume under --max-cost;
and the orchestrator across nodes (--nnodes), rehearsed on loopback.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from test_launch_lambda import (  # noqa: F401  (fixtures)
    REPO_ROOT,
    SSHD,
    env,
    fake,
    kill_tmux,
    launch_args,
    launcher,
    project,
    spec,
    ssh_flags,
    sshd,
    start_launcher,
    state_of,
)

from nanochat.launcher import errors
from nanochat.launcher.deploy import tmux_session

ORCHESTRATOR = REPO_ROOT / "run_aquarat_small.sh"


def fs_args(*extra):
    return launch_args("--filesystem", "runs", *extra)


# -----------------------------------------------------------------------------
# the filesystem through the API (no instance is deployed)


def test_filesystem_is_created_in_the_region_then_a_region_mismatch_is_refused(env, fake):
    proc, out = launcher(env, *fs_args("--no-deploy"))
    assert proc.returncode == 0, out
    assert "Filesystem runs does not exist: creating it in us-west-1" in out
    (fs,) = fake.filesystems.values()
    assert fs["region"]["name"] == "us-west-1"
    (launch,) = fake.launches()
    assert launch["body"]["file_system_names"] == ["runs"]
    (inst,) = fake.running()
    assert inst["file_system_names"] == ["runs"]
    rec = state_of(env)[inst["id"]]
    assert rec["filesystem"] == "runs" and rec["remote_base_dir"] == "/lambda/nfs/runs/nanochat"
    # while that instance runs, its run cannot be resumed elsewhere
    proc, out = launcher(env, "resume", "aquarat_small")
    assert proc.returncode == errors.EXIT_USAGE and "is still active" in out, out
    assert len(fake.launches()) == 1
    # the filesystem exists now, in us-west-1: another region is refused, naming both
    proc, out = launcher(env, *launch_args("--filesystem", "runs", "--region", "us-east-1"))
    assert proc.returncode == errors.EXIT_CONFIG, out
    assert "filesystem runs is in region us-west-1, but --region asks for us-east-1" in out
    assert len(fake.launches()) == 1 and len(fake.filesystems) == 1
    for bad, message in (
        (["--filesystem", "9lives"], "start with a letter"),
        (["--auto-resume", "--auto-terminate", "--max-cost", "5"], "--auto-resume needs"),
        (["--max-cost", "5"], "--max-cost needs --auto-terminate"),
    ):
        proc, out = launcher(env, *launch_args(*bad))
        assert proc.returncode == errors.EXIT_USAGE and message in out, out
    proc, out = launcher(env, "terminate", inst["id"], "--yes")
    assert proc.returncode == 0
    proc, out = launcher(env, "resume", "nosuchrun")
    assert proc.returncode == errors.EXIT_USAGE and "runs: aquarat_small" in out, out


def test_a_run_without_a_filesystem_cannot_be_resumed(env, fake):
    proc, out = launcher(env, *launch_args("--no-deploy"))
    assert proc.returncode == 0, out
    (inst,) = fake.running()
    launcher(env, "terminate", inst["id"], "--yes")
    proc, out = launcher(env, "resume", inst["id"])
    assert proc.returncode == errors.EXIT_USAGE and "nothing to resume from" in out, out


# -----------------------------------------------------------------------------
# instances that die under the run


def kill_instance(fake, instance_id):
    """The machine is gone: every process that ran the run there is SIGKILLed (they carry its id
    in their environment, from the launcher's run script), and the API reports it terminated."""
    # the run's session first, all at once (its processes share the pane's process group), so
    # that its run script cannot record an exit code as a dying machine never would
    panes = subprocess.run(
        ["tmux", "list-panes", "-t", "=" + tmux_session(instance_id), "-F", "#{pane_pid}"],
        capture_output=True,
        text=True,
    )
    for pid in panes.stdout.split():
        os.killpg(int(pid), signal.SIGKILL)
    kill_marked(f"NANOCHAT_INSTANCE_ID={instance_id}".encode())
    kill_tmux(instance_id)
    fake.set_status(instance_id, "terminated")


def kill_marked(mark):
    """SIGKILL every process whose environment holds `mark`, until none is left."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until none is left: a parent may fork while we kill
        alive = 0
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if mark in environ.read_bytes():  # a dead process's environ reads empty
                    os.kill(int(environ.parent.name), signal.SIGKILL)
                    alive += 1
            except (OSError, ValueError):
                pass  # ended meanwhile, or not ours
        if not alive:
            break
        time.sleep(0.05)


def test_auto_resume_replaces_lost_instances_until_the_cost_cap(env, fake, sshd, project, tmp_path):
    """Every instance dies a moment after it turns active: --auto-resume launches replacements,
    and --max-cost (over all of them) ends the loop."""
    fake.nfs_root = str(tmp_path / "nfs")
    # $3 a second: the cap is reached in seconds, after more than one instance even when a loaded
    # machine takes 10 s to bring the first one up (at $10 a second one CI run never replaced it)
    fake.prices["gpu_8x_h100_sxm5"] = 1_080_000

    def die_once_running(inst):
        def watch():
            session = ["tmux", "has-session", "-t", "=" + tmux_session(inst["id"])]
            deadline = time.monotonic() + 30
            while subprocess.run(session, capture_output=True).returncode != 0:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.05)
            kill_instance(fake, inst["id"])

        threading.Thread(target=watch, daemon=True).start()

    fake.on_active = die_once_running
    flags = ["--auto-terminate", "--auto-resume", "--max-cost", "60", "--command", "sleep 30"]
    proc, out = launcher(
        env, *fs_args("--repo", str(project), *ssh_flags(sshd, tmp_path / "home"), *flags)
    )
    assert proc.returncode == errors.EXIT_RUN_FAILED, out
    assert "--auto-resume: launching a replacement on filesystem runs" in out
    assert "reaches --max-cost $60" in out or "exceeded --max-cost ($60)" in out
    assert 2 <= len(fake.launches()) <= 12 and not fake.running()
    assert all(r["body"]["file_system_names"] == ["runs"] for r in fake.launches())


def extra_sshd(sshd, address):
    """A second "machine": an sshd like the module's, on another loopback address."""
    config = (sshd["dir"] / "sshd_config").read_text()
    config = config.replace("ListenAddress 127.0.0.1", f"ListenAddress {address}")
    config = config.replace(f"PidFile {sshd['dir']}/sshd.pid", f"PidFile {sshd['dir']}/2.pid")
    path = sshd["dir"] / f"sshd_{address}"
    path.write_text(config)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(path)], stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return proc


def skip_the_stages_that_train_nothing(run_dir: Path) -> None:
    """Mark a reference run's evaluation stages done before it starts: no later stage reads what
    they write, so the reference's weights are the same, seconds of process start-up sooner."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stage in ("tok_eval", "base_loss", "eval_mid", "eval_sft", "eval_rl"):
        (run_dir / f".done_{stage}").touch()


# The real orchestrator, shrunk: pretraining long enough (60 steps, a checkpoint every 10) for the
# instance to die inside it.
SMOKE = (
    f"NANOCHAT_PYTHON={sys.executable} OMP_NUM_THREADS=1 bash run_aquarat_small.sh --profile smoke"
    " --no-sync --no-wandb --run fsrun --stage-args 'base=--num-iterations 60 --save-every 10'"
)


def test_instance_dies_mid_stage_and_resume_finishes_the_run_as_if_uninterrupted(
    env, fake, sshd, tmp_path
):
    import torch

    from nanochat.checkpoint import load_checkpoint

    nfs = tmp_path / "nfs"
    fake.nfs_root = str(nfs)
    fake.ip = "127.0.0.2"  # the first instance: a machine of its own, with its own sshd
    first_sshd = extra_sshd(sshd, "127.0.0.2")
    base = nfs / "runs" / "nanochat"
    # the "instances'" disk outside tmp_path: the shipped checkout holds the launcher tests, whose
    # fake secrets the env fixture would find there
    remote = Path(tempfile.mkdtemp(prefix="nodes-remote-"))
    flags = ["--repo", str(REPO_ROOT), *ssh_flags(sshd, remote)]
    flags += ["--auto-terminate", "--command", SMOKE, "--dest", str(tmp_path / "results")]
    # a poll (an SSH session) every 0.5 s, not launch_args' 0.1: the whole run is polled, and each
    # poll's CPU is taken from the run; `resume` polls at the same interval
    flags += ["--poll-interval", "0.5"]
    stale_lock = None
    try:
        proc, reader = start_launcher(env, *fs_args(*flags))
        reader.wait_for("is active at 127.0.0.2")
        fake.ip = "127.0.0.1"  # the next instance answers on the module's sshd
        step = base / "checkpoints" / "base" / "fsrun" / "step_000010" / "meta.json"
        deadline = time.monotonic() + 240
        while not step.exists():
            assert proc.poll() is None and time.monotonic() < deadline, reader.text[-3000:]
            time.sleep(0.01)
        (first,) = fake.running()
        first_sshd.kill()
        kill_instance(fake, first["id"])
        # A network filesystem's server may keep a dead machine's lock: held here in its stead.
        stale_lock = open(base / "runs" / "fsrun" / ".lock", "a")
        deadline = time.monotonic() + 10
        while True:  # a process SIGKILLed a moment ago may still be on its way out
            try:
                fcntl.flock(stale_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the dead instance's processes hold its lock"
                time.sleep(0.05)
        assert proc.wait(timeout=120) == errors.EXIT_RUN_FAILED, reader.text[-3000:]
        reader.thread.join(5)
    finally:
        first_sshd.kill()
        if proc.poll() is None:
            proc.kill()
    lost = [line for line in reader.text.splitlines() if line.startswith("[launch_lambda]")]
    assert lost == [
        f"[launch_lambda] instance {first['id']} is terminated: its run is gone; the run's files "
        "are safe on filesystem runs: go on on a new instance with "
        "`uv run launch_lambda.py resume fsrun`"
    ], reader.text[-3000:]
    proc, out = launcher(env, "resume", "fsrun", "--dest", str(tmp_path / "results"), timeout=600)
    stale_lock.close()
    assert proc.returncode == 0, out[-4000:]
    assert "which the API reports terminated: the pipeline may take it over" in out
    assert "took over the lock of run 'fsrun'" in out
    assert re.search(r"Resuming \S+/checkpoints/base/fsrun from step [1-9]0\b", out), out[-3000:]
    log = (base / "runs" / "fsrun" / "pipeline.log").read_text()
    for done in ("tokenizer", "tok_eval"):
        assert f"[pipeline] {done}: done earlier, skipping" in log
    stages = [json.loads(x)["stage"] for x in (base / "runs" / "fsrun" / "stages.jsonl").open()]
    finished = [s for s in stages if s not in ("data", "base_eval")]
    assert len(finished) == len(set(finished)) == 10, stages  # no stage ran twice
    assert not fake.running() and (tmp_path / "results" / "report").is_dir()

    # the same run, uninterrupted, on this machine
    reference = tmp_path / "reference"
    ref_env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    ref_env["NANOCHAT_BASE_DIR"] = str(reference)
    skip_the_stages_that_train_nothing(reference / "runs" / "fsrun")
    done = subprocess.run(
        ["bash", "-c", SMOKE], cwd=REPO_ROOT, env=ref_env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:]
    ours, _, _ = load_checkpoint(base / "checkpoints" / "rl" / "fsrun")
    theirs, _, _ = load_checkpoint(reference / "checkpoints" / "rl" / "fsrun")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    shutil.rmtree(remote)


# -----------------------------------------------------------------------------
# the orchestrator: the lock of a machine that is gone, and several nodes


def pipeline(args, base, extra_env=None, **kwargs):
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOCHAT_")}
    env.update(NANOCHAT_PYTHON=sys.executable, OMP_NUM_THREADS="1", **(extra_env or {}))
    if base is not None:
        env["NANOCHAT_BASE_DIR"] = str(base)
    cmd = ["bash", str(ORCHESTRATOR), "--profile", "smoke", "--no-sync", "--no-wandb", *args]
    return subprocess.Popen(
        cmd,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )


def test_the_lock_of_a_terminated_instance_is_taken_over_never_a_running_ones(tmp_path):
    run_dir = tmp_path / "runs" / "lk"
    run_dir.mkdir(parents=True)
    (run_dir / "settings").write_text("profile=gpu seed=1\n")  # another run's: stops after the lock
    (run_dir / ".lock_owner").write_text("pid 1 on node-a instance dead0 since then\n")
    with open(run_dir / ".lock", "a") as held:  # the dead machine's lock, kept by the server
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for takeover in (None, "alive1"):
            extra = {"NANOCHAT_LOCK_TAKEOVER": takeover} if takeover else {}
            out = pipeline(["--run", "lk"], tmp_path, extra).communicate(timeout=120)[0]
            assert "run 'lk' is in use by another pipeline (pid 1 on node-a instance dead0" in out
        extra = {"NANOCHAT_LOCK_TAKEOVER": "dead0", "NANOCHAT_INSTANCE_ID": "new2"}
        out = pipeline(["--run", "lk"], tmp_path, extra).communicate(timeout=120)[0]
    assert "took over the lock of run 'lk' from: pid 1 on node-a instance dead0" in out, out
    assert "run 'lk' was made with" in out  # it went on, to the settings check
    assert " instance new2 since " in (run_dir / ".lock_owner").read_text()


def test_several_nodes_need_a_shared_base_dir_and_a_master(tmp_path):
    two = ["--run", "nn", "--nnodes", "2", "--node-rank", "1"]
    for args, base, message in (
        (two, None, "--nnodes 2 needs --master-addr HOST"),
        ([*two, "--master-addr", "h"], None, "needs NANOCHAT_BASE_DIR set to a directory every"),
        (["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], tmp_path, "--node-rank must"),
        ([*two, "--master-addr", "h", "--force"], tmp_path, "redo them with --nnodes 1"),
    ):
        proc = pipeline(args, base)
        out = proc.communicate(timeout=60)[0]
        assert proc.returncode == 2 and message in out, out


# Sizes for two processes (the total batches are multiples of the ranks' micro-batches); pretraining
# long enough for a node to be stopped inside it.
TWO_RANKS = [
    "--stage-args",
    "base=--total-batch-size 1024 --num-iterations 40 --save-every 5",
    "--stage-args",
    "mid=--total-batch-size 8",
    "--stage-args",
    "sft=--total-batch-size 8",
]


def test_two_nodes_of_one_process_equal_one_node_of_two_and_resume_after_one_dies(tmp_path):
    import torch

    from nanochat.checkpoint import load_checkpoint

    port = str(29500 + os.getpid() % 1000)
    node = ["--run", "nodes", *TWO_RANKS, "--nproc", "1", "--nnodes", "2"]
    node += ["--master-addr", "127.0.0.1", "--master-port", port]
    shared = tmp_path / "shared"

    def both():
        # a mark on node 1's processes: torchrun starts its workers in sessions of their own
        second = pipeline([*node, "--node-rank", "1"], shared, {"TEST_NODE": f"one{port}"})
        return pipeline([*node, "--node-rank", "0"], shared), second

    first, second = both()
    ckpt = shared / "checkpoints" / "base" / "nodes"
    deadline = time.monotonic() + 300
    while not (ckpt / "step_000010" / "meta.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()[-3000:]
        time.sleep(0.01)
    kill_marked(f"TEST_NODE=one{port}".encode())  # node 1 is gone, its processes with it
    out0 = first.communicate(timeout=180)[0]
    second.communicate()
    assert first.returncode != 0
    stopped = [line for line in out0.splitlines() if line.startswith("[pipeline] stage base")]
    assert len(stopped) == 1 and "stopped on node 0 of 2" in stopped[0], out0[-3000:]
    first, second = both()  # the same commands again
    out0, out1 = first.communicate(timeout=600)[0], second.communicate(timeout=600)[0]
    assert first.returncode == 0 and second.returncode == 0, out0[-3000:] + out1[-3000:]
    assert "[pipeline] tokenizer: done earlier, skipping" in out1
    assert re.search(r"Resuming \S+/checkpoints/base/nodes from step [1-9]\d*", out0)
    assert "node 1 finished its part; node 0 writes the report" in out1
    assert (shared / "report" / "nodes" / "report.md").is_file()

    skip_the_stages_that_train_nothing(tmp_path / "one" / "runs" / "nodes")
    one = pipeline(["--run", "nodes", *TWO_RANKS, "--nproc", "2"], tmp_path / "one")
    out = one.communicate(timeout=600)[0]
    assert one.returncode == 0, out[-3000:]
    for stage in ("base", "sft", "rl"):
        ours, _, _ = load_checkpoint(shared / "checkpoints" / stage / "nodes")
        theirs, _, _ = load_checkpoint(tmp_path / "one" / "checkpoints" / stage / "nodes")
        assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6) for k in theirs), stage


def test_deploy_hosts_starts_every_node_with_its_rank_node_0_first(
    env, fake, sshd, project, tmp_path
):
    remote = tmp_path / "remote_home"
    common = ["deploy", "--hosts", "127.0.0.1,127.0.0.2", "--repo", str(project)]
    common += ["--ssh-user", sshd["user"], "--ssh-port", str(sshd["port"])]
    common += ["--ssh-key-file", sshd["key"], "--remote-dir", str(remote / "checkout")]
    proc, out = launcher(env, *common, "--", "--run", "two")
    assert proc.returncode == errors.EXIT_USAGE and "needs --remote-base-dir DIR" in out, out
    second = extra_sshd(sshd, "127.0.0.2")
    try:
        flags = [*common, "--remote-base-dir", str(remote / "shared"), "--", "--sleep", "0.2"]
        proc, out = launcher(env, *flags)
        assert proc.returncode == 0, out
        log = remote / "checkout" / ".launcher" / "run.log"
        deadline = time.monotonic() + 30
        while log.read_text().count("pipeline done") < 2:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
    finally:
        second.kill()
    assert out.index("node 0 of 2: 127.0.0.1") < out.index("node 1 of 2: 127.0.0.2")
    started = [line for line in log.read_text().splitlines() if "args:" in line]
    node = "--profile gpu --nnodes 2 --node-rank {} --master-addr 127.0.0.1 --master-port 29500"
    expected = [
        f"pipeline running with base {remote / 'shared'}, args: --sleep 0.2 {node.format(r)}"
        for r in (0, 1)
    ]
    assert sorted(started) == expected, started
    assert not fake.requests  # machines the user has: the Lambda API is not involved


# -----------------------------------------------------------------------------
# launch --nodes N: N new instances with one filesystem, started as `deploy --hosts` starts hosts


def test_the_launchers_parameter_count_is_the_models():
    """The launcher counts the orchestrator's parameters without torch; here, against the model."""
    import torch

    from nanochat.gpt import GPT, config_from_depth
    from nanochat.launcher.interconnect import VOCAB, model_params

    for depth in (1, 7, 8, 11, 20):
        with torch.device("meta"):
            model = GPT(config_from_depth(depth, VOCAB))
        assert model_params(depth) == (model.num_params(), model.num_budget_params()), depth


def ethernet_figures():
    """Depth 20 on two 8x H100 instances, by hand (docs/nodes.md's table)."""
    # width 1280, 10 heads of 128; 12 x 1280^2 per layer; value embeddings on 10 of the 20 layers
    # (a 32 x 10 gate each, a 65,536 x 1280 table each); embedding and lm_head 65,536 x 1280
    tables = 10 * 65536 * 1280
    budget = 20 * 12 * 1280**2 + 10 * 32 * 10 + 2 * 65536 * 1280
    gradients = 4 * (budget + tables)  # fp32 bytes: 5.6 GB
    exchange = 2 * (2 - 1) / 2 * gradients / (100e9 / 8)  # ring all-reduce at 100 Gbit/s
    one = 6 * budget * 524288 / (8 * 989e12 * 0.35)  # one instance at 35% of an H100's peak
    assert (f"{gradients / 1e9:.1f}", f"{exchange:.2f}", f"{one:.2f}") == ("5.6", "0.45", "0.64")
    return [
        "2 instances x $23.92/hour = $47.84/hour",
        "no InfiniBand between them: the nodes exchange their gradients over ethernet",
        "Depth 20 has 1.40 B parameters, 5.6 GB of fp32 gradients",
        "2 x (2-1)/2, 5.6 GB, over each node's link every optimizer step: 0.45 s at an assumed "
        "100 Gbit/s",
        "561 M parameters x 6 FLOPs x 524,288 tokens",
        f"takes {one / 2:.2f} s, so a step takes about {one / 2 + exchange:.2f} s against "
        f"{one:.2f} s on one instance: {(one / 2 + exchange) / one:.1f}x slower",
    ]


def test_launch_nodes_refusals_and_dry_run(env, fake, project):
    for flags, message in (
        (["--nodes", "2"], "--nodes 2 needs --filesystem NAME"),
        (["--nodes", "0"], "--nodes must be 1 or more"),
        (["--nodes", "2", "--filesystem", "runs", "--command", "true"], "instead of --command"),
    ):
        proc, out = launcher(env, *launch_args(*flags))
        assert proc.returncode == errors.EXIT_USAGE and message in out, out
    flags = ["--nodes", "2", "--dry-run", "--repo", str(project), "--", "--depth", "20"]
    proc, out = launcher(env, *fs_args(*flags))
    assert proc.returncode == 0, out
    assert "launch 2 x gpu_8x_h100_sxm5 in region us-west-1" in out
    assert "--nnodes 2 --node-rank R --master-addr <node 0's private IP>" in out
    assert "cost:      $47.84/hour; 1 h = $47.84" in out
    for figure in ethernet_figures():
        assert figure in out, figure
    assert not fake.launches() and not fake.filesystems


# The loopback "machines" share one disk, so both nodes' runs write one .launcher/ of the checkout:
# like torchrun's rendezvous, node 0 waits for node 1 to join (through the shared base dir), so
# that node 1's start never clears an exit code node 0 already wrote.
NODES_PIPELINE = r"""#!/usr/bin/env bash
args="$*"
while [ $# -gt 0 ]; do
  case "$1" in --node-rank) rank=$2; shift ;; --master-addr) master=$2; shift ;; esac; shift
done
echo "pipeline running with base $NANOCHAT_BASE_DIR, args: $args"
joined="$NANOCHAT_BASE_DIR/joined_$master" done="$NANOCHAT_BASE_DIR/done_$master"
[ "$rank" = 1 ] && touch "$joined"
wait_for() { for _ in $(seq 300); do [ -e "$1" ] && return; sleep 0.05; done; exit 1; }
if [ "$rank" = 0 ]; then
  wait_for "$joined"; mkdir -p "$NANOCHAT_BASE_DIR/report"; touch "$done"
else
  wait_for "$done"
fi
echo "pipeline done"
"""


def test_launch_nodes_starts_node_0_first_terminates_all_and_resumes_on_as_many(
    env, fake, sshd, project, tmp_path
):
    (project / "run_aquarat_small.sh").write_text(NODES_PIPELINE)
    nfs = tmp_path / "nfs"
    fake.nfs_root = str(nfs)
    fake.ips = ["127.0.0.1", "127.0.0.2"] * 2  # the launch's two instances, then resume's two
    remote = tmp_path / "remote_home"
    flags = ["--nodes", "2", "--repo", str(project), *ssh_flags(sshd, remote), "--auto-terminate"]
    flags += ["--dest", str(tmp_path / "results"), "--", "--depth", "20", "--run", "two"]
    second = extra_sshd(sshd, "127.0.0.2")
    try:
        proc, out = launcher(env, *fs_args(*flags))
        assert proc.returncode == 0, out
        first = fake.launches()
        resumed, out2 = launcher(env, "resume", "two", "--dest", str(tmp_path / "results2"))
    finally:
        second.kill()
    for figure in ethernet_figures():
        assert figure in out, figure
    assert out.index("$47.84/hour") < out.index("Launching gpu_8x_h100_sxm5")  # said first
    assert len(first) == 2 and not fake.running()
    for r in first:
        assert (
            r["body"]["file_system_names"] == ["runs"] and r["body"]["region_name"] == "us-west-1"
        )
    assert out.index("node 0 of 2: 127.0.0.1") < out.index("node 1 of 2: 127.0.0.2")
    ids = [i["id"] for i in fake.instances.values()]
    assert f"Terminated {ids[0]}, {ids[1]} after" in out
    records = state_of(env)
    assert [records[i]["node_rank"] for i in ids[:2]] == [0, 1]
    assert all(records[i]["nodes"] == ids[:2] for i in ids[:2])
    log = (remote / "nanochat-aquarat" / ".launcher" / "run.log").read_text()
    node = (
        f"pipeline running with base {nfs / 'runs' / 'nanochat'}, args: --depth 20 --run two "
        "--profile gpu --gpu-hourly-price 47.84 --nnodes 2 --node-rank {} "
        "--master-addr 10.0.0.{} --master-port 29500"
    )
    started = [line for line in log.splitlines() if "args:" in line]
    # master: node 0's private address as the API reports it (10.0.0.2; resume's node 0: .4)
    assert started == [node.format(r, m) for m in (2, 4) for r in (0, 1)], started
    # resume: two new instances in the filesystem's region, the same run, terminated after it
    assert resumed.returncode == 0, out2
    assert "on 2 new gpu_8x_h100_sxm5 in us-west-1 with filesystem runs" in out2
    assert len(fake.launches()) == 4 and not fake.running()
    assert f"Terminated {ids[2]}, {ids[3]} after" in out2
