"""What this laptop launched (never secrets): instances.json (mode 600) and the launcher's own
known_hosts, in LAMBDA_LAUNCHER_STATE_DIR or ~/.config/nanochat-aquarat."""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from nanochat.files import atomic_path
from nanochat.launcher.errors import EXIT_CONFIG, LaunchError


def timestamp():
    return datetime.now(timezone.utc).isoformat()


def hours_since(iso_timestamp):
    elapsed = datetime.now(timezone.utc) - datetime.fromisoformat(iso_timestamp)
    return elapsed.total_seconds() / 3600


class State:
    def __init__(self, directory=None):
        config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        default = config_home / "nanochat-aquarat"
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
            ) from e

    def get(self, instance_id):
        return self.load().get(instance_id)

    def update(self, instance_id, **fields):
        data = self.load()
        data.setdefault(instance_id, {"id": instance_id}).update(fields)
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Replaced whole, so a crash never leaves a half-written record of a billed instance;
        # created 600 because it names the instances and IPs of the account.
        with atomic_path(self.path) as tmp:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=2, sort_keys=True)
        os.chmod(self.path, 0o600)
