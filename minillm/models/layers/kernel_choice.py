"""A kernel choice that a block of code or a whole process can pin, by name.

The mechanism behind `force_attention_backend` / `MINILLM_ATTENTION_BACKEND` (layers/attention.py) and
`force_cpu_matmul` / `MINILLM_CPU_MATMUL` (layers/linear.py): `force(name)` pins the choice for a `with` block (tests
and benchmarks), the environment variable for the process (users), and `pinned()` says which, if any, applies now.
`check_environment()` checks every choice's variable at once, so a command can refuse a misspelt one before it
writes anything.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from minillm.errors import UserError

_ALL: list[KernelChoice] = []  # every choice made, for `check_environment`


class KernelChoice:
    """One of `choices`, pinned by `force(...)` first, then by the environment variable `env_var`; else None.

    Args:
        what: what is chosen, for messages ("attention backend").
        env_var: the environment variable that pins it for a process.
        choices: the known names.
    """

    def __init__(self, what: str, env_var: str, choices: tuple[str, ...]) -> None:
        self.what = what
        self.env_var = env_var
        self.choices = choices
        self._forced: str | None = None
        _ALL.append(self)

    @contextlib.contextmanager
    def force(self, name: str | None) -> Iterator[None]:
        """Pin `name` inside this block (None: nothing forced; the environment variable or the default decides)."""
        if name is not None and name not in self.choices:
            raise ValueError(f"unknown {self.what} {name!r}; known: {', '.join(self.choices)}")
        previous, self._forced = self._forced, name
        try:
            yield
        finally:
            self._forced = previous

    def pinned(self) -> str | None:
        """The forced name, else the environment variable's (a UserError when it names no known choice), else None."""
        name = self._forced or os.environ.get(self.env_var) or None
        if name is not None and name not in self.choices:
            raise UserError(f"{self.env_var}={name!r}: known backends are {', '.join(self.choices)}")
        return name


def check_environment() -> None:
    """Raise the UserError of the first kernel-choice environment variable that names no known choice."""
    for choice in _ALL:
        choice.pinned()
