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
import time
from typing import Any, Callable

import flax
import jax
import ml_collections
from etils import epath

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import optim
from unialign_jax import parallel
from unialign_jax import profiling
from unialign_jax import writers as writers_lib
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


class ProgressLog:
    """Console progress (step, the step's `loss/*` metrics in its order, steps/s, ETA) and the metric
    writers (default: `metrics.jsonl` in the workdir; process 0). Every logged metric must be finite."""

    def __init__(self, workdir: str, stage: StageSpec, first_step: int,
                 writer: writers_lib.MetricWriter | None = None):
        self.writer = writer or writers_lib.JsonlWriter(epath.Path(workdir) / "metrics.jsonl")
        self.stage = stage
        self.first_step = first_step
        self.start = time.perf_counter()

    def write(self, step: int, metrics: dict, order: tuple[str, ...] = ()) -> None:
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        rate = done / elapsed if elapsed > 0 else float("nan")
        eta = (self.stage.steps - step) / rate if rate > 0 else float("nan")
        scalars = {k: float(v) for k, v in metrics.items()}
        for name, value in scalars.items():
            if not math.isfinite(value):
                raise FloatingPointError(f"Stage {self.stage.name!r} step {step}: metric {name} is {value}.")
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
) -> TrainState:
    """Runs (or resumes) one stage to completion and returns its final state.

    Args:
      initial_state: builds the stage's starting state (when resuming, it gives the structure; a run
        skips a finished and evaluated stage before calling this, see `train.run`).
      step_factory: `(config, stage, mesh, abstract_state, state_shardings) -> JittedStep`.
      iterator_factory: `(config, stage) -> iterator` of host batches with grain's checkpointable state.
      writer: where logged metrics go (default: `metrics.jsonl`).
      profiler: a `profiling` window told each step before it runs (default: none).
    """
    checkpointer = ckpt_lib.StageCheckpointer(
        epath.Path(workdir) / stage.folder, max_to_keep=config.checkpoint.max_to_keep
    )
    state = initial_state()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    shardings = state_shardings(abstract, mesh, config.sharding_rules)
    state = parallel.put_on_mesh(state, shardings)
    data_iterator = iterator_factory(config, stage)

    latest = checkpointer.latest_step()
    if latest is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
        state, meta = checkpointer.restore(latest, target, data_iterator)
        logger.info("[%s] resumed from step %d%s.", stage.name, latest, " (finished)" if meta["finished"] else "")
        if meta["finished"]:
            checkpointer.close()
            return state

    step_fn = step_factory(config, stage, mesh, abstract, shardings)
    first = int(state.step)
    progress = ProgressLog(workdir, stage, first, writer)
    profiler = profiler or profiling.NoProfile()
    for step in range(first + 1, stage.steps + 1):
        profiler.step(step, ready=state)
        batch = parallel.global_batch(next(data_iterator), mesh)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            state, metrics = step_fn(state, batch)
        last = step == stage.steps
        if step % config.log_every == 0 or last:
            progress.write(step, jax.device_get(metrics), step_fn.metric_order)
        if step % config.checkpoint.every == 0 or last:
            checkpointer.save(step, state, data_iterator, stage_meta(config, stage, state, finished=last))
    checkpointer.wait()
    checkpointer.close()
    return state
