"""Zero-shot classification through text anchors (UniAlign §4: top-1 / top-5 accuracy).

An example of modality m is classified by the cosine similarity of its embedding to the text
embeddings of its dataset's class labels (no head is trained): the predicted classes are the k most
similar labels, and top-k accuracy is the fraction of examples whose label is among them. Ties are
broken against the example (a label tied with the true one counts as ranked before it), so a
collapsed embedding cannot score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

TIE_TOLERANCE = 1e-6


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float32[N, M]: `s_ij = a_i . b_j / (|a_i| |b_j|)` of a float[N, D] and b float[M, D] (zero rows give 0)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine similarity of float[N, D] and float[M, D] arrays, got shapes {a.shape} and {b.shape}")
    return _unit_rows(a) @ _unit_rows(b).T


def label_ranks(embeddings: np.ndarray, labels: np.ndarray, class_embeddings: np.ndarray) -> np.ndarray:
    """0-based rank of each example's true class among all classes by cosine similarity: int[N].

    embeddings: float[N, D]; labels: int[N] in [0, C); class_embeddings: float[C, D].
    rank_i = #{c != label_i : s_ic >= s_i,label_i - tol}.
    """
    embeddings, class_embeddings = np.asarray(embeddings), np.asarray(class_embeddings)
    labels = np.asarray(labels)
    if embeddings.ndim != 2 or class_embeddings.ndim != 2 or embeddings.shape[1] != class_embeddings.shape[1]:
        raise ValueError(f"embeddings {embeddings.shape} and class embeddings {class_embeddings.shape} must be "
                         "float[N, D] and float[C, D]")
    if labels.shape != embeddings.shape[:1] or labels.size == 0:
        raise ValueError(f"labels must be int[{embeddings.shape[0]}] with N > 0, got shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= class_embeddings.shape[0]:
        raise ValueError(f"labels must lie in [0, {class_embeddings.shape[0]}), got [{labels.min()}, {labels.max()}]")
    similarity = cosine_similarity(embeddings, class_embeddings)
    true = np.take_along_axis(similarity, labels[:, None], axis=1)
    others = np.ones_like(similarity, bool)
    others[np.arange(len(labels)), labels] = False
    return np.sum(others & (similarity >= true - TIE_TOLERANCE), axis=1)


def top_k_accuracy(embeddings: np.ndarray, labels: np.ndarray, class_embeddings: np.ndarray,
                   ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """{'top{k}': fraction of examples whose class is among the k labels most similar to them}."""
    ranks = label_ranks(embeddings, labels, class_embeddings)
    return {f"top{k}": float(np.mean(ranks < k)) for k in ks}


def zero_shot_scores(embeddings: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                     class_embeddings: Mapping[str, np.ndarray], *, modalities: Sequence[str],
                     ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Per modality top-k accuracy and its chance level (k / C, capped at 1).

    Returns {'zero_shot/<m>/top<k>': accuracy, 'zero_shot/<m>/chance_top<k>': min(k / C_m, 1)}.
    """
    scores = {}
    for modality in modalities:
        for name, table in (("embeddings", embeddings), ("labels", labels), ("class_embeddings", class_embeddings)):
            if modality not in table:
                raise ValueError(f"zero-shot {name} missing for modality {modality!r} (have {sorted(table)})")
        accuracy = top_k_accuracy(embeddings[modality], labels[modality], class_embeddings[modality], ks)
        num_classes = np.shape(class_embeddings[modality])[0]
        for k in ks:
            scores[f"zero_shot/{modality}/top{k}"] = accuracy[f"top{k}"]
            scores[f"zero_shot/{modality}/chance_top{k}"] = min(k / num_classes, 1.0)
    return scores
