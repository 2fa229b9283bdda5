"""Evaluation of a trained CMG/COMET stage: cross-modal generalization, retrieval, codebook usage,
forgetting and the continual-learning scores.

Protocol (DESIGN §8): the encoder is frozen; each modality is encoded into its quantized code
vectors by the encode-only path (`CMGModel.encode_with_routing`: no decoders, no dropout, codebook
unchanged). A head trained on modality X's codes (train split) is tested on modality Y's codes (test
split) for every ordered pair of the modalities learned so far: sequence classification accuracy
and per-step localisation macro-F1. Retrieval R@1/5/10 between every pair on the test split
(instance pairs, since every example renders one event sequence in all modalities). A pair is
'seen' when some stage trained the two modalities together, else 'unseen'. Forgetting is each
earlier pair's score now minus its score right after the stage that first evaluated it.

Beside each classification score: the same head's accuracy on the test examples of the pair's
aligned classes (the labels of the training splits of every stage so far that trained X, intersected
with those of Y; with stage classes 0-5, 2-7, 4-9 video and audio share only 2-5), the fraction of
X's test tokens whose code Y also selects (`code_sharing/X->Y`), and a flag for scores below chance
(1/C for C classes, `chance/classification`). From the stages so far: ACC, BWT and FWT of the
all-class and aligned-class scores (`continual/...`, `continual/aligned/...`; definitions in
`unialign_jax.eval.continual`), and the heat map of the accuracy matrix (`results/accuracy_matrix.png`).
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from etils import epath

from unialign_jax import eval as eval_lib
from unialign_jax import optim
from unialign_jax import report
from unialign_jax.data import pipeline
from unialign_jax.eval.batching import padded_chunks
from unialign_jax.loop import StageSpec, TrainState, stage_specs
from unialign_jax.methods.cmg import model as model_lib
from unialign_jax.nn.cmg import CMGModel


@functools.partial(jax.jit, static_argnums=0)
def encode_batch(model, variables: dict, batch: dict):
    """`CMGModel.encode_with_routing` of one batch, jitted once per model and batch shape."""
    return model.apply(variables, batch, method=CMGModel.encode_with_routing)


def encode_split(model, variables: dict, data: dict, modalities, batch_size: int):
    """{m: (codes [N,T], code vectors [N,T,D])} and, with an adapter, {m: router probs [N,T,U]}.

    Fixed-size (zero-padded) batches, so one compilation per model serves both splits.
    """
    codes = {m: [] for m in modalities}
    vectors = {m: [] for m in modalities}
    routing = {m: [] for m in modalities}
    for padded, size in padded_chunks({m: data[m] for m in modalities}, batch_size):
        encoded, probs = jax.device_get(encode_batch(model, variables, padded))
        for m in modalities:
            codes[m].append(encoded[m][0][:size])
            vectors[m].append(encoded[m][1][:size])
            if m in probs:
                routing[m].append(probs[m][:size])
    codes = {m: np.concatenate(v) for m, v in codes.items()}
    vectors = {m: np.concatenate(v) for m, v in vectors.items()}
    routing = {m: np.concatenate(v) for m, v in routing.items() if v}
    return codes, vectors, routing


def trained_classes(stages: list[StageSpec]) -> dict[str, tuple[int, ...]]:
    """{modality: the sorted labels of the train splits of the `stages` that trained it} (in a stage of
    several pairs, each pair's own data)."""
    classes: dict[str, set[int]] = {}
    for stage in stages:
        for modalities, data in (zip(stage.pairs, stage.pair_data) if stage.pairs else [(stage.modalities, stage.data)]):
            source = pipeline.build_source(data, "train")
            labels = {int(example["label"]) for example in source.__getitems__(range(len(source)))}
            for modality in modalities:
                classes.setdefault(modality, set()).update(labels)
    return {modality: tuple(sorted(labels)) for modality, labels in classes.items()}


def evaluate_stage(config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState,
                   results_dir: epath.Path, history: list[dict]) -> dict:
    """Scores every pair of the modalities learned up to `stage` (and the forgetting since `history`,
    the results of the earlier stages); writes the code-usage and accuracy-matrix plots into
    `results_dir`; returns the stage's result."""
    datasets = eval_datasets(config.eval.data, stage.seen_modalities)
    modalities = tuple(datasets)
    if len(modalities) < 2:
        raise ValueError(f"config.eval.data provides {modalities}: fewer than two of the learned modalities "
                         f"{stage.seen_modalities} to evaluate.")
    groups = {}  # modalities read from one dataset are loaded and encoded together
    for modality, data_config in datasets.items():
        groups.setdefault(data_config.to_json(sort_keys=True), (data_config, []))[1].append(modality)
    model, _ = model_lib.build_models(config, stage)
    variables = {"params": optim.merge_params(state.params, state.frozen), "quantizer": state.quantizer}
    splits = {}
    for split in ("train", "test"):
        labelled, vectors, codes, routing = {}, {}, {}, {}
        for data_config, group in groups.values():
            group = tuple(group)
            data = pipeline.load_split(data_config, split, modalities=group, max_examples=config.eval.max_examples)
            group_codes, group_vectors, group_routing = encode_split(model, variables, data, group,
                                                                     config.eval.batch_size)
            codes.update(group_codes)
            vectors.update(group_vectors)
            routing.update(group_routing)
            labelled.update({m: eval_lib.LabelledFeatures(group_vectors[m], data["label"], data["step_labels"])
                             for m in group})
        splits[split] = (labelled, codes, vectors, routing)

    head_config = eval_lib.HeadTrainConfig(learning_rate=config.eval.head_learning_rate, steps=config.eval.head_steps,
                                           batch_size=config.eval.head_batch_size, seed=config.seed)
    classes = trained_classes(stage_specs(config)[: stage.index + 1])
    aligned = {eval_lib.pair_name(x, y): eval_lib.aligned_classes(classes, x, y)
               for x, y in eval_lib.ordered_pairs(modalities)}
    metrics = eval_lib.cross_modal_scores(splits["train"][0], splits["test"][0], modalities=modalities,
                                          aligned_classes=aligned, config=head_config)
    chance = 1.0 / (1 + max(int(np.max(features.labels)) for split in splits for features in splits[split][0].values()))
    metrics["chance/classification"] = chance
    metrics.update(eval_lib.below_chance(metrics, chance))
    test_labelled, test_codes, test_vectors, test_routing = splits["test"]
    metrics.update(eval_lib.retrieval_scores(
        test_vectors, {m: test_labelled[m].labels for m in modalities}, modalities=modalities,
        paired=config.eval.paired))
    active = int(state.quantizer["quantizer"]["active_count"])
    metrics.update(eval_lib.codebook_usage(test_codes, active, modalities))
    metrics.update(eval_lib.code_sharing(test_codes, eval_lib.ordered_pairs(modalities)))
    if test_routing:
        metrics.update(eval_lib.routing_load(test_routing, modalities))

    result = {"name": stage.name, "modalities": list(stage.modalities), "metrics": metrics}
    learned_at = {}  # pair metrics first measured in an EARLIER stage: only those can be forgotten
    for index, earlier in enumerate(history):
        for key in earlier["metrics"]:
            if key.split("/")[0] in ("classification", "localisation", "retrieval"):
                learned_at.setdefault(key, index)
    stages = [*history, result]
    result["metrics"].update(eval_lib.forgetting([s["metrics"] for s in stages], learned_at))
    for prefix, key in (("classification/", "continual/"), ("aligned/classification/", "continual/aligned/")):
        scores = eval_lib.continual_scores([s["metrics"] for s in stages], [s["modalities"] for s in stages],
                                           chance, prefix)
        result["metrics"].update({key + name: value for name, value in scores.items()})

    report.plot_code_usage(results_dir / f"code_usage_{stage.folder}.png",
                           eval_lib.code_usage_counts(test_codes, active, modalities), modalities)
    report.plot_accuracy_matrix(results_dir / "accuracy_matrix.png", stages)
    return result


def eval_datasets(eval_data: ml_collections.ConfigDict, modalities) -> dict[str, ml_collections.ConfigDict]:
    """{modality: data config} of the `modalities` that `config.eval.data` provides, in their order.

    `config.eval.data` is one data config holding every modality (digits, synthetic, features), or
    {modality: data config} with one dataset per modality (unpaired datasets such as `numbers`).
    """
    if "name" in eval_data:
        available = pipeline.dataset_modalities(eval_data)
        return {m: eval_data for m in modalities if m in available}
    return {m: eval_data[m] for m in modalities if m in eval_data and m in pipeline.dataset_modalities(eval_data[m])}


def stage_table(history: list[dict]) -> str:
    """The console table of the latest stage: one row per modality pair."""
    latest = history[-1]
    rows, columns = report.pair_rows(latest["metrics"], [s["modalities"] for s in history])
    return f"\n{latest['name']}:\n" + report.format_table(rows, columns)
