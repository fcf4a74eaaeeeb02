"""One node over SSH: every remote action is a real `ssh` subprocess, with the launcher's own
known_hosts and never a prompt."""

import shlex
import subprocess
import time
from pathlib import Path

from nanochat.launcher.errors import EXIT_CONFIG, EXIT_DEPLOY, EXIT_NOT_READY, LaunchError


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


# -----------------------------------------------------------------------------
# Can ssh use the key without asking? Checked before launching: every ssh here runs with
# BatchMode=yes (a prompt would hang an unattended run), so a key with a passphrase that no agent
# holds never connects, and the instance would bill until the SSH wait gave up.


def key_id(public_key):
    """'type base64' of an OpenSSH public key line, without its comment."""
    return " ".join((public_key or "").split()[:2])


def agent_keys():
    """The public keys ssh-agent holds (empty without an agent)."""
    try:
        proc = subprocess.run(["ssh-add", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    if proc.returncode != 0:
        return set()
    return {key_id(line) for line in proc.stdout.splitlines() if line.strip()}


def default_key_files():
    """The identity files ssh tries by itself (`ssh -G` applies the user's ssh config)."""
    try:
        out = subprocess.run(
            ["ssh", "-G", "lambda-node.invalid"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        out = ""
    prefix = "identityfile "
    files = [line[len(prefix) :] for line in out.splitlines() if line.startswith(prefix)]
    if not files:
        files = [f"~/.ssh/id_{kind}" for kind in ("rsa", "ecdsa", "ed25519")]
    return [Path(f).expanduser() for f in files if Path(f).expanduser().is_file()]


def read_key(path):
    """(public key id, needs a passphrase?) of a private key file. An unencrypted key yields its
    public key; an encrypted one yields the .pub beside it, if any."""
    proc = subprocess.run(
        ["ssh-keygen", "-y", "-P", "", "-f", str(path)], capture_output=True, text=True, timeout=10
    )
    if proc.returncode == 0:
        return key_id(proc.stdout), False
    pub = Path(f"{path}.pub")
    return (key_id(pub.read_text()) if pub.is_file() else None), True


def check_key_usable(key_file, account_key_name, account_public_key):
    """Raise LaunchError when the key for the node certainly needs a passphrase that no agent
    holds; warn when no local key matches the account's key (it may live elsewhere, e.g. on a
    hardware token)."""
    loaded = agent_keys()
    files = [Path(key_file)] if key_file else default_key_files()
    usable, locked = set(loaded), []
    for path in files:
        public, needs_passphrase = read_key(path)
        if not needs_passphrase:
            usable.add(public)
        elif public not in loaded:
            locked.append((path, public))
    account = key_id(account_public_key)
    if account and account in usable:
        return
    hint = (
        "ssh runs without prompts (BatchMode), so this key could never log in and the instance "
        "would bill until the SSH wait gave up. Load it into your agent first: ssh-add {path} "
        "(macOS: ssh-add --apple-use-keychain {path}), then launch again."
    )
    for path, public in locked:
        if (account and public == account) or (key_file and public is None and not loaded):
            raise LaunchError(
                f"{path} has a passphrase and is not loaded in ssh-agent. "
                + hint.format(path=path),
                EXIT_CONFIG,
            )
    if not usable and locked:
        names = ", ".join(str(path) for path, _ in locked)
        raise LaunchError(
            f"every SSH key here needs a passphrase and none is loaded in ssh-agent ({names}). "
            + hint.format(path=locked[0][0]),
            EXIT_CONFIG,
        )
    if account:
        print(
            f"warning: no SSH key here matches the account's key '{account_key_name}' "
            f"({account[:40]}...); pass --ssh-key-file with its private key if ssh is refused"
        )
