"""Evaluation of a UniAlign stage: zero-shot classification, retrieval between modalities, routing load.

On each encoded modality's test split (`config.eval.data[modality]`), the trained model embeds every
example; the anchor modality (text) is embedded by the frozen text encoder (`label_embeddings.pool_text` of
the captions). Metrics (`unialign_jax.eval`):

* zero-shot classification through text anchors: top-1 / top-5 accuracy against the dataset's
  class-label embeddings (`TrainState.carry['label_embeddings']`), with the chance levels k / C;
* retrieval R@1/5/10 for every ordered pair of modalities, text included, by class relevance (an
  item is relevant when it has the query's label, so the datasets must share one label space):
  pairs with the anchor were trained together, pairs of two encoded modalities never were;
* routing load: the mean router probability of each expert over all tokens and MoE-LoRA layers of a
  modality (for grouped routing, expert j of modality m is m's own j-th expert).

The run writes the result through `report.write_summary` (one stage, the metrics above), with
`results_markdown`'s tables as `summary.md`.
"""

from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np

from unialign_jax import eval as eval_lib
from unialign_jax import optim
from unialign_jax import report
from unialign_jax.data import pipeline
from unialign_jax.eval.batching import padded_chunks
from unialign_jax.eval import zero_shot
from unialign_jax.loop import StageSpec, TrainState
from unialign_jax.methods.unialign import config as config_lib
from unialign_jax.methods.unialign import label_embeddings as label_lib
from unialign_jax.nn.unialign import modality_router_probabilities


@functools.partial(jax.jit, static_argnums=(0, 3))
def encode_batch(model, params: dict, inputs: jax.Array, modality: str) -> tuple[jax.Array, jax.Array]:
    """(embeddings [B, D], router probabilities [adapters, B, L, experts]) of one batch of a modality,
    jitted once per model, modality and batch shape."""
    outputs, state = model.apply({"params": params}, inputs, modality, mutable=["intermediates"])
    return outputs["embedding"], modality_router_probabilities(state["intermediates"])


def encode(model, params: dict, inputs: np.ndarray, modality: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float[N, D], router probabilities float[tokens x adapters, experts]) of one modality,
    in chunks of `batch_size` (the last one padded), so the model compiles once per modality."""
    embeddings, probabilities = [], []
    for padded, size in padded_chunks({"inputs": inputs}, batch_size):
        embedding, routing = jax.device_get(encode_batch(model, params, padded["inputs"], modality))
        embeddings.append(embedding[:size])
        probabilities.append(routing[:, :size].reshape(-1, routing.shape[-1]))
    return np.concatenate(embeddings), np.concatenate(probabilities)


def _test_split(config: ml_collections.ConfigDict, modality: str, with_text: bool) -> dict[str, np.ndarray]:
    max_examples = config.eval.max_examples or None
    fields = (modality, config.model.anchor) if with_text else (modality,)
    return pipeline.load_split(config.eval.data[modality], "test", modalities=fields, max_examples=max_examples)


def evaluate_stage(config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState) -> dict:
    """Scores a trained UniAlign state (module docstring); returns {'name', 'modalities', 'metrics'}."""
    anchor = config.model.anchor
    encoded = config_lib.encoded_modalities(config)
    model = config_lib.build_model(config)
    params = optim.merge_params(jax.device_get(state.params), jax.device_get(state.frozen))
    class_embeddings = {m: np.asarray(v) for m, v in jax.device_get(state.carry["label_embeddings"]).items()}
    embeddings, labels, routing = {}, {}, {}
    for modality in encoded:
        with_text = anchor in pipeline.dataset_modalities(config.eval.data[modality])
        data = _test_split(config, modality, with_text)
        embeddings[modality], routing[modality] = encode(model, params, data[modality], modality, config.eval.batch_size)
        labels[modality] = data["label"]
        if with_text and anchor not in embeddings:  # the first dataset with captions gives the text gallery
            embeddings[anchor] = np.asarray(label_lib.pool_text(data[anchor]))
            labels[anchor] = data["label"]
    metrics = zero_shot.zero_shot_scores(
        embeddings, labels, class_embeddings, modalities=encoded, ks=tuple(config.eval.zero_shot_ks)
    )
    retrieved = tuple(m for m in config.model.modalities if m in embeddings)
    metrics.update(eval_lib.retrieval_scores(
        embeddings, labels, modalities=retrieved, paired=False, ks=tuple(config.eval.retrieval_ks)
    ))
    metrics.update(eval_lib.routing_load(routing, encoded))
    return {"name": stage.name, "modalities": list(stage.modalities), "metrics": metrics}


def pair_trained_together(config: ml_collections.ConfigDict, source: str, target: str) -> bool:
    """Whether a UniAlign run trains two modalities on paired data: only an encoded modality with the anchor."""
    return config.model.anchor in (source, target)


def results_tables(config: ml_collections.ConfigDict, result: dict) -> dict[str, str]:
    """Markdown tables of a UniAlign result: zero-shot, retrieval, routing load (rates in %)."""
    metrics = result["metrics"]
    encoded = config_lib.encoded_modalities(config)
    ks = tuple(config.eval.zero_shot_ks)
    zero_shot_rows = []
    for modality in encoded:
        row = {"modality": modality}
        for k in ks:
            row[f"top-{k} %"] = 100 * metrics[f"zero_shot/{modality}/top{k}"]
            row[f"chance top-{k} %"] = 100 * metrics[f"zero_shot/{modality}/chance_top{k}"]
        zero_shot_rows.append(row)
    zero_shot_columns = ["modality"] + [c for k in ks for c in (f"top-{k} %", f"chance top-{k} %")]

    retrieval_rows = {}
    for key, value in metrics.items():
        if key.startswith("retrieval/"):
            _, pair, recall = key.split("/")
            source, target = pair.split("->")
            status = "trained (anchor)" if pair_trained_together(config, source, target) else "never paired"
            retrieval_rows.setdefault(pair, {"pair": pair, "status": status})[f"{recall} %"] = 100 * value
    recall_columns = [f"R@{k} %" for k in config.eval.retrieval_ks]
    routing_rows = []
    for modality in encoded:
        loads = {k.rsplit("/", 1)[1]: 100 * v for k, v in metrics.items() if k.startswith(f"routing/{modality}/")}
        routing_rows.append({"modality": modality, **{f"{e} %": v for e, v in loads.items()}})
    routing_columns = ["modality"] + sorted({c for row in routing_rows for c in row if c != "modality"})
    return {
        "zero_shot": report.format_table(zero_shot_rows, zero_shot_columns, markdown=True),
        "retrieval": report.format_table(list(retrieval_rows.values()), ["pair", "status", *recall_columns],
                                         markdown=True),
        "routing": report.format_table(routing_rows, routing_columns, markdown=True),
    }


def results_markdown(config: ml_collections.ConfigDict, result: dict) -> str:
    tables = results_tables(config, result)
    return "\n".join([
        f"# UniAlign results: {result['name']} ({', '.join(result['modalities'])})", "",
        "## Zero-shot classification through text anchors", "", tables["zero_shot"], "",
        "## Retrieval (class relevance; chance R@k is about k / number of classes)", "", tables["retrieval"], "",
        "## Routing load (mean router probability per expert, all tokens and MoE-LoRA layers)", "",
        tables["routing"], "",
    ])
