"""Runs the stages of a config in a workdir (CMG: one stage; COMET: one per modality pair).

    python -m unialign_jax.train --config=configs/comet_vt_at_it.py --workdir=workdirs/comet
    python -m unialign_jax.train --config=configs/cmg_avt.py:size=reference --workdir=workdirs/cmg \
        --config.stages[0].steps=200

Re-running the same command resumes: finished stages that were evaluated are skipped without
loading anything, an interrupted stage continues from its last checkpoint. After each stage the
method evaluates the model into `workdir/results/` (`report.write_summary`).
"""

from __future__ import annotations

import json

import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags

from unialign_jax import cli
from unialign_jax import configlib
from unialign_jax import files
from unialign_jax import loop
from unialign_jax import methods
from unialign_jax import parallel
from unialign_jax import profiling
from unialign_jax import report
from unialign_jax import writers
from unialign_jax.data import identity as data_identity
from unialign_jax.logs import logger


# Fields that change how a run is watched, not what it computes: a resume may change them.
TOOLING_FIELDS = ("writers", "profile")


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, *, write: bool = True) -> None:
    """Refuses to resume a workdir that was started with a different config (`TOOLING_FIELDS` may
    differ); with `write`, records the config in a new workdir, or over the config of a start that
    never trained a step (a failed start does not lock the workdir to its config).

    `workdir` may be local or an object store (`gs://...`); process 0 writes `config.json`.
    """
    path = epath.Path(workdir) / "config.json"
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    if path.exists():
        previous = files.read_json(path)
        changed = sorted(k for k in set(previous) | set(resolved)
                         if k not in TOOLING_FIELDS and previous.get(k) != resolved.get(k))
        if not changed:
            return
        if _trained_any_step(workdir):
            raise configlib.ConfigError(
                f"{workdir} was started with a different config (top-level fields differ: {changed}); "
                "use a new --workdir or the original config."
            )
        logger.warning("%s: replacing the config of an earlier start that trained no step (fields %s).",
                       workdir, changed)
    if write:
        files.write_json_atomic(path, resolved)


def _trained_any_step(workdir: str) -> bool:
    """Whether any stage folder of `workdir` holds a checkpoint step (or a results summary exists)."""
    root = epath.Path(workdir)
    if (root / "results" / "summary.json").exists():
        return True
    folders = [p for p in root.iterdir() if p.name.startswith("stage_") and p.is_dir()] if root.is_dir() else []
    return any(p.name.isdigit() for folder in folders for p in folder.iterdir())


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains every stage (resuming where possible) and returns the per-stage results.

    Before anything is built: the config, the writers, the workdir (writable, not another run's:
    `files.WorkdirLock`), the data it would read (pinned in `data.json`) and the config it was
    started with are checked.
    """
    method = methods.for_config(config)
    method.validate(config)
    writers.check_writers(config.writers)
    created = not epath.Path(workdir).exists()
    files.check_writable_dir(workdir)
    try:
        return _run_locked(method, config, workdir)
    except BaseException:
        if created:  # a start that failed leaves no trace of a new workdir
            files.remove_if_empty(workdir)
        raise


def _run_locked(method, config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    with files.WorkdirLock(workdir):
        check_workdir_config(workdir, config, write=False)
        data = data_identity.identity(config)
        fresh = not _trained_any_step(workdir)
        data_identity.pin(workdir, data, write=False, replace=fresh)
        for source in data_identity.audio_sources(data):
            logger.info("audio: %s", source)
        method.prepare(config, workdir)
        check_workdir_config(workdir, config)
        data_identity.pin(workdir, data, write=True, replace=fresh)
        with writers.make_writers(config.writers, workdir, config=config.to_dict()) as writer, \
                profiling.from_config(config.get("profile"), workdir) as profiler, \
                loop.StopSignals() as stop:
            return _run_stages(method, config, workdir, writer, profiler, stop)


def _run_stages(method, config, workdir, writer, profiler, stop) -> list[dict]:
    mesh = parallel.make_mesh(config.mesh)
    stages = loop.stage_specs(config)
    results_dir = epath.Path(workdir) / "results"
    recorded = {result["name"]: result for result in report.read_summary(results_dir)}
    results: list[dict] = []
    for stage in stages:
        if stage.name in recorded and loop.stage_finished(workdir, stage):
            logger.info("[%s] finished and evaluated: skipped.", stage.name)
            results.append(recorded[stage.name])
            continue
        logger.info(
            "=== stage %d/%d: %s (%s) for %d steps ===",
            stage.index + 1,
            len(stages),
            stage.name,
            "+".join(stage.modalities),
            stage.steps,
        )
        state = loop.train_stage(
            config,
            stage,
            workdir,
            mesh,
            lambda stage=stage: method.initial_state(config, stage, workdir),
            step_factory=method.step,
            iterator_factory=lambda c, s: method.train_iterator(c, s, workdir),
            writer=writer,
            profiler=profiler,
            stop=stop,
        )
        method.end_stage(config, stage, state, workdir, mesh)
        results.append(method.evaluate_stage(config, stage, state, results_dir, results))
        report.write_summary(results_dir, results, method.results_markdown(config, results))
        _write_evaluation(writer, stage, results[-1], results_dir)
        print(method.results_table(config, results), flush=True)
        if stop.received and stage.index + 1 < len(stages):
            raise stop.stopped(f"after stage {stage.name!r} (finished and evaluated)")
    return results


def _write_evaluation(writer, stage: loop.StageSpec, result: dict, results_dir: epath.Path) -> None:
    """A stage's evaluation metrics and its plots to the writers: `results/*<stage folder>*.png` and
    the plots of the whole run (PNGs naming no stage, e.g. the accuracy matrix) as they stand now."""
    context = {"stage": stage.name, "split": "eval"}
    writer.write_scalars(stage.steps, result["metrics"], context=context)
    pngs = sorted(results_dir.glob("*.png"))
    plots = {path.stem: report.read_png(path) for path in pngs
             if stage.folder in path.name or "stage_" not in path.name}
    if plots:
        writer.write_images(stage.steps, plots, context=context)
    writer.flush()


def main(argv):
    del argv
    parallel.maybe_initialize_distributed()
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    # Defined here, not at import, so that `run` can be imported next to other CLIs (bench, evaluate).
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
