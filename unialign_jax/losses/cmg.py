"""CMG / DCID losses (also the COMET backbone losses), following the public CMG code.

Notation: B batch, T sequence length, D feature size, K codebook capacity (`cmcm_loss`) or number of
CPC prediction steps (`cross_cpc_loss`). Per-modality inputs are dicts keyed by modality name;
the `modalities` tuple fixes which entries are used and in what order. Equation numbers refer to
the CMG paper as quoted in `reference_implementations.md` §1.6 and to COMET (`comet.txt` §2).
"""

import itertools
from collections.abc import Mapping, Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from unialign_jax.losses.contrastive import diagonal_log_softmax

Modalities = Sequence[str]


def _select(values: Mapping[str, jax.Array], modalities: Modalities, what: str) -> list[jax.Array]:
    """values[m] for m in modalities, with an error that names the missing modality."""
    missing = [m for m in modalities if m not in values]
    if missing:
        raise KeyError(f"{what} has no entry for modalities {missing}; it has {sorted(values)}.")
    return [values[m] for m in modalities]


def _mse(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(a - b))


def reconstruction_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """L_recon = mean over all elements of (prediction − target)² (`F.mse_loss`, reference §1.6.1)."""
    if prediction.shape != target.shape:
        raise ValueError(
            f"reconstruction shapes differ: prediction {prediction.shape}, target {target.shape}."
        )
    return _mse(prediction, target)


def commitment_loss(
    semantic: Mapping[str, jax.Array],
    code_vectors: Mapping[str, jax.Array],
    modalities: Modalities,
    beta: float = 0.25,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-modal commitment loss as implemented in CMG (reference §1.6.2).

    For each modality m with N modalities in all, z_m = semantic[m] [B, T, D] and q_o =
    code_vectors[o] [B, T, D] (the codebook rows assigned to modality o, gathered from the
    codebook *before* this step's EMA update):

      L_m = 2β·MSE(z_m, sg q_m) + Σ_{o≠m} β/(N−1)·MSE(z_m, sg q_o),   L = Σ_m L_m,

    MSE = mean over B·T·D. With β = 0.25 the weights are 0.5 / 0.25 (bimodal) and
    0.5 / 0.125 / 0.125 (trimodal), as in the code; the CMG paper's Eq. 8 writes β and β/2, i.e. the
    same ratio at half the magnitude. The code vectors are stop-gradient'ed here (the codebook moves
    by EMA only), so gradients reach the semantic encoder alone.

    Returns (L, {m: L_m}).
    """
    z = _select(semantic, modalities, "semantic")
    q = [jax.lax.stop_gradient(v) for v in _select(code_vectors, modalities, "code_vectors")]
    num_modalities = len(modalities)
    per_modality = {}
    for m, name in enumerate(modalities):
        term = 2.0 * beta * _mse(z[m], q[m])
        for o in range(num_modalities):
            if o != m:
                term = term + beta / (num_modalities - 1) * _mse(z[m], q[o])
        per_modality[name] = term
    return sum(per_modality.values()), per_modality


def _safe_sqrt(x: jax.Array) -> jax.Array:
    """sqrt(max(x, 0)) with gradient 0 (not inf/NaN) where x ≤ 0."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def cmcm_loss(
    squared_distances: Mapping[str, jax.Array],
    modalities: Modalities,
    code_mask: jax.Array | None = None,
) -> jax.Array:
    """Cross-modal code matching (CMCM, from Liu et al.) as implemented in CMG (reference §1.6.3).

    For each modality, from the squared distances d [B, T, K] of the (non-detached) semantic
    vectors to the K codebook rows:

      p[b, t, k] = softmax_k(−sqrt(max(d, 0)))   (codes with code_mask False get probability 0),
      P[b, k]    = mean_t p[b, t, k],
      S_xy[i, j] = Σ_k P_x[i, k]·log(P_y[j, k] + 1e-10) + Σ_k P_y[i, k]·log(P_x[j, k] + 1e-10),
      L_xy       = −mean_i log softmax_j(S_xy)[i, i]          (row direction only),
      L          = ½ Σ_{unordered pairs x<y} L_xy   (bimodal ½·L_av, trimodal ½·(L_av + L_at + L_tv)).

    S_xy = S_yx, so pair order does not matter. Deviations from the code, all numerically
    negligible: the log-softmax uses logsumexp instead of the code's exp(S − min S) / (Σ exp(·) + 1e-5)
    (the 1e-5 changes each log term by < 1e-5 and the min-shift overflows in float32); the distance is
    clamped at 0 and its sqrt has a finite gradient at 0 (expanded-form distances can be slightly
    negative); inactive codes are removed by an explicit mask rather than by +inf distances
    (which would give NaN gradients).

    Args:
      squared_distances: {modality: [B, T, K]} squared Euclidean distances to the codebook rows.
      modalities: at least two modality names.
      code_mask: optional bool [K], True for active codes.
    """
    if len(modalities) < 2:
        raise ValueError(f"cmcm_loss needs at least two modalities, got {tuple(modalities)}.")
    code_distributions = {}
    for name, distances in zip(modalities, _select(squared_distances, modalities, "squared_distances")):
        probs = jax.nn.softmax(-_safe_sqrt(distances), axis=-1, where=code_mask)
        code_distributions[name] = jnp.mean(probs, axis=1)
    total = 0.0
    for x, y in itertools.combinations(modalities, 2):
        p_x, p_y = code_distributions[x], code_distributions[y]
        scores = p_x @ jnp.log(p_y + 1e-10).T + p_y @ jnp.log(p_x + 1e-10).T
        total = total - jnp.mean(diagonal_log_softmax(scores, axis=-1))
    return 0.5 * total


def sample_cpc_time_index(rng: jax.Array, seq_len: int, prediction_steps: int) -> jax.Array:
    """One context time index t ~ U{1, …, T − K − 1} for the whole batch (int32 scalar).

    Reference: `randint(T − K − 1) + 1` (min_start_steps = 1), so the context covers steps 0..t
    and the targets t+1..t+K all lie inside the sequence. T = 10, K = 1 gives t ∈ {1..8}.
    """
    if seq_len - prediction_steps - 1 < 1:
        raise ValueError(
            f"Cross-CPC needs seq_len ≥ prediction_steps + 2, got seq_len={seq_len}, "
            f"prediction_steps={prediction_steps}."
        )
    return jax.random.randint(rng, (), 1, seq_len - prediction_steps, dtype=jnp.int32)


def cpc_top1_accuracy(scores: jax.Array, axis: int = -1) -> jax.Array:
    """Cross-CPC accuracy as the CMG code logs it, for score matrices G [..., B, B] (G[i, j] =
    target i · prediction j):

      P = softmax(G, axis),   acc = mean_{..., c} [argmax over the OTHER axis of P, at c, = c].

    With `axis=-1` (the reference, `Cross_CPC` / `Cross_CPC_AVT` of the NeurIPS code:
    `argmax(softmax(G), dim=0)`, where `nn.Softmax()` on a 2-D tensor normalises dim 1), column j
    of the row-normalised P asks whether target j is the most probable target for prediction j.
    The argmax runs across rows that each have their own normaliser, so this is neither the row
    argmax of G (the softmax's own axis) nor the column argmax of G. `axis=-2` is the same with
    the two axes swapped.
    """
    if axis not in (-1, -2):
        raise ValueError(f"cpc_top1_accuracy normalises over axis -1 or -2, got {axis}.")
    probabilities = jax.nn.softmax(scores, axis=axis)
    other_axis = -2 if axis == -1 else -1
    hits = jnp.argmax(probabilities, axis=other_axis) == jnp.arange(scores.shape[other_axis])
    return jnp.mean(hits.astype(jnp.float32))


def cross_cpc_loss(
    semantic: Mapping[str, jax.Array],
    predictions: Mapping[str, jax.Array],
    time_index: jax.Array,
    modalities: Modalities,
    cross_weight: float = 1.0,
    self_weight: float = 0.1,
    normalize_over: Literal["predictions", "targets"] = "predictions",
    position_weights: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Cross-CPC InfoNCE between every ordered pair of modalities (CMG; COMET Eq. 2; reference §1.6.4).

    semantic[m] [B, T, D] are the *pre-quantisation* semantic sequences z_m; predictions[m]
    [B, T, K, D] holds W_k c_t, modality m's prediction of step t+1+k from its context at step t.
    With t = time_index (see `sample_cpc_time_index`; it must satisfy t + K ≤ T − 1, as dynamic
    slicing clamps out-of-range starts silently), for each ordered pair (target x, predictor y) and
    each step k:

      G[i, j] = z_x[i, t+1+k] · p_y[j, t, k],      term_xy,k = Σ_i log softmax(G)[i, i],
      L = −(Σ_{x, y, k} w_xy · term_xy,k) / (B·K),  w_xy = cross_weight (x ≠ y) or self_weight (x = y).

    `normalize_over="predictions"` takes the softmax over j (candidate predictions): this is the
    code (`nn.LogSoftmax()` on a 2-D tensor normalises dim 1). `"targets"` takes it over i
    (candidate targets), as written in the paper's Eq. 2; the two are transposes of each other.

    `position_weights` ({m: [B, T]}, optional) serves COMET's Pseudo-Modality Replay: positions of
    the pseudo-modality that fell on newly added codes get weight e^-8. The diagonal term of sample i
    is multiplied by w_x[i, t+1+k]·w_y[i, t] (target position times context position); the weights
    scale only the positive's log-probability, the softmax normaliser is unchanged. The division
    stays B·K. Modalities absent from the mapping have weight 1.

    Returns (L, metrics) with the accuracy `accuracy_{x}_from_{y}` of every pair as the CMG code
    computes it (`cpc_top1_accuracy`: softmax along the normalised axis, arg-max along the other),
    averaged over the K steps (the code logs the last step only; K = 1 there).
    """
    if normalize_over not in ("predictions", "targets"):
        raise ValueError(f"normalize_over must be 'predictions' or 'targets', got {normalize_over!r}.")
    axis = -1 if normalize_over == "predictions" else -2
    semantic_seqs = _select(semantic, modalities, "semantic")
    prediction_seqs = _select(predictions, modalities, "predictions")
    batch, _, steps, _ = prediction_seqs[0].shape
    for name, z, p in zip(modalities, semantic_seqs, prediction_seqs):
        if p.ndim != 4 or p.shape[:2] != z.shape[:2] or p.shape[2] != steps:
            raise ValueError(
                f"predictions[{name!r}] must be [B, T, K, D] matching semantic {z.shape[:2]} and "
                f"K={steps}, got {p.shape}."
            )
    position_weights = position_weights or {}

    targets, contexts, target_weights, context_weights = {}, {}, {}, {}
    for name, z, p in zip(modalities, semantic_seqs, prediction_seqs):
        targets[name] = jax.lax.dynamic_slice_in_dim(z, time_index + 1, steps, axis=1)  # [B, K, D]
        contexts[name] = jax.lax.dynamic_index_in_dim(p, time_index, axis=1, keepdims=False)
        weights = position_weights.get(name, jnp.ones(z.shape[:2], z.dtype))
        target_weights[name] = jax.lax.dynamic_slice_in_dim(weights, time_index + 1, steps, axis=1).T
        context_weights[name] = jax.lax.dynamic_index_in_dim(weights, time_index, axis=1, keepdims=False)

    weighted_sum = 0.0
    metrics = {}
    for x in modalities:
        for y in modalities:
            scores = jnp.einsum("ikd,jkd->kij", targets[x], contexts[y])  # [K, B, B]
            positives = diagonal_log_softmax(scores, axis) * target_weights[x] * context_weights[y]
            weighted_sum = weighted_sum + (self_weight if x == y else cross_weight) * jnp.sum(positives)
            metrics[f"accuracy_{x}_from_{y}"] = cpc_top1_accuracy(scores, axis)
    return -weighted_sum / (batch * steps), metrics


def club_log_likelihood(mu: jax.Array, logvar: jax.Array, y: jax.Array) -> jax.Array:
    """CLUB estimator objective (maximised by the estimator's own optimizer, reference §1.6.5).

      ℓ = mean_{b,t} Σ_d [−(μ − y)² / exp(logvar) − logvar] / 2,

    the unnormalised Gaussian log-likelihood log q_θ(y | x) with per-step μ, logvar [B, T, D] (or
    [N, D]), i.e. `CLUBSample_group.loglikeli`. Callers stop gradients into x and y for this step.
    """
    per_position = jnp.sum(-jnp.square(mu - y) / jnp.exp(logvar) - logvar, axis=-1)
    return jnp.mean(per_position) / 2


def sample_club_permutations(
    rng: jax.Array, batch_size: int, modalities: Modalities
) -> dict[str, jax.Array]:
    """One independent batch permutation per modality for the CLUB negatives ({m: int32 [B]}).

    The reference's `CLUBSample_group.mi_est` draws its own `torch.randperm(B)` on every call, one
    call per modality, so each modality's negatives are shuffled independently. Here `rng` is split
    into len(modalities) keys, one per modality in the given order.
    """
    keys = jax.random.split(rng, len(modalities))
    return {m: jax.random.permutation(key, batch_size) for m, key in zip(modalities, keys)}


def club_mi_upper_bound(
    mu: jax.Array, logvar: jax.Array, y: jax.Array, permutation: jax.Array
) -> jax.Array:
    """CLUB mutual-information upper bound L_MI as implemented (`CLUBSample_group.mi_est`; COMET Eq. 1).

    With μ, logvar = q_θ's outputs for x and y the target sequences, all [B, T, D]:

      σ²[b, d]   = exp(mean_t logvar[b, t, d])          (log-variance averaged over T before exp),
      pos[b, d]  = −mean_t (μ[b, t, d] − y[b, t, d])² / σ²[b, d],
      neg[b, d]  = −mean_t (μ[b, t, d] − y[π(b), t, d])² / σ²[b, d],
      L_MI       = mean_b Σ_d (pos − neg) / 2,

    with one random batch permutation π (`permutation`, int [B]) giving a single shuffled negative
    per sample, instead of the paper's average over all pairs E_p(x) E_p(y). The reference draws a
    fresh π for every modality's estimate (see `sample_club_permutations`).
    """
    variance = jnp.exp(jnp.mean(logvar, axis=1))
    positive = -jnp.mean(jnp.square(mu - y), axis=1) / variance
    negative = -jnp.mean(jnp.square(mu - y[permutation]), axis=1) / variance
    return jnp.mean(jnp.sum(positive - negative, axis=-1)) / 2
