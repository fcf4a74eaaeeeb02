"""The run's base dir on a Lambda persistent filesystem (`launch --filesystem NAME`).

A filesystem outlives every instance that mounts it, so a run whose data, tokenizer, checkpoints,
markers and report live there can go on on a new instance (`resume`) after its own one died, and
every node of a multi-node run sees the same files. The checkout and its .venv stay on the
instance's local disk: they are rebuilt in minutes, and a shared .venv would be slow to import.
"""

import re
import shlex

from nanochat.launcher.api import ApiError, LambdaAPI, api_failure
from nanochat.launcher.errors import EXIT_CONFIG, EXIT_NO_CAPACITY, EXIT_USAGE, LaunchError
from nanochat.launcher.ssh import home_relative

# FilesystemCreateRequest.name in the API spec
NAME_PATTERN = re.compile(r"[a-zA-Z]+[0-9a-zA-Z-]*")
BASE_SUBDIR = "nanochat"  # NANOCHAT_BASE_DIR is this directory of the filesystem
GONE_OR_UNKNOWN = ("terminated", "terminating", "preempted", "not found")


def check_name(name):
    if not (NAME_PATTERN.fullmatch(name) and len(name) <= 60):
        raise LaunchError(
            f"--filesystem {name!r}: Lambda filesystem names start with a letter, then letters, "
            "digits and '-', at most 60 characters (e.g. nanochat-runs)",
            EXIT_USAGE,
        )


def find(api, name):
    try:
        return next((fs for fs in api.filesystems() if fs["name"] == name), None)
    except ApiError as e:
        raise api_failure(e, "listing filesystems") from e


def prepare(api, args, types, create=True):
    """The filesystem args.filesystem names, created (after saying so) if it does not exist yet;
    args.region becomes its region. A region that differs from an existing filesystem's is
    refused, naming both: an instance can only mount a filesystem of its own region."""
    fs = find(api, args.filesystem)
    if fs is not None:
        region = fs["region"]["name"]
        if args.region not in ("auto", region):
            raise LaunchError(
                f"filesystem {args.filesystem} is in region {region}, but --region asks for "
                f"{args.region}: an instance can only mount a filesystem of its own region. "
                f"Use --region {region} (or auto), or another --filesystem name.",
                EXIT_CONFIG,
            )
        print(f"Filesystem {args.filesystem} ({region}) holds the run: {fs['mount_point']}")
        args.region = region
        return fs
    region = args.region
    if region == "auto":
        with_capacity = [
            r["name"] for r in types[args.instance_type]["regions_with_capacity_available"]
        ]
        if not with_capacity:
            raise LaunchError(
                f"filesystem {args.filesystem} does not exist yet, and no region has capacity "
                f"for {args.instance_type} now to create it in: pass --region",
                EXIT_NO_CAPACITY,
            )
        region = with_capacity[0]
    args.region = region
    if not create:
        print(f"  filesystem: {args.filesystem} does not exist: it would be created in {region}")
        return None
    print(
        f"Filesystem {args.filesystem} does not exist: creating it in {region} (it is billed by "
        "the GB-month until you delete it in the Lambda console; it outlives every instance)."
    )
    try:
        return api.create_filesystem(args.filesystem, region)
    except ApiError as e:
        if e.code == "global/duplicate":  # a retried create whose first answer was lost
            return find(api, args.filesystem)
        raise api_failure(e, f"creating filesystem {args.filesystem}") from e


def base_dir(fs, instance):
    """NANOCHAT_BASE_DIR on the instance: under the filesystem's mount point there (the
    instance's own mounts say where, when the launch chose one)."""
    mount = fs["mount_point"]
    for entry in instance.get("file_system_mounts", []):
        if entry["file_system_id"] == fs["id"]:
            mount = entry["mount_point"]
    return f"{mount.rstrip('/')}/{BASE_SUBDIR}"


def run_name(command):
    """The --run of the pipeline command (its default otherwise)."""
    words = shlex.split(command)
    for i, word in enumerate(words[:-1]):
        if word == "--run":
            return words[i + 1]
    return next((w.split("=", 1)[1] for w in words if w.startswith("--run=")), "aquarat_small")


def instance_status(api, instance_id):
    try:
        return api.instance(instance_id)["status"]
    except ApiError as e:
        if e.code == LambdaAPI.NOT_FOUND:
            return "not found"
        raise api_failure(e, f"looking up instance {instance_id}") from e


def lock_to_take_over(api, remote, base, run, this_instance, node_rank=0):
    """The instance id recorded with the run's lock on the filesystem, when the API reports that
    instance gone: the pipeline may then set its lock aside (a network filesystem can keep a dead
    machine's lock). Never one the API still lists as running: that pipeline may be alive. Node
    R > 0 of a run on several holds a lock of its own (the orchestrator's `.lock_node<R>`)."""
    suffix = f"_node{node_rank}" if node_rank else ""
    owner = f"runs/{shlex.quote(run)}/.lock_owner{suffix}"
    owner_file = f"{shlex.quote(home_relative(base))}/{owner}"
    proc = remote.run(f"cat {owner_file} 2>/dev/null; true")
    match = re.search(r" instance (\S+) ", proc.stdout.decode(errors="replace"))
    if not match or match.group(1) in ("none", this_instance):
        return None
    owner = match.group(1)
    status = instance_status(api, owner)
    if status in GONE_OR_UNKNOWN:
        print(
            f"The run's lock was last held by instance {owner}, which the API reports {status}: "
            "the pipeline may take it over."
        )
        return owner
    print(
        f"note: the run's lock names instance {owner}, which is still {status}: if its pipeline "
        "still runs, this one will refuse to start (terminate that instance first)."
    )
    return None
