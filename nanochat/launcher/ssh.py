"""One node over SSH: every remote action is a real `ssh` subprocess, with the launcher's own
known_hosts and never a prompt."""

import shlex
import subprocess
import time
from pathlib import Path

from nanochat.launcher.errors import EXIT_DEPLOY, EXIT_NOT_READY, LaunchError


def home_relative(path):
    """Remote paths are absolute or relative to the remote home; '~/x' means 'x' (ssh starts in
    $HOME)."""
    if path in ("~", "~/"):
        return "."
    return path[2:] if path.startswith("~/") else path


def shown(path):
    """How a remote path reads in messages: '~/x' for home-relative ones."""
    path = home_relative(path)
    return path if path.startswith("/") else "~/" + path.removeprefix("./")


class Remote:
    def __init__(self, host, user, port, key_file, known_hosts, connect_timeout=10):
        self.host = host
        self.user = user
        self.port = int(port)
        self.key_file = key_file
        self.known_hosts = Path(known_hosts)
        self.connect_timeout = int(connect_timeout)

    @property
    def target(self):
        return f"{self.user}@{self.host}"

    def options(self, batch=True):
        settings = [
            # Host keys: trusted on first use and recorded in the launcher's own known_hosts;
            # a key that changes later is refused.
            f"UserKnownHostsFile={self.known_hosts}",
            "StrictHostKeyChecking=accept-new",
            f"ConnectTimeout={self.connect_timeout}",
            # A dead connection is noticed within a minute instead of hanging a poll forever.
            "ServerAliveInterval=15",
            "ServerAliveCountMax=4",
            "LogLevel=ERROR",
        ]
        if batch:
            settings.append("BatchMode=yes")  # never hang on a password/passphrase prompt
        if self.key_file:
            settings.append("IdentitiesOnly=yes")  # offer this key, not every key in the agent
        opts = []
        for setting in settings:
            opts += ["-o", setting]
        if self.key_file:
            opts += ["-i", str(self.key_file)]
        return opts

    def ssh_argv(self, command=None, batch=True, tty=False):
        argv = ["ssh", "-p", str(self.port), *self.options(batch)]
        if tty:
            argv.append("-t")
        argv.append(self.target)
        return argv + ([command] if command else [])

    def human_command(self):
        """The ssh command a user would type to reach the node."""
        parts = ["ssh"]
        if self.key_file:
            parts += ["-i", str(self.key_file)]
        if self.port != 22:
            parts += ["-p", str(self.port)]
        return shlex.join(parts + [self.target])

    def run(self, command, input_text=None, stdin=None, timeout=None, check=True, capture=True):
        if input_text is None and stdin is None:
            stdin = subprocess.DEVNULL  # never let ssh swallow the terminal's keystrokes
        proc = subprocess.run(
            self.ssh_argv(command),
            input=input_text.encode() if input_text is not None else None,
            stdin=stdin,
            capture_output=capture,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            err = (proc.stderr or b"").decode(errors="replace").strip()[-500:]
            raise LaunchError(
                f"ssh {self.target} failed (exit {proc.returncode}): {err or 'no output'}",
                EXIT_DEPLOY,
            )
        return proc

    def forget_host(self):
        """A new instance may reuse an IP whose old host key we recorded: forget it before the
        first contact, or accept-new would refuse the new machine."""
        if not self.known_hosts.exists():
            return
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        subprocess.run(["ssh-keygen", "-R", name, "-f", str(self.known_hosts)], capture_output=True)

    def wait_ready(self, timeout, poll):
        """Waits until sshd accepts our key: an instance is "active" before its sshd is up."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                proc = self.run("true", check=False, timeout=self.connect_timeout + 10)
                if proc.returncode == 0:
                    return
                last = proc.stderr.decode(errors="replace").strip()
            except subprocess.TimeoutExpired:
                last = "ssh timed out"
            if time.monotonic() >= deadline:
                raise LaunchError(
                    f"SSH to {self.target} port {self.port} never answered within {timeout:.0f}s "
                    f"(last error: {last or 'none'})",
                    EXIT_NOT_READY,
                )
            last_line = last.splitlines()[-1] if last else "no answer"
            print(f"  waiting for sshd on {self.host}:{self.port} ... ({last_line})")
            time.sleep(poll)
