"""Evaluates trained stages: cross-modal generalization, retrieval, codebook usage, forgetting.

    python -m unialign_jax.evaluate --workdir=workdirs/comet

reads `workdir/config.json` and every finished stage checkpoint (no config flag needed), recomputes
the results and writes `workdir/results/summary.{json,md}` and the code-usage plots. `train.py`
calls `evaluate_stage` after each stage.

Protocol (DESIGN §8): the encoder is frozen; each modality is encoded into its quantized code
vectors. A head trained on modality X's codes (train split) is tested on modality Y's codes (test
split) for every ordered pair of the modalities learned so far: sequence classification accuracy
and per-step localisation macro-F1. Retrieval R@1/5/10 between every pair on the test split
(instance pairs, since every example renders one event sequence in all modalities). A pair is
'seen' when some stage trained the two modalities together, else 'unseen'. Forgetting is each
earlier pair's score now minus its score right after the stage that first evaluated it.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import eval as eval_lib
from unialign_jax import files
from unialign_jax import logs
from unialign_jax import optim
from unialign_jax import report
from unialign_jax import trainer
from unialign_jax import unialign_evaluate
from unialign_jax.data import pipeline
from unialign_jax.logs import logger


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode_batch(model, with_routing: bool, variables: dict, batch: dict):
    outputs = model.apply(variables, batch, train=False, update_codebook=False)
    routing = outputs.get("router_probs", {}) if with_routing else {}
    return {m: (outputs["codes"][m], outputs["code_vectors"][m]) for m in batch}, routing


def encode_split(model, variables: dict, data: dict, modalities, batch_size: int, with_routing: bool):
    """{m: (codes [N,T], code vectors [N,T,D])} and, with an adapter, {m: router probs [N,T,U]}.

    Fixed-size (zero-padded) batches, so one compilation per model serves both splits.
    """
    num = len(data["label"])
    codes = {m: [] for m in modalities}
    vectors = {m: [] for m in modalities}
    routing = {m: [] for m in modalities}
    for start in range(0, num, batch_size):
        chunk = {m: data[m][start : start + batch_size] for m in modalities}
        size = len(chunk[modalities[0]])
        padded = {m: np.concatenate([x, np.zeros((batch_size - size, *x.shape[1:]), x.dtype)]) for m, x in chunk.items()}
        encoded, probs = jax.device_get(_encode_batch(model, with_routing, variables, padded))
        for m in modalities:
            codes[m].append(encoded[m][0][:size])
            vectors[m].append(encoded[m][1][:size])
            if m in probs:
                routing[m].append(probs[m][:size])
    codes = {m: np.concatenate(v) for m, v in codes.items()}
    vectors = {m: np.concatenate(v) for m, v in vectors.items()}
    routing = {m: np.concatenate(v) for m, v in routing.items() if v}
    return codes, vectors, routing


def evaluate_stage(config: ml_collections.ConfigDict, stage: trainer.StageSpec, state: trainer.TrainState,
                   workdir: str, history: list[dict]) -> dict:
    """Scores every pair of the modalities learned up to `stage`; writes the results so far."""
    available = pipeline.dataset_modalities(config.eval.data)
    modalities = tuple(m for m in stage.seen_modalities if m in available)
    if len(modalities) < 2:
        raise ValueError(f"config.eval.data provides {available}: fewer than two of the learned modalities "
                         f"{stage.seen_modalities} to evaluate.")
    model, _ = trainer.build_models(config, stage)
    variables = {"params": optim.merge_params(state.params, state.frozen), "quantizer": state.quantizer}
    with_routing = config.model.adapter_experts > 0
    splits = {}
    for split in ("train", "test"):
        data = pipeline.load_split(config.eval.data, split, modalities=modalities,
                                   max_examples=config.eval.max_examples)
        codes, vectors, routing = encode_split(model, variables, data, modalities, config.eval.batch_size,
                                               with_routing)
        splits[split] = (data, codes, vectors, routing)

    def labelled(split):
        data, _, vectors, _ = splits[split]
        return {m: eval_lib.LabelledFeatures(vectors[m], data["label"], data["step_labels"]) for m in modalities}

    head_config = eval_lib.HeadTrainConfig(learning_rate=config.eval.head_learning_rate, steps=config.eval.head_steps,
                                           batch_size=config.eval.head_batch_size, seed=config.seed)
    metrics = eval_lib.cross_modal_scores(labelled("train"), labelled("test"), modalities=modalities,
                                          config=head_config)
    test_data, test_codes, test_vectors, test_routing = splits["test"]
    metrics.update(eval_lib.retrieval_scores(
        test_vectors, {m: test_data["label"] for m in modalities}, modalities=modalities, paired=config.eval.paired))
    active = int(state.quantizer["quantizer"]["active_count"])
    metrics.update(eval_lib.codebook_usage(test_codes, active, modalities))
    if test_routing:
        metrics.update(eval_lib.routing_load(test_routing, modalities))

    result = {"name": stage.name, "modalities": list(stage.modalities), "metrics": metrics}
    stages = [*history, result]
    learned_at = {}  # pair metrics first measured in an EARLIER stage: only those can be forgotten
    for index, earlier in enumerate(history):
        for key in earlier["metrics"]:
            if key.split("/")[0] in ("classification", "localisation", "retrieval"):
                learned_at.setdefault(key, index)
    result["metrics"].update(eval_lib.forgetting([s["metrics"] for s in stages], learned_at))

    results_dir = epath.Path(workdir) / "results"
    report.plot_code_usage(results_dir / f"code_usage_{stage.folder}.png",
                           eval_lib.code_usage_counts(test_codes, active, modalities), modalities)
    report.write_summary(results_dir, stages)
    return result


def stage_table(history: list[dict]) -> str:
    """The console table of the latest stage: one row per modality pair."""
    latest = history[-1]
    rows, columns = report.pair_rows(latest["metrics"], [s["modalities"] for s in history])
    return f"\n{latest['name']}:\n" + report.format_table(rows, columns)


def config_from_json(value):
    """A resolved config read back from `config.json`: dicts become ConfigDicts, also inside lists
    (`ConfigDict(json)` leaves the stage dicts of `config.stages` plain dicts)."""
    if isinstance(value, dict):
        return ml_collections.ConfigDict({key: config_from_json(item) for key, item in value.items()})
    if isinstance(value, list):
        return [config_from_json(item) for item in value]
    return value


def evaluate_workdir(workdir: str) -> list[dict]:
    """Re-evaluates every finished stage of a workdir from its checkpoints and config.json."""
    config_path = epath.Path(workdir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: is {workdir} a unialign_jax.train workdir?")
    config = config_from_json(files.read_json(config_path))
    history: list[dict] = []
    for stage in trainer.stage_specs(config):
        checkpointer = ckpt_lib.StageCheckpointer(epath.Path(workdir) / stage.folder)
        meta = checkpointer.read_meta()
        if meta is None or not meta["finished"]:
            logger.info("Stage %s is not finished; stopping here.", stage.name)
            checkpointer.close()
            break
        stored, _ = checkpointer.restore_state()
        checkpointer.close()
        state = trainer.TrainState(**stored)
        if config.get("method", "cmg") == "unialign":
            history.append(unialign_evaluate.evaluate_stage(config, stage, state, workdir))
            print(unialign_evaluate.results_markdown(config, history[-1]), flush=True)
            continue
        history.append(evaluate_stage(config, stage, state, workdir, history))
        print(stage_table(history), flush=True)
    return history


def main(argv):
    del argv
    logs.setup()
    evaluate_workdir(flags.FLAGS.workdir)


if __name__ == "__main__":
    # Defined here, not at import: train.py imports this module and has its own --workdir.
    flags.DEFINE_string("workdir", None, "A workdir written by unialign_jax.train.")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
