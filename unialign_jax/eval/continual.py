"""Continual-learning summaries of per-stage pair scores: the accuracy matrix, ACC, BWT and FWT.

The tasks of Lopez-Paz & Ranzato (2017, "Gradient Episodic Memory", §4) are here the ordered
cross-modal classification pairs p = X->Y. After stage s, a_{s,p} is the score of pair p (the
`<prefix>X->Y` metric of that stage; missing while X or Y has not been learned). l(p) is the first
stage whose metrics hold p; S is the last stage of the history.

    ACC = mean_p a_{S,p}                                     over every pair scored after stage S
    BWT = mean_{p: l(p) < S} (a_{S,p} - a_{l(p),p})          how much later stages changed earlier pairs
    FWT = mean_{p unseen at l(p)} (a_{l(p),p} - b)           transfer to pairs not trained together

GEM's R_{i,i} (a task's accuracy right after it was learned) is a_{l(p),p}, so BWT is the mean
of the `forgetting/` metrics (`cross_modal.forgetting`). GEM's FWT is R_{i-1,i} - b_i, a task's
accuracy before it is trained, minus that of a randomly initialised model. A pair trained in its
first stage (video->text in video-text) has no "before": the modules of a modality are created in
the stage that first trains it. The pairs whose accuracy before training exists are those not
trained together when first scored (video->audio after video-text then audio-text); FWT averages
them, each at its first stage; what later stages do to them goes into BWT (for these pairs alone,
their mean final accuracy is b + FWT + their mean change since).

The baseline b is chance, 1/C for a head over C classes, not a measured accuracy at
initialisation: no initialised model holds the modules of every pair (see above), and for a
cross-modal pair two untrained encoders share nothing, so the head's prediction for a Y example is
independent of its label, which gives an expected accuracy of exactly 1/C on a class-balanced test
split (and Σ_c q_c π_c in general, for prediction rates q and class frequencies π). The aligned-class
scores use the same b: their head still predicts over all C classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from unialign_jax.eval.cross_modal import pair_status


def _pairs(history: Sequence[Mapping[str, float]], prefix: str) -> list[str]:
    pairs = {}
    for metrics in history:
        for key in metrics:
            if key.startswith(prefix) and "->" in key[len(prefix):] and "/" not in key[len(prefix):]:
                pairs.setdefault(key[len(prefix):], None)
    return list(pairs)


def accuracy_matrix(history: Sequence[Mapping[str, float]], prefix: str = "classification/"
                    ) -> tuple[list[str], np.ndarray]:
    """(pairs, a) with a float[S, P]: a[s, p] = history[s][prefix + pairs[p]], NaN where missing.

    Pairs are ordered by the stage that first scores them, then by their order in that stage's
    metrics. Only keys `<prefix>X->Y` count (not `<prefix>X->Y/R@1`).
    """
    pairs = _pairs(history, prefix)
    matrix = np.full((len(history), len(pairs)), np.nan)
    for s, metrics in enumerate(history):
        for p, pair in enumerate(pairs):
            if prefix + pair in metrics and metrics[prefix + pair] is not None:
                matrix[s, p] = float(metrics[prefix + pair])
    return pairs, matrix


def continual_scores(history: Sequence[Mapping[str, float]], trained_modalities: Sequence[Sequence[str]],
                     chance: float, prefix: str = "classification/") -> dict[str, float]:
    """ACC, BWT and FWT (module docstring) after the last stage of `history`.

    history: one metrics dict per finished stage, oldest first; trained_modalities: the modalities
    each of those stages trained (marks a pair seen or unseen at its first stage); chance: the
    baseline b. Returns {'ACC', 'BWT', 'FWT'} as fractions; a score with no pair to average (BWT
    after one stage, FWT when every pair was trained when first scored) is left out.
    """
    if len(trained_modalities) != len(history):
        raise ValueError(f"{len(history)} stages of metrics but {len(trained_modalities)} lists of trained "
                         "modalities")
    if not 0 < chance < 1:
        raise ValueError(f"chance must lie in (0, 1), got {chance}")
    pairs, matrix = accuracy_matrix(history, prefix)
    scores = {}
    last = matrix[-1]
    if np.any(np.isfinite(last)):
        scores["ACC"] = float(np.nanmean(last))
    first = [int(np.flatnonzero(np.isfinite(matrix[:, p]))[0]) for p in range(len(pairs))]
    backward = [last[p] - matrix[first[p], p] for p in range(len(pairs))
                if first[p] < len(history) - 1 and np.isfinite(last[p])]
    if backward:
        scores["BWT"] = float(np.mean(backward))
    forward = []
    for p, pair in enumerate(pairs):
        modalities = pair.split("->")
        if pair_status(modalities, trained_modalities[: first[p] + 1])[pair] == "unseen":
            forward.append(matrix[first[p], p] - chance)
    if forward:
        scores["FWT"] = float(np.mean(forward))
    return scores


def aligned_classes(trained_classes: Mapping[str, Sequence[int]], source: str, target: str) -> tuple[int, ...]:
    """The classes both modalities of a pair were trained on: trained_classes[X] ∩ trained_classes[Y],
    sorted (trained_classes: {modality: the labels of every training split it was trained on})."""
    for modality in (source, target):
        if modality not in trained_classes:
            raise ValueError(f"no trained classes given for modality {modality!r} (have {sorted(trained_classes)})")
    return tuple(sorted(set(trained_classes[source]) & set(trained_classes[target])))


def below_chance(scores: Mapping[str, float], chance: float, prefix: str = "classification/") -> dict[str, int]:
    """{'below_chance/X->Y': 1 if the pair's score < chance else 0} for every `<prefix>X->Y` score.

    A point comparison, not a test: with n test examples a score's standard error is about
    sqrt(b (1 - b) / n) (1.6 points for b = 0.1, n = 359).
    """
    return {f"below_chance/{key[len(prefix):]}": int(float(value) < chance)
            for key, value in scores.items()
            if key.startswith(prefix) and "->" in key[len(prefix):] and "/" not in key[len(prefix):]}
