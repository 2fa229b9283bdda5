"""The loop of ONE stage, method-agnostic: mesh -> data -> init/resume -> jit step -> loop -> checkpoints.

A method (`unialign_jax.methods`) supplies the stage's initial state, its jitted step (a `JittedStep`)
and its batches; this module names no method. `stage_finished` reads only a stage's checkpoint
metadata, so a run skips a finished and evaluated stage without building anything; `train_stage`
continues an unfinished stage from its latest checkpoint (or a finished one that still needs its
state, restored onto the initializer's structure); `restore_finished` gives a finished stage's
state for evaluation with no initializer at all.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from typing import Any, Callable

import flax
import jax
import ml_collections
from etils import epath
from jax.experimental import multihost_utils

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import optim
from unialign_jax import parallel
from unialign_jax import profiling
from unialign_jax import writers as writers_lib
from unialign_jax.errors import Interrupted, UserError
from unialign_jax.logs import logger


@flax.struct.dataclass
class TrainState:
    """Everything one stage trains or carries; every field a pytree of arrays (DESIGN §3)."""

    step: jax.Array
    params: dict
    frozen: dict
    quantizer: dict
    aux: dict
    opt_state: Any
    carry: dict
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """The resolved description of one stage."""

    index: int
    name: str
    modalities: tuple[str, ...]
    mediator: str | None
    steps: int
    codebook_rows: int
    data: ml_collections.ConfigDict
    seen_modalities: tuple[str, ...]  # every modality of this and earlier stages, in config order
    replay_partner: str | None  # the previous stage's non-mediator modality (COMET PMR)
    # A stage of several groups trained together in mixed batches (e.g. video-text, audio-text and
    # image-text, video and audio never paired): the groups, each (lead, partners...), and their
    # data; empty for a stage of one group, `modalities` read from `data`.
    pairs: tuple[tuple[str, ...], ...] = ()
    pair_data: tuple[ml_collections.ConfigDict, ...] = ()

    @property
    def folder(self) -> str:
        return f"stage_{self.index + 1}_{self.name}"


def stage_specs(config: ml_collections.ConfigDict) -> list[StageSpec]:
    specs, seen = [], set()
    for i, s in enumerate(config.stages):
        seen.update(s.modalities)
        mediator = s.get("mediator") or None
        partner = None
        if i > 0 and mediator:
            partner = next(m for m in config.stages[i - 1].modalities if m != mediator)
        pairs = s.get("pairs") or ()
        specs.append(StageSpec(
            index=i, name=s.name, modalities=tuple(s.modalities), mediator=mediator, steps=int(s.steps),
            codebook_rows=int(s.codebook_rows), data=s.data,
            seen_modalities=tuple(m for m in config.model.modalities if m in seen), replay_partner=partner,
            pairs=tuple(tuple(p.modalities) for p in pairs), pair_data=tuple(p.data for p in pairs)))
    return specs


def state_shardings(abstract_state: TrainState, mesh, rules) -> Any:
    return parallel.tree_shardings(abstract_state, mesh, rules)


class JittedStep:
    """A stage's train step: one `jax.jit` (state donated, state and batch sharded) of `self._step`.

    It must compile once per stage (`trace_count` counts the traces; tests guard it). `metric_order`
    is the order of the metrics `_step` returns (a jitted dict comes back with sorted keys).
    Subclasses define `_step(state, batch) -> (state, metrics)`.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        stage: StageSpec,
        mesh: jax.sharding.Mesh,
        abstract_state: TrainState,
        state_shardings: Any,
    ):
        self.config = config
        self.stage = stage
        self.trace_count = 0
        self.metric_order: tuple[str, ...] = ()
        self.tx = optim.make_optimizer(config.optim, abstract_state.params, stage.steps)
        self._jitted = jax.jit(
            self._traced,
            donate_argnums=(0,),
            in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
            out_shardings=(state_shardings, parallel.replicated(mesh)),
        )

    def _traced(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        self.trace_count += 1
        state, metrics = self._step(state, batch)
        self.metric_order = tuple(metrics)
        return state, metrics

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        raise NotImplementedError(f"{type(self).__name__} must define _step(state, batch).")

    def __call__(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._jitted(state, batch)

    def lower(self, state, batch):
        return self._jitted.lower(state, batch)


class NonFiniteError(UserError, FloatingPointError):
    """A step produced a non-finite metric or state; nothing from that step on was saved."""

    hint = "lower the learning rate (or check the data); the newest checkpoint is finite and is the resume point"


def check_metrics_finite(stage: StageSpec, step: int, metrics: dict) -> dict[str, float]:
    """`metrics` (on the device or the host) as floats; `NonFiniteError` naming the step and the first
    non-finite metric."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for name, value in scalars.items():
        if not math.isfinite(value):
            raise NonFiniteError(f"Stage {stage.name!r} step {step}: metric {name} is {value}.")
    return scalars


@jax.jit
def _finite_leaves(tree) -> dict:
    """{leaf path: whether every entry is finite} over the floating-point leaves of `tree`."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): jax.numpy.isfinite(leaf).all() for path, leaf in leaves
            if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)}


def check_state_finite(stage: StageSpec, step: int, state: TrainState) -> None:
    """`NonFiniteError` naming the step and the first non-finite leaf of the state about to be saved."""
    bad = [path for path, ok in jax.device_get(_finite_leaves(state)).items() if not ok]
    if bad:
        raise NonFiniteError(f"Stage {stage.name!r} step {step}: the updated state is not finite "
                             f"({len(bad)} leaves, first {bad[0]}).")


class ProgressLog:
    """Console progress (step, the step's `loss/*` metrics in its order, steps/s, ETA) and the metric
    writers (default: `metrics.jsonl` in the workdir; process 0).

    Rate and ETA count from `compiled()`, the end of the first step of the run, so compilation does
    not enter them.
    """

    def __init__(self, workdir: str, stage: StageSpec, writer: writers_lib.MetricWriter | None = None):
        self.writer = writer or writers_lib.JsonlWriter(epath.Path(workdir) / "metrics.jsonl")
        self.stage = stage
        self.timed_from: tuple[int, float] | None = None

    def compiled(self, step: int) -> None:
        """Step `step`, the first of this run, has finished (compilation included)."""
        self.timed_from = (step, time.perf_counter())

    def write(self, step: int, scalars: dict[str, float], order: tuple[str, ...] = ()) -> None:
        rate = float("nan")
        if self.timed_from is not None and step > self.timed_from[0]:
            rate = (step - self.timed_from[0]) / (time.perf_counter() - self.timed_from[1])
        eta = (self.stage.steps - step) / rate if rate > 0 else float("nan")
        names = [k for k in (*order, *scalars) if k.startswith("loss/")]
        shown = " ".join(f"{k.split('/', 1)[1]}={scalars[k]:.4g}" for k in dict.fromkeys(names))
        logger.info(
            "[%s] step %d/%d %s | %.2f steps/s, ETA %s",
            self.stage.name,
            step,
            self.stage.steps,
            shown,
            rate,
            _format_seconds(eta),
        )
        self.writer.write_scalars(step, scalars, context={"stage": self.stage.name, "steps_per_second": rate})


def _format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"


def stage_meta(
    config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState, finished: bool
) -> dict:
    config_json = config.to_json_best_effort(sort_keys=True)
    meta = {
        "stage": stage.name,
        "stage_index": stage.index,
        "modalities": list(stage.modalities),
        "mediator": stage.mediator,
        "steps": stage.steps,
        "finished": finished,
        "known_modalities": list(config.model.modalities),
        "config_hash": ckpt_lib.config_hash(config_json),
        "versions": ckpt_lib.library_versions(),
    }
    quantizer = state.quantizer.get("quantizer")
    if quantizer is not None:  # methods without a codebook have an empty collection
        meta["codebook_active"] = int(quantizer["active_count"])
        meta["codebook_capacity"] = int(quantizer["embedding"].shape[0])
    return meta


def stage_finished(workdir: str, stage: StageSpec) -> bool:
    """Whether `stage` has a finished checkpoint in `workdir` (reads its metadata only)."""
    folder = epath.Path(workdir) / stage.folder
    if not folder.is_dir():
        return False
    checkpointer = ckpt_lib.StageCheckpointer(folder)
    meta = checkpointer.read_meta()
    checkpointer.close()
    return bool(meta and meta["finished"])


def restore_finished(config: ml_collections.ConfigDict, stage: StageSpec, workdir: str, mesh) -> TrainState:
    """The final state of a finished stage as stored, on the mesh's shardings (no initializer runs),
    for evaluation: its optimizer states come back as plain containers, not optax states, so it
    cannot be stepped or differentiated through the step."""
    checkpointer = ckpt_lib.StageCheckpointer(epath.Path(workdir) / stage.folder)
    stored, meta = checkpointer.restore_state(mesh=mesh)
    checkpointer.close()
    if not meta["finished"]:
        raise RuntimeError(f"{workdir}/{stage.folder}: the latest checkpoint is not finished.")
    state = TrainState(**stored)
    return parallel.put_on_mesh(state, state_shardings(state, mesh, config.sharding_rules))


class StopSignals:
    """While entered, SIGTERM (a preemption notice: TPU, SLURM, Kubernetes) and SIGINT (Ctrl-C)
    only set `received`; the training loop saves at the next step boundary and stops. A second
    Ctrl-C interrupts at once. On several processes the stop must be agreed: there the loop also
    asks JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`, what Orbax's
    `reached_preemption` uses), which the coordination service triggers on SIGTERM.

    Handlers are installed only in the main thread (elsewhere the object never fires).
    """

    EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)
        logger.warning("%s received: stopping after the current step (saved) or stage%s.", self.received.name,
                       "; Ctrl-C again stops at once" if signum == signal.SIGINT else "")

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or signal.SIGTERM
        return self.received is not None

    def stopped(self, where: str) -> Interrupted:
        """The exception that ends the run after the state at `where` was saved."""
        name = self.received.name
        return Interrupted(f"stopped by {name} {where}; rerun the same command to continue from there.",
                           self.EXIT_CODES[self.received])


def train_stage(
    config: ml_collections.ConfigDict,
    stage: StageSpec,
    workdir: str,
    mesh,
    initial_state: Callable[[], TrainState],
    *,
    step_factory: Callable[..., JittedStep],
    iterator_factory: Callable[[ml_collections.ConfigDict, StageSpec], Any],
    writer: writers_lib.MetricWriter | None = None,
    profiler: profiling.ProfileWindow | profiling.NoProfile | None = None,
    stop: StopSignals | None = None,
) -> TrainState:
    """Runs (or resumes) one stage to completion and returns its final state.

    Resume starts from the newest intact checkpoint (damaged newer ones are set aside,
    `StageCheckpointer.restore_latest_intact`). Every step's metrics are checked (one step behind,
    so the device stays busy) and the state before every save, so a non-finite run stops naming
    its first bad step and never saves it. On `stop` (SIGTERM, Ctrl-C) the current step is saved
    and `Interrupted` raised.

    Args:
      initial_state: builds the stage's starting state (when resuming, it gives the structure; a run
        skips a finished and evaluated stage before calling this, see `train.run`).
      step_factory: `(config, stage, mesh, abstract_state, state_shardings) -> JittedStep`.
      iterator_factory: `(config, stage) -> iterator` of host batches with grain's checkpointable state.
      writer: where logged metrics go (default: `metrics.jsonl`).
      profiler: a `profiling` window told each step before it runs (default: none).
      stop: the signals that stop the run after a save (default: none).
    """
    folder = epath.Path(workdir) / stage.folder
    with ckpt_lib.StageCheckpointer(folder, max_to_keep=config.checkpoint.max_to_keep) as checkpointer:
        state = initial_state()
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
        shardings = state_shardings(abstract, mesh, config.sharding_rules)
        state = parallel.put_on_mesh(state, shardings)
        data_iterator = iterator_factory(config, stage)

        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        resumed = checkpointer.restore_latest_intact(target, data_iterator)
        if resumed is not None:
            step, state, meta = resumed
            logger.info("[%s] resumed from step %d%s.", stage.name, step, " (finished)" if meta["finished"] else "")
            if meta["finished"]:
                return state
        return _run_steps(config, stage, workdir, mesh, state, abstract, shardings, data_iterator,
                          checkpointer, step_factory, writer, profiler or profiling.NoProfile(), stop)


def _run_steps(config, stage, workdir, mesh, state, abstract, shardings, data_iterator, checkpointer,
               step_factory, writer, profiler, stop) -> TrainState:
    """The step loop of `train_stage` from `state.step` to the end of the stage."""
    step_fn = step_factory(config, stage, mesh, abstract, shardings)
    first = int(state.step)
    progress = ProgressLog(workdir, stage, writer)
    unchecked: tuple[int, dict] | None = None  # the previous step's metrics, still on the device
    for step in range(first + 1, stage.steps + 1):
        profiler.step(step, ready=state)
        batch = parallel.global_batch(next(data_iterator), mesh)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = step_fn(state, batch)
        if unchecked is not None:
            check_metrics_finite(stage, *unchecked)
        last = step == stage.steps
        stopping = stop is not None and stop.should_stop(step)
        save = step % config.checkpoint.every == 0 or last or stopping
        unchecked = (step, metrics)
        if save or step % config.log_every == 0 or step == first + 1:
            scalars = check_metrics_finite(stage, step, metrics)
            unchecked = None
            if step == first + 1:
                progress.compiled(step)
            if step % config.log_every == 0 or last:
                progress.write(step, scalars, step_fn.metric_order)
        if save:
            check_state_finite(stage, step, state)
            checkpointer.save(step, state, data_iterator, stage_meta(config, stage, state, finished=last))
        if stopping and not last:
            checkpointer.wait()
            raise stop.stopped(f"at step {step} of stage {stage.name!r} (checkpoint {step} saved)")
    return state
