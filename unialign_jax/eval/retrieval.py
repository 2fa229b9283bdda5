"""Zero-shot cross-modal retrieval: cosine similarity, recall at k.

Follows the retrieval utilities of the CMG authors (`ACL25-FCID&TOC/src/model/retrieval_utils.py`,
reference_implementations.md §1.8): cosine similarity between query and gallery embeddings; a
query's rank is the position of its best-ranked relevant gallery item; R@k = fraction of queries
with rank < k. Differences, on purpose:
- Ties are broken against the query: every irrelevant item whose similarity is within `TIE_TOLERANCE`
  of the best relevant one ranks before it. Quantized features are discrete, so exact ties are
  common; with optimistic tie-breaking a collapsed codebook (all items mapped to the same codes)
  would reach R@1 = 1.
- Recalls are fractions in [0, 1] (the report prints percentages).
- Sequence features float[N, T, D] are mean-pooled over T before the similarity (`pool_sequence`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from unialign_jax.eval.cross_modal import ordered_pairs, pair_name

TIE_TOLERANCE = 1e-6
_QUERY_CHUNK = 1024


def pool_sequence(features: np.ndarray) -> np.ndarray:
    """float[N, T, D] -> float[N, D] by the mean over T; float[N, D] is returned as is."""
    features = np.asarray(features, np.float32)
    if features.ndim == 3:
        return features.mean(axis=1)
    if features.ndim == 2:
        return features
    raise ValueError(f"retrieval features must be float[N, D] or float[N, T, D], got shape {features.shape}")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def first_relevant_rank(similarity: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    """0-based rank of the best relevant gallery item of each query; -1 for queries with none.

    similarity: float[N, M]; relevance: bool[N, M]. rank_i = #{j irrelevant : s_ij >= max_{j relevant} s_ij - tol}.
    """
    best_relevant = np.where(relevance, similarity, -np.inf).max(axis=1, keepdims=True)
    ranks = np.sum(~relevance & (similarity >= best_relevant - TIE_TOLERANCE), axis=1)
    return np.where(relevance.any(axis=1), ranks, -1)


def _same_id_rows(query_ids: np.ndarray, gallery_ids: np.ndarray) -> Callable[[int, int], np.ndarray]:
    """Relevance rows [start, stop) built on demand: gallery j answers query i when their ids match."""
    return lambda start, stop: query_ids[start:stop, None] == gallery_ids[None, :]


def _recall(
    query: np.ndarray,
    gallery: np.ndarray,
    relevance_rows: Callable[[int, int], np.ndarray],
    ks: Sequence[int],
) -> dict[str, float]:
    query, gallery = _unit_rows(np.asarray(query, np.float32)), _unit_rows(np.asarray(gallery, np.float32))
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {query.shape} and gallery {gallery.shape} must be float[N, D] and float[M, D]")
    ranks = np.concatenate(
        [
            first_relevant_rank(query[start:stop] @ gallery.T, relevance_rows(start, stop))
            for start, stop in ((i, i + _QUERY_CHUNK) for i in range(0, query.shape[0], _QUERY_CHUNK))
        ]
    )
    ranks = ranks[ranks >= 0]
    if ranks.size == 0:
        raise ValueError("no query has a relevant item in the gallery")
    return {f"R@{k}": float(np.mean(ranks < k)) for k in ks}


def retrieval_recall(
    query: np.ndarray, gallery: np.ndarray, relevance: np.ndarray, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Recall at k of retrieving relevant gallery items by cosine similarity.

    query: float[N, D]; gallery: float[M, D]; relevance: bool[N, M] (True = gallery j answers query i).
    Returns {'R@k': fraction of queries whose best relevant item ranks in the top k}; queries with
    no relevant item are left out of the average.
    """
    relevance = np.asarray(relevance, bool)
    if relevance.shape != (np.shape(query)[0], np.shape(gallery)[0]):
        raise ValueError(f"relevance must be bool[{np.shape(query)[0]}, {np.shape(gallery)[0]}], got {relevance.shape}")
    return _recall(query, gallery, lambda start, stop: relevance[start:stop], ks)


def retrieval_scores(
    features: Mapping[str, np.ndarray],
    labels: Mapping[str, np.ndarray] | None = None,
    *,
    modalities: Sequence[str],
    paired: bool,
    pairs: Sequence[tuple[str, str]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """R@k for each ordered (query, gallery) modality pair.

    features: {modality: float[N_m, T, D] or float[N_m, D]} (sequences are mean-pooled over T).
    paired: True when row i of every modality is the same instance (e.g. a video and its caption):
      the relevant item is the paired one (the diagonal). False: items of the same class are
      relevant, from `labels` {modality: int[N_m]}.
    pairs: ordered (query, gallery) pairs; default every ordered pair of `modalities`.
    Returns {'retrieval/X->Y/R@k': recall in [0, 1]}.
    """
    pairs = ordered_pairs(modalities) if pairs is None else [tuple(p) for p in pairs]
    involved = list(dict.fromkeys(m for pair in pairs for m in pair))
    if missing := [m for m in involved if m not in features]:
        raise ValueError(f"retrieval features missing for modalities {missing} (have {sorted(features)})")
    pooled = {m: pool_sequence(features[m]) for m in involved}
    scores = {}
    for source, target in pairs:
        query, gallery = pooled[source], pooled[target]
        if paired:
            if query.shape[0] != gallery.shape[0]:
                raise ValueError(
                    f"paired retrieval {pair_name(source, target)} needs as many queries as gallery items, "
                    f"got {query.shape[0]} and {gallery.shape[0]}"
                )
            query_ids = gallery_ids = np.arange(query.shape[0])
        else:
            if labels is None or source not in labels or target not in labels:
                raise ValueError(f"class-relevance retrieval {pair_name(source, target)} needs labels of both")
            query_ids, gallery_ids = np.asarray(labels[source]), np.asarray(labels[target])
            if query_ids.shape != query.shape[:1] or gallery_ids.shape != gallery.shape[:1]:
                raise ValueError(f"labels of {pair_name(source, target)} do not match the number of features")
        relevance_rows = _same_id_rows(query_ids, gallery_ids)
        for key, value in _recall(query, gallery, relevance_rows, ks).items():
            scores[f"retrieval/{pair_name(source, target)}/{key}"] = value
    return scores
