"""`UserError`: the base of every error a user can fix (a config value, a path, an input file).

The CLIs (`unialign_jax.cli`) print a `UserError` as one `error: ...` line, with its hint, and exit
2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in what the user gave; the message names it. `hint` says what to do instead."""

    hint: str = ""


class Interrupted(Exception):
    """A run stopped on a signal after saving its state (SIGTERM: preemption; SIGINT: Ctrl-C)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
