"""The one error type for bad input, and the exit status the ``minorsft`` command turns it into.

Everything below the command line raises ``UsageError`` (naming the flag, key, file or row) before any work is
done; ``cli.main`` prints it after the subcommand's name and exits with its ``exit_code``. It is a ``ValueError``,
so LLaMA-Factory's own argument parsing, which refuses bad values with ``ValueError``, treats the plugin's checks
like its own.
"""


class UsageError(ValueError):
    """An argument, file or row the command cannot use: exit status 2.

    ``reason`` says what is wrong; ``remedy``, where given, the way out. The message is both, and a caller that
    says the ways out once for many errors (the sweep) reads ``reason`` alone."""

    exit_code = 2

    def __init__(self, reason: str, remedy: str = ""):
        super().__init__(f"{reason}; {remedy}" if remedy else reason)
        self.reason = reason
        self.remedy = remedy


class Unreachable(UsageError):
    """Data or a model that is not here and cannot be fetched (offline, or the Hub unreachable): exit status 3."""

    exit_code = 3
