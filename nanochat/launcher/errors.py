"""Exit codes (one per kind of failure, listed in --help and QUICKSTART.md) and the error that
carries one up to main()."""

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3  # missing/rejected keys, bad flags, no SSH key, unknown instance type
EXIT_API = 4  # API error that retries did not fix (quota, invalid parameters, outage)
EXIT_NO_CAPACITY = 5  # no capacity for the type/region (after --wait-capacity, if given)
EXIT_NOT_READY = 6  # instance never became active, or SSH never answered
# an SSH step failed: no GPU listed, shipping code, writing .env, starting tmux, reading logs,
# fetching
EXIT_DEPLOY = 7
EXIT_RUN_FAILED = 8  # the remote command exited non-zero, vanished, or exceeded --max-hours
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM / SIGHUP

EXIT_CODES_HELP = (
    "exit codes: 0 ok, 1 unexpected error, 2 usage, 3 config/credentials, 4 API error,\n"
    "  5 no capacity, 6 instance/SSH never ready, 7 deploy/transfer over SSH failed, "
    "8 remote run failed,\n"
    "  130 interrupted.\n"
    "Every failure after a successful launch terminates the instance unless --keep-on-failure."
)


class LaunchError(Exception):
    """A failure with a message for the user and the exit code that names it."""

    def __init__(self, message, exit_code=EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class InstanceLost(LaunchError):
    """The instance under a run died: the API reports it gone or unhealthy, or it stopped
    answering. What the run wrote to a persistent filesystem survives it (`resume`)."""
