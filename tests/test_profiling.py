"""The profiler window: when it starts and stops, and a real trace of a jitted function."""

import glob
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from unialign_jax import profiling


@pytest.fixture
def calls(monkeypatch):
    """Records start_trace/stop_trace instead of tracing."""
    recorded = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda directory: recorded.append(("start", directory)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: recorded.append(("stop",)))
    return recorded


def run(window, steps, recorded):
    """The step at which each start/stop happened, for steps `steps`."""
    events = []

    def note(when, call):
        before = len(recorded)
        call()
        events.extend((name, when) for name, *_ in recorded[before:])

    for step in steps:
        note(step, lambda: window.step(step))
    note("close", window.close)
    return events


def test_window_traces_its_steps_once(calls, tmp_path):
    window = profiling.ProfileWindow(3, 2, tmp_path)
    assert run(window, range(1, 8), calls) == [("start", 3), ("stop", 5)]
    assert calls[0] == ("start", os.fspath(tmp_path))
    assert run(window, range(1, 8), calls) == []  # a later stage counting from 1 again


def test_run_ending_or_resuming_inside_the_window(calls, tmp_path):
    assert run(profiling.ProfileWindow(3, 10, tmp_path), range(1, 6), calls) == [("start", 3), ("stop", "close")]
    assert run(profiling.ProfileWindow(3, 4, tmp_path), range(5, 9), calls) == [("start", 5), ("stop", 7)]
    assert run(profiling.ProfileWindow(3, 4, tmp_path), range(8, 12), calls) == []


def test_from_config(tmp_path):
    assert isinstance(profiling.from_config(None, tmp_path), profiling.NoProfile)
    off = ml_collections.ConfigDict({"start_step": 10, "num_steps": 0})
    assert isinstance(profiling.from_config(off, tmp_path), profiling.NoProfile)
    window = profiling.from_config({"start_step": 10, "num_steps": 5}, tmp_path)
    assert (window.start_step, window.stop_step, window.directory) == (10, 15, tmp_path / "profile")
    with pytest.raises(ValueError, match=r"unknown: \['steps'\], missing: \['num_steps'\]"):
        profiling.from_config({"start_step": 10, "steps": 5}, tmp_path)


@pytest.mark.parametrize("start_step, num_steps, field", [(0, 5, "start_step"), (1, -1, "num_steps")])
def test_bad_window_names_the_field(start_step, num_steps, field, tmp_path):
    with pytest.raises(ValueError, match=f"profile.{field} must be >= 1"):
        profiling.ProfileWindow(start_step, num_steps, tmp_path)


def test_trace_of_a_jitted_step_is_written(tmp_path):
    step_fn = jax.jit(lambda x: jnp.tanh(x @ x.T))
    x = jnp.ones((8, 8))
    with profiling.from_config({"start_step": 2, "num_steps": 2}, tmp_path) as window:
        for step in range(1, 5):
            window.step(step, ready=x)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                x = step_fn(x)
        assert window.done
    (path,) = glob.glob(os.path.join(tmp_path, "profile", "**", "*.xplane.pb"), recursive=True)
    profile = jax.profiler.ProfileData.from_file(path)
    traced = {dict(event.stats)["step_num"] for plane in profile.planes for line in plane.lines
              for event in line.events if event.name == "train"}
    assert traced == {2, 3}
