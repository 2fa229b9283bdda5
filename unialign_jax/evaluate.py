"""Re-evaluates the finished stages of a workdir from its checkpoints.

    python -m unialign_jax.evaluate --workdir=workdirs/comet

reads `workdir/config.json` (no config flag needed), restores every finished stage's final
checkpoint, evaluates it with the config's method and rewrites `workdir/results/summary.{json,md}`
(`report.write_summary`). `train.py` evaluates each stage as it finishes; this recomputes them.
It refuses data other than the workdir's (`data.json`) unless `--other_data` is given, which
writes the new evaluation beside the training results.
"""

from __future__ import annotations

import ml_collections
from absl import flags
from etils import epath

from unialign_jax import cli
from unialign_jax import files
from unialign_jax import loop
from unialign_jax import methods
from unialign_jax import parallel
from unialign_jax import report
from unialign_jax.data import identity as data_identity
from unialign_jax.logs import logger


def config_from_json(value):
    """A resolved config read back from `config.json`: dicts become ConfigDicts, also inside lists
    (`ConfigDict(json)` leaves the stage dicts of `config.stages` plain dicts)."""
    if isinstance(value, dict):
        return ml_collections.ConfigDict({key: config_from_json(item) for key, item in value.items()})
    if isinstance(value, list):
        return [config_from_json(item) for item in value]
    return value


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config of a workdir (`config.json`); `WorkdirError` naming the path."""
    config_path = epath.Path(workdir) / "config.json"
    if not config_path.exists():
        raise files.WorkdirError(f"{config_path} not found: is {workdir} a unialign_jax.train workdir?")
    return config_from_json(files.read_json(config_path))


def evaluate_workdir(workdir: str, *, other_data: bool = False) -> list[dict]:
    """Re-evaluates every finished stage of a workdir from its checkpoints and config.json.

    The data it reads must be the data the workdir was trained on (`data.json`, see
    `data.identity`); with `other_data`, a difference is allowed and the results are written beside
    the training results, to `results/other_data/<data hash>/`, not over them.
    """
    config = read_config(workdir)
    method = methods.for_config(config)
    results_dir = epath.Path(workdir) / "results"
    current = data_identity.identity(config)
    if other_data:
        results_dir = results_dir / "other_data" / data_identity.digest(current)
        logger.info("Evaluating on the data of this environment; results go to %s.", results_dir)
    else:
        data_identity.pin(workdir, current, write=False)
    for source in data_identity.audio_sources(current):
        logger.info("audio: %s", source)
    mesh = parallel.make_mesh(config.mesh)
    history: list[dict] = []
    for stage in loop.stage_specs(config):
        if not loop.stage_finished(workdir, stage):
            logger.info("Stage %s is not finished; stopping here.", stage.name)
            break
        state = loop.restore_finished(config, stage, workdir, mesh)
        history.append(method.evaluate_stage(config, stage, state, results_dir, history))
        print(method.results_table(config, history), flush=True)
    if history:
        report.write_summary(results_dir, history, method.results_markdown(config, history))
    return history


def main(argv):
    del argv
    evaluate_workdir(flags.FLAGS.workdir, other_data=flags.FLAGS.other_data)


if __name__ == "__main__":
    # Defined here, not at import: train.py has its own --workdir.
    flags.DEFINE_string("workdir", None, "A workdir written by unialign_jax.train.")
    flags.DEFINE_bool("other_data", False, "Evaluate on the data this environment resolves to even if it is not "
                      "the data the workdir was trained on; results go to results/other_data/<hash>/.")
    flags.mark_flags_as_required(["workdir"])
    cli.run(main)
