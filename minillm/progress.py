"""Progress bars of the commands whose output is a result on stdout or a summary line (data builders, evaluation).

A rich bar on stderr, gone when done (`transient`), and shown only when stderr is a terminal: a finished transient
bar still leaves an empty line, which a log file or a pipe should not get. The trainer's own bar is not one of
these: it is the run's output, on stdout, and stays.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import Progress, ProgressColumn


def stderr_progress(*columns: str | ProgressColumn, enabled: bool = True) -> Progress:
    """A transient progress bar with `columns` on stderr; disabled unless `enabled` and stderr is a terminal."""
    console = Console(stderr=True)
    return Progress(*columns, console=console, transient=True, disable=not enabled or not console.is_terminal)
