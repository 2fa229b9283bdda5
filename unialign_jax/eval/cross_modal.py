"""Cross-modal generalization (CMG protocol) on frozen features, and continual bookkeeping.

Protocol (CMG, reference `haihuangcode/CMG` `ave.py` / `avvp.py`; COMET §4): the encoder is frozen and
each example is represented by its quantized code vectors float[T, D]. A small head
(`heads.ClassificationHead` / `heads.LocalisationHead`) is trained on the labelled features of a
source modality X and evaluated, unchanged, on the features of a target modality Y.

Differences from the reference, on purpose (reference_implementations.md §1.8 and trap 9):
- The reference AVE script evaluates on the other modality of the *training* split and reports the
  best epoch measured on that test modality. Here the head is trained on X's `train` features and
  evaluated on Y's held-out `test` features after a fixed number of steps (no selection on the
  test data). Passing the same split as `train` and `test` reproduces the reference protocol.
- Localisation: the reference (AVVP) is multi-label per segment (BCE + ExpLogLoss, threshold 0.5,
  per-batch averaged precision/recall). Our data contract has one label per step (`step_labels`
  int[N, T]), so the head is trained with softmax cross-entropy, predicts the argmax per step, and
  is scored with macro-F1 over the whole test set (`localisation_f1`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np

from unialign_jax.eval import heads


class LabelledFeatures(NamedTuple):
    """Frozen features of one modality in one split, with their labels.

    features: float[N, T, D] quantized code vectors; labels: int[N] sequence classes;
    step_labels: int[N, T] per-step classes (negative = padding, ignored), or None.
    """

    features: np.ndarray
    labels: np.ndarray
    step_labels: np.ndarray | None = None


def pair_name(source: str, target: str) -> str:
    """'video->audio': the name of the ordered modality pair used in metric keys."""
    return f"{source}->{target}"


def ordered_pairs(modalities: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered pair of distinct modalities, sources in `modalities` order."""
    return [(source, target) for source in modalities for target in modalities if source != target]


def classification_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of sequences whose predicted class equals the label (in [0, 1])."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or labels.size == 0:
        raise ValueError(f"accuracy needs equal non-empty shapes, got {predictions.shape} and {labels.shape}")
    return float(np.mean(predictions == labels))


def localisation_f1(predictions: np.ndarray, step_labels: np.ndarray) -> float:
    """Per-step macro-F1 (in [0, 1]) over the classes present in the ground truth.

    All valid steps of the whole set are pooled (steps whose label is negative are ignored). For
    each class c that occurs in the valid ground-truth steps, `F1_c = 2·TP_c / (2·TP_c + FP_c + FN_c)`
    with TP/FP/FN counted over the pooled steps (a step predicted as c counts as FP_c when its label
    is another class). The score is the unweighted mean of F1_c. Predicted classes that never occur
    in the ground truth get no F1 of their own; their false positives lower the recall of the true
    classes. Equals `sklearn.metrics.f1_score(y, p, labels=np.unique(y), average='macro')`.
    """
    predictions, step_labels = np.asarray(predictions), np.asarray(step_labels)
    if predictions.shape != step_labels.shape:
        raise ValueError(f"predictions {predictions.shape} and step labels {step_labels.shape} differ in shape")
    valid = step_labels >= 0
    truth, guess = step_labels[valid], predictions[valid]
    if truth.size == 0:
        raise ValueError("localisation F1 needs at least one step with a non-negative label")
    scores = []
    for cls in np.unique(truth):
        true_positive = np.sum((guess == cls) & (truth == cls))
        false_positive = np.sum((guess == cls) & (truth != cls))
        false_negative = np.sum((guess != cls) & (truth == cls))
        scores.append(2 * true_positive / (2 * true_positive + false_positive + false_negative))
    return float(np.mean(scores))


def _check_split(name: str, modality: str, data: LabelledFeatures) -> None:
    features = np.shape(data.features)
    if len(features) != 3 or features[0] == 0:
        raise ValueError(f"{name}[{modality!r}].features must be float[N, T, D] with N > 0, got {features}")
    if np.shape(data.labels) != features[:1]:
        raise ValueError(f"{name}[{modality!r}].labels must be int[{features[0]}], got {np.shape(data.labels)}")
    if data.step_labels is not None and np.shape(data.step_labels) != features[:2]:
        raise ValueError(
            f"{name}[{modality!r}].step_labels must be int{list(features[:2])}, got {np.shape(data.step_labels)}"
        )


def _num_classes(arrays: Iterable[np.ndarray]) -> int:
    return int(max(np.max(a) for a in arrays)) + 1


def cross_modal_scores(
    train: Mapping[str, LabelledFeatures],
    test: Mapping[str, LabelledFeatures],
    *,
    modalities: Sequence[str],
    pairs: Sequence[tuple[str, str]] | None = None,
    num_classes: int | None = None,
    num_step_classes: int | None = None,
    aligned_classes: Mapping[str, Sequence[int]] | None = None,
    config: heads.HeadTrainConfig = heads.HeadTrainConfig(),
) -> dict[str, float]:
    """Trains heads on each source modality's `train` split and scores them on each target's `test` split.

    Args:
      train: {modality: LabelledFeatures} used to fit the heads (only source modalities are needed).
      test: {modality: LabelledFeatures} on which heads are evaluated (only target modalities needed).
      modalities: order of the modalities; `pairs` defaults to every ordered pair of them.
      pairs: ordered (source, target) pairs to score.
      num_classes / num_step_classes: head output sizes; default 1 + the largest label seen in the
        train and test arrays involved.
      aligned_classes: {'X->Y': class ids} (e.g. the classes both X and Y were trained on): the same
        head's accuracy on the test examples of Y whose label is one of them (the prediction is
        still the argmax over all classes).
      config: head training settings (`heads.HeadTrainConfig`).

    Returns:
      {'classification/X->Y': accuracy, 'localisation/X->Y': macro-F1} in [0, 1] for every pair; the
      localisation entry only when both train[X] and test[Y] carry `step_labels`;
      'aligned/classification/X->Y' for the pairs of `aligned_classes` with a test example in them.

    One classification head (and one localisation head) is trained per source modality and reused
    for all its targets; sources with equal shapes share one compiled training function.
    """
    pairs = ordered_pairs(modalities) if pairs is None else [tuple(p) for p in pairs]
    sources = list(dict.fromkeys(source for source, _ in pairs))
    targets = list(dict.fromkeys(target for _, target in pairs))
    for name, split, needed in (("train", train, sources), ("test", test, targets)):
        for modality in needed:
            if modality not in split:
                raise ValueError(f"{name} has no features for modality {modality!r} (has {sorted(split)})")
            _check_split(name, modality, split[modality])
    for source, target in pairs:
        source_dim, target_dim = np.shape(train[source].features)[-1], np.shape(test[target].features)[-1]
        if source_dim != target_dim:
            raise ValueError(f"pair {pair_name(source, target)}: feature dims differ ({source_dim} vs {target_dim})")

    localised = [(s, t) for s, t in pairs if train[s].step_labels is not None and test[t].step_labels is not None]
    label_classes = _num_classes([train[m].labels for m in sources] + [test[m].labels for m in targets])
    if num_classes is None:
        num_classes = label_classes
    elif label_classes > num_classes:
        raise ValueError(f"labels go up to {label_classes - 1}, but num_classes is {num_classes}")
    if localised:
        step_classes = _num_classes(
            [train[s].step_labels for s, _ in localised] + [test[t].step_labels for _, t in localised]
        )
        if num_step_classes is None:
            num_step_classes = step_classes
        elif step_classes > num_step_classes:
            raise ValueError(f"step labels go up to {step_classes - 1}, but num_step_classes is {num_step_classes}")
    classifier = heads.ClassificationHead(num_classes, config.hidden_dim)
    localiser = heads.LocalisationHead(num_step_classes, config.hidden_dim) if localised else None

    classifier_params, localiser_params, scores = {}, {}, {}
    for source, target in pairs:
        name = pair_name(source, target)
        if source not in classifier_params:
            classifier_params[source], _ = heads.train_head(
                classifier, train[source].features, train[source].labels, config
            )
        predictions = heads.predict(classifier, classifier_params[source], test[target].features, config).argmax(-1)
        scores[f"classification/{name}"] = classification_accuracy(predictions, test[target].labels)
        if aligned_classes is not None and name in aligned_classes:
            chosen = np.isin(test[target].labels, np.asarray(aligned_classes[name], int))
            if chosen.any():
                scores[f"aligned/classification/{name}"] = classification_accuracy(
                    predictions[chosen], test[target].labels[chosen])
        if (source, target) in localised:
            if source not in localiser_params:
                localiser_params[source], _ = heads.train_head(
                    localiser, train[source].features, train[source].step_labels, config
                )
            logits = heads.predict(localiser, localiser_params[source], test[target].features, config)
            scores[f"localisation/{name}"] = localisation_f1(logits.argmax(-1), test[target].step_labels)
    return scores


# ---------------------------------------------------------------------------------------------------
# Continual bookkeeping: which pairs were trained together, and how much a score dropped since.


def pair_status(modalities: Sequence[str], trained_modalities: Sequence[Sequence[str]]) -> dict[str, str]:
    """Marks each ordered pair of `modalities` 'seen' or 'unseen'.

    A pair (X, Y) is 'seen' when X and Y were both among the modalities of one training stage so far
    (`trained_modalities` lists each stage's modalities, e.g. [('video', 'text'), ('audio', 'text')]),
    and 'unseen' otherwise (e.g. video->audio after VT then AT: linked only through the mediator).
    """
    trained = [set(stage) for stage in trained_modalities]
    return {
        pair_name(x, y): "seen" if any({x, y} <= stage for stage in trained) else "unseen"
        for x, y in ordered_pairs(modalities)
    }


def forgetting(history: Sequence[Mapping[str, float]], learned_at: Mapping[str, int]) -> dict[str, float]:
    """Change of each metric since the stage right after it was learned.

    history: one metrics dict per finished stage, oldest first (the last one is "now").
    learned_at: {metric key: index into `history` of the stage right after which it was learned}.
    Returns {'forgetting/<key>': history[-1][key] - history[learned_at[key]][key]}; negative values
    mean the score dropped (forgotten), 0 for a metric learned at the last stage.
    """
    if not history:
        raise ValueError("forgetting needs at least one stage of metrics")
    result = {}
    for key, stage in learned_at.items():
        if not -len(history) <= stage < len(history):
            raise ValueError(f"{key!r} learned at stage {stage}, but only {len(history)} stages have metrics")
        for index in (stage, -1):
            if key not in history[index]:
                raise ValueError(f"metric {key!r} missing from the metrics of stage {index % len(history)}")
        result[f"forgetting/{key}"] = float(history[-1][key]) - float(history[stage][key])
    return result
