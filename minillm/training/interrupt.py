"""Stopping a one-process run cleanly: the first Ctrl-C (or SIGTERM, what a scheduler sends before it kills a
job) asks the loop to finish its step, save a checkpoint and exit; a second one stops at once.

Why: without it, Ctrl-C threw away everything since the last checkpoint (up to `save_every` steps, 1,000 in the
base recipes). The step in flight is finished rather than cut, so the checkpoint is an ordinary one and
`--resume latest` continues exactly as after any other.

Only in one process started directly from the shell (`minillm pretrain`): with several, each rank would see the
signal at a slightly different step and would enter the checkpoint's collectives out of step with the others; and
under a launcher (`--launcher`, `accelerate launch`, torchrun), the launcher stopped by Ctrl-C does not wait for
its child, which would then stop in the background, orphaned and out of reach of a second Ctrl-C. There the signal
keeps its default effect, and a run resumes from its last periodic checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# set in a process started by a launcher: minillm's --launcher re-run, torchrun / DeepSpeed, any `accelerate launch`
# (the last one is also accelerate's setting for a shell: exported there, Ctrl-C keeps its default effect)
LAUNCHER_ENV = ("MINILLM_LAUNCHED", "LOCAL_RANK", "ACCELERATE_MIXED_PRECISION")


def started_directly() -> bool:
    """Whether this process was started by the user's shell rather than by a launcher."""
    return not any(name in os.environ for name in LAUNCHER_ENV)


class StopRequest:
    """A context manager: while active, the first SIGINT/SIGTERM sets `requested` (and calls `on_request` once);
    the second raises KeyboardInterrupt where the program is. Inactive (a no-op) when `enabled` is false or
    outside the main thread, where Python cannot install signal handlers."""

    def __init__(self, enabled: bool, on_request: Callable[[str], None] | None = None) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.on_request = on_request
        self.requested: str | None = None  # the signal's name once one arrived
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        if self.on_request is not None:
            self.on_request(self.requested)

    def __enter__(self) -> StopRequest:
        if self.enabled:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():  # None: set outside Python, not restorable; the default instead
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
