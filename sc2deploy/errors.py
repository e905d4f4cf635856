"""The one exception type for mistakes a user can fix: the CLI prints it without a traceback."""


class UserError(Exception):
    """Bad input: the message names the problem and the fix. CLI exit code 2 unless `exit_code` says otherwise."""

    exit_code = 2
