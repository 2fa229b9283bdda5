"""Runs the stages of a config in a workdir (CMG: one stage; COMET: one per modality pair).

    python -m unialign_jax.train --config=configs/comet_vt_at_it.py --workdir=workdirs/comet
    python -m unialign_jax.train --config=configs/cmg_avt.py:size=reference --workdir=workdirs/cmg \
        --config.stages[0].steps=200

Re-running the same command resumes: finished stages are skipped, an interrupted stage continues
from its last checkpoint. After each stage the model is evaluated (cross-modal classification and
localisation, retrieval, codebook usage, forgetting) into `workdir/results/`.
"""

from __future__ import annotations

import functools
import json

import ml_collections
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from unialign_jax import configlib
from unialign_jax import continual
from unialign_jax import evaluate
from unialign_jax import files
from unialign_jax import logs
from unialign_jax import parallel
from unialign_jax import teachers
from unialign_jax import trainer
from unialign_jax import unialign_config
from unialign_jax import unialign_evaluate
from unialign_jax import unialign_trainer
from unialign_jax.data import pipeline
from unialign_jax.logs import logger


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Refuses to resume a workdir that was started with a different config (nothing is overwritten).

    `workdir` may be local or an object store (`gs://...`); process 0 writes `config.json`.
    """
    path = epath.Path(workdir) / "config.json"
    resolved = json.loads(config.to_json_best_effort(sort_keys=True))
    if not path.exists():
        files.write_json_atomic(path, resolved)
        return
    previous = files.read_json(path)
    if previous != resolved:
        changed = sorted(k for k in set(previous) | set(resolved) if previous.get(k) != resolved.get(k))
        raise ValueError(
            f"{workdir} was started with a different config (top-level fields differ: {changed}); "
            "use a new --workdir or the original config."
        )


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """Trains every stage (resuming where possible) and returns the per-stage results."""
    if config.get("method", "cmg") == "unialign":
        return run_unialign(config, workdir)
    configlib.validate(config, pipeline.dataset_modalities)
    check_workdir_config(workdir, config)
    mesh = parallel.make_mesh(config.mesh)
    stages = trainer.stage_specs(config)
    results: list[dict] = []
    for stage in stages:
        logger.info(
            "=== stage %d/%d: %s (%s) for %d steps ===",
            stage.index + 1,
            len(stages),
            stage.name,
            "+".join(stage.modalities),
            stage.steps,
        )
        initial_state = continual.stage_initializer(config, stage, workdir)
        state = trainer.train_stage(config, stage, workdir, mesh, initial_state)
        continual.finish_stage(config, stage, state, workdir, mesh)
        results.append(evaluate.evaluate_stage(config, stage, state, workdir, results))
        print(evaluate.stage_table(results), flush=True)
    return results


def run_unialign(config: ml_collections.ConfigDict, workdir: str) -> list[dict]:
    """UniAlign (`config.method = 'unialign'`): one stage through the same stage loop, its own step,
    mixed-modality data and evaluation."""
    unialign_config.validate(config, pipeline.dataset_modalities)
    teachers.check_available(config, workdir)
    check_workdir_config(workdir, config)
    mesh = parallel.make_mesh(config.mesh)
    (stage,) = trainer.stage_specs(config)
    logger.info("=== UniAlign: %s for %d steps ===", "+".join(stage.modalities), stage.steps)
    state = trainer.train_stage(
        config,
        stage,
        workdir,
        mesh,
        lambda: unialign_trainer.fresh_state(config, stage, workdir),
        step_factory=unialign_trainer.UniAlignStep,
        iterator_factory=functools.partial(unialign_trainer.make_train_iterator, workdir=workdir),
    )
    result = unialign_evaluate.evaluate_stage(config, stage, state, workdir)
    print(unialign_evaluate.results_markdown(config, result), flush=True)
    return [result]


def main(argv):
    del argv
    parallel.maybe_initialize_distributed()
    logs.setup()
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    # Defined here, not at import, so that `run` can be imported next to other CLIs (bench, evaluate).
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).", lock_config=True)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
