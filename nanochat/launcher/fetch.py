"""Bring a run's results home: the report, runs/ metrics (with the runs' own tokenizers), the
tokenizer (needed to use the checkpoints), the last complete checkpoint step of every stage/tag,
and the run log. rsync when this machine has it, else tar over ssh."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

from nanochat.launcher.errors import EXIT_DEPLOY, LaunchError
from nanochat.launcher.ssh import home_relative


def default_dest(instance_id):
    return Path("lambda-results") / instance_id


def fetch_artifacts(remote, remote_dir, remote_base_dir, dest):
    base = home_relative(remote_base_dir)
    paths = artifacts_to_fetch(remote, base)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    listed = ", ".join(paths) if paths else f"(no artifacts found under {base})"
    print(f"Fetching into {dest}: {listed}")
    if paths and shutil.which("rsync"):
        copy_with_rsync(remote, base, paths, dest)
    elif paths:  # no local rsync (e.g. a bare Windows laptop)
        copy_with_tar(remote, base, paths, dest)
    log = remote.run(f"cat {shlex.quote(home_relative(remote_dir))}/.launcher/run.log", check=False)
    if log.returncode == 0:
        (dest / "run.log").write_bytes(log.stdout)
    return dest


def artifacts_to_fetch(remote, base):
    """Paths relative to the remote base dir: what exists of report/, runs/, tokenizer/, then one
    checkpoint step directory per stage/tag."""
    listing = remote.run(
        f"cd {shlex.quote(base)} 2>/dev/null || exit 0; "
        "for p in report runs tokenizer; do [ -e $p ] && echo $p; done; "
        "ls checkpoints/*/*/step_*/meta.json 2>/dev/null; true"
    )
    listing = listing.stdout.decode().split()
    others = [p for p in listing if not p.startswith("checkpoints/")]
    return others + last_complete_steps(listing)


def last_complete_steps(listing):
    """The highest step_N under each checkpoints/<stage>/<tag>/ that has its meta.json. The save
    writes meta.json last, so a step without one was killed midway and is skipped."""
    last = {}
    for path in listing:
        if not (path.startswith("checkpoints/") and path.endswith("/meta.json")):
            continue
        step_dir = path.rpartition("/")[0]
        parent, _, leaf = step_dir.rpartition("/")
        if re.fullmatch(r"step_\d+", leaf):
            last[parent] = max(last.get(parent, step_dir), step_dir, key=step_number)
    return sorted(last.values())


def step_number(step_dir):
    return int(step_dir.rsplit("_", 1)[1])


def copy_with_rsync(remote, base, paths, dest):
    ssh_cmd = shlex.join(["ssh", "-p", str(remote.port), *remote.options()])
    proc = subprocess.run(
        [
            "rsync",
            "-a",
            "-r",
            "--files-from=-",
            "-e",
            ssh_cmd,
            f"{remote.target}:{base}/",
            f"{dest}/",
        ],
        input="\n".join(paths).encode(),
        capture_output=True,
    )
    if proc.returncode != 0:
        raise LaunchError(
            f"rsync failed: {proc.stderr.decode(errors='replace')[-500:]}", EXIT_DEPLOY
        )


def copy_with_tar(remote, base, paths, dest):
    tar = subprocess.Popen(
        remote.ssh_argv(f"cd {shlex.quote(base)} && tar -cf - -- {shlex.join(paths)}"),
        stdout=subprocess.PIPE,
    )
    untar = subprocess.run(["tar", "-xf", "-", "-C", str(dest)], stdin=tar.stdout)
    tar.stdout.close()
    if tar.wait() != 0 or untar.returncode != 0:
        raise LaunchError("fetching artifacts with tar over ssh failed", EXIT_DEPLOY)
