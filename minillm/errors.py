"""User-facing errors.

Anything the user can fix (a bad path, a bad option, a mismatched data file) is raised as `UserError`. The CLI
prints its message as one line on stderr and exits with code 2 — no traceback. Library callers can catch it like
any other exception.
"""


class UserError(Exception):
    """An error caused by the user's input; its message is one line that says what is wrong and where."""


class TrainingStopped(Exception):
    """A run stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint; the message says how to continue.
    The CLI prints it as one line and exits with the signal's conventional code (`exit_code`: 130, 143)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
