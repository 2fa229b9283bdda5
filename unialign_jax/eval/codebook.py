"""Codebook and MoE-routing diagnostics on arrays of code indices and router probabilities.

`codebook_usage` gives the statistics of COMET Fig. 3 (codes "effectively activated" by one, two,
or three and more modalities; never-activated codes) plus per-modality perplexity. The paper does not
define "effectively activated"; here a code counts as used by a modality when that modality selected
it at least `min_count` times (default 1) in the evaluated data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def code_usage_counts(codes: Mapping[str, np.ndarray], active_count: int, modalities: Sequence[str]) -> np.ndarray:
    """int[active_count, len(modalities)]: how often each active code was selected by each modality.

    codes: {modality: int[...] code indices} (e.g. int[N, T]); every index must be an active code,
    i.e. in [0, active_count): a selected inactive code is a quantizer bug, not a statistic.
    """
    if active_count <= 0:
        raise ValueError(f"active_count must be positive, got {active_count}")
    counts = np.zeros((active_count, len(modalities)), np.int64)
    for column, modality in enumerate(modalities):
        if modality not in codes:
            raise ValueError(f"no codes given for modality {modality!r} (have {sorted(codes)})")
        indices = np.asarray(codes[modality]).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= active_count):
            raise ValueError(
                f"{modality} codes must lie in [0, {active_count}) (the active codes), "
                f"got range [{indices.min()}, {indices.max()}]"
            )
        counts[:, column] = np.bincount(indices, minlength=active_count)
    return counts


def perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of the code distribution given by counts int[K]: 1 (one code) up to K (uniform)."""
    total = counts.sum()
    if total == 0:
        raise ValueError("perplexity of an empty code histogram")
    probabilities = counts[counts > 0] / total
    return float(np.exp(-np.sum(probabilities * np.log(probabilities))))


def codebook_usage(
    codes: Mapping[str, np.ndarray], active_count: int, modalities: Sequence[str], *, min_count: int = 1
) -> dict[str, float]:
    """Codebook sharing across modalities (COMET Fig. 3) and per-modality perplexity.

    Returns {'codebook/active': K, 'codebook/used_by_1': n1, 'codebook/used_by_2': n2,
    'codebook/used_by_3+': n3, 'codebook/dead': n0, 'codebook/perplexity/<modality>': p}, where n_k
    counts active codes used (>= `min_count` selections) by exactly k modalities (k >= 3 for the
    last), n0 the active codes no modality uses (n0 + n1 + n2 + n3 = K).
    """
    counts = code_usage_counts(codes, active_count, modalities)
    users = np.sum(counts >= min_count, axis=1)
    metrics = {
        "codebook/active": active_count,
        "codebook/used_by_1": int(np.sum(users == 1)),
        "codebook/used_by_2": int(np.sum(users == 2)),
        "codebook/used_by_3+": int(np.sum(users >= 3)),
        "codebook/dead": int(np.sum(users == 0)),
    }
    for column, modality in enumerate(modalities):
        metrics[f"codebook/perplexity/{modality}"] = perplexity(counts[:, column])
    return metrics


def routing_load(router_probs: Mapping[str, np.ndarray], modalities: Sequence[str]) -> dict[str, float]:
    """Share of the routing mass each expert receives, per modality.

    router_probs: {modality: float[..., U]} router probabilities (or gate weights) per token.
    load_{m,j} = mean over all tokens of modality m of p_j, so Σ_j load_{m,j} = 1 for softmax routers;
    a balanced router gives 1/U each. Returns {'routing/<modality>/expert_<j>': load}.
    """
    metrics = {}
    for modality in modalities:
        if modality not in router_probs:
            raise ValueError(f"no router probabilities given for modality {modality!r} (have {sorted(router_probs)})")
        probs = np.asarray(router_probs[modality], np.float64)
        load = probs.reshape(-1, probs.shape[-1]).mean(axis=0)
        metrics.update({f"routing/{modality}/expert_{j}": float(v) for j, v in enumerate(load)})
    return metrics


def code_sharing(codes: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Per ordered pair X->Y, the fraction of X's tokens whose code Y also selects (at least once).

    codes: {modality: int[...] code indices of the same evaluated examples}. For X->Y it is
    |{tokens t of X : code(t) in codes(Y)}| / |tokens of X|, in [0, 1]: 0 means a head trained on X's
    codes never sees a code of Y, so nothing can transfer through the codebook. Not symmetric.
    Returns {'code_sharing/X->Y': fraction}.
    """
    metrics = {}
    for source, target in pairs:
        for modality in (source, target):
            if modality not in codes:
                raise ValueError(f"no codes given for modality {modality!r} (have {sorted(codes)})")
        source_codes = np.asarray(codes[source]).reshape(-1)
        if source_codes.size == 0:
            raise ValueError(f"code sharing {source}->{target}: {source} has no tokens")
        shared = np.isin(source_codes, np.asarray(codes[target]).reshape(-1))
        metrics[f"code_sharing/{source}->{target}"] = float(np.mean(shared))
    return metrics
