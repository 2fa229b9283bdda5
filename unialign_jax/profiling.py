"""A window of training steps traced by the JAX profiler, into `workdir/profile/` (view with
TensorBoard's or XProf's profile plugin). Every process traces itself; the trace files carry the
host name.

The training loop calls `window.step(step)` before running each step and `window.close()` at the
end; the window traces steps `start_step .. start_step + num_steps - 1` once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

FIELDS = ("start_step", "num_steps")


class ProfileWindow:
    """Traces `num_steps` steps from `start_step` into `directory`.

    A run resumed inside the window traces the rest of it; one resumed after it traces nothing.
    """

    def __init__(self, start_step: int, num_steps: int, directory: epath.PathLike):
        if start_step < 1:
            raise ValueError(f"profile.start_step must be >= 1 (the first step), got {start_step}.")
        if num_steps < 1:
            raise ValueError(f"profile.num_steps must be >= 1, got {num_steps}.")
        self.start_step = int(start_step)
        self.stop_step = int(start_step) + int(num_steps)
        self.directory = epath.Path(directory)
        self.tracing = False
        self.done = False

    def step(self, step: int, *, ready: Any = None) -> None:
        """Call before running step `step`. `ready`: arrays the previous step produced (the train
        state); the window waits for them before it stops, so the trace holds the last step's device
        work."""
        if self.tracing and step >= self.stop_step:
            jax.block_until_ready(ready)
            self._stop()
        elif not self.tracing and not self.done and self.start_step <= step < self.stop_step:
            jax.profiler.start_trace(os.fspath(self.directory))
            self.tracing = True

    def close(self) -> None:
        """Stops a trace that is still running (a run that ended inside the window)."""
        if self.tracing:
            self._stop()

    def _stop(self) -> None:
        jax.profiler.stop_trace()
        self.tracing = False
        self.done = True

    def __enter__(self) -> ProfileWindow:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class NoProfile:
    """The window of a run that is not profiled: does nothing."""

    def step(self, step: int, *, ready: Any = None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> NoProfile:
        return self

    def __exit__(self, *exc_info) -> None:
        pass


def from_config(profile: Mapping[str, int] | None, workdir: epath.PathLike) -> ProfileWindow | NoProfile:
    """The window of `profile` (`{"start_step": s, "num_steps": n}`, a dict or ConfigDict) into
    `workdir/profile/`; `None` or `num_steps=0` (profiling off) gives a `NoProfile`."""
    if profile is None:
        return NoProfile()
    unknown = sorted(set(profile.keys()) - set(FIELDS))
    missing = [name for name in FIELDS if name not in profile.keys()]
    if unknown or missing:
        raise ValueError(
            f"profile takes the fields {', '.join(FIELDS)}; unknown: {unknown or 'none'}, missing: {missing or 'none'}."
        )
    if profile["num_steps"] == 0:
        return NoProfile()
    return ProfileWindow(profile["start_step"], profile["num_steps"], epath.Path(workdir) / "profile")
