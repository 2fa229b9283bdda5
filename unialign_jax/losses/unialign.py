"""UniAlign alignment losses (`unialign.txt` §3.2-3.3, Eq. 10-16).

All similarities follow Eq. 10: S(q_i, C) = softmax_j(q̂_i · ĉ_j / τ) over a candidate set C, with
q̂, ĉ the L2-normalised embeddings (cosine similarity, as everywhere in a CLIP space). The paper
writes no temperature (τ = 1, the default); for unit-norm embeddings that gives flat
distributions, so callers that want CLIP-sharp ones pass e.g. τ = 0.01 (logit scale 100).

The paper writes each KL term as KL(S_model | S_target) with the model's distribution first;
`kl_order="model_first"` (default) computes exactly that, Σ S_model log(S_model / S_target)
(mode-seeking), and `kl_order="target_first"` the usual distillation direction
Σ S_target log(S_target / S_model) (torch `F.kl_div(log_model, target)`). Target distributions
(label priors, anchor-modality guidance, teacher outputs) are stop-gradient'ed. Every KL is averaged
over the query rows.
"""

from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp

from unialign_jax.losses.contrastive import l2_normalize

KLOrder = Literal["model_first", "target_first"]
UNIALIGN_LOSS_TERMS = ("nce", "soft_bind", "anchor_distil", "model_distil")


def _log_similarity(queries: jax.Array, candidates: jax.Array, temperature: float) -> jax.Array:
    """log S(q_i, C)_j = log_softmax_j(q̂_i · ĉ_j / τ) (Eq. 10): [N_queries, N_candidates]."""
    return jax.nn.log_softmax(l2_normalize(queries) @ l2_normalize(candidates).T / temperature, axis=-1)


def _kl(model_log_probs: jax.Array, target_log_probs: jax.Array, kl_order: KLOrder) -> jax.Array:
    """Row-mean KL between two row-wise distributions given as log-probabilities."""
    target_log_probs = jax.lax.stop_gradient(target_log_probs)
    if kl_order == "model_first":
        log_p, log_q = model_log_probs, target_log_probs
    elif kl_order == "target_first":
        log_p, log_q = target_log_probs, model_log_probs
    else:
        raise ValueError(f"kl_order must be 'model_first' or 'target_first', got {kl_order!r}.")
    return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1))


def _paired_alignment_kl(
    queries: jax.Array,
    candidates: jax.Array,
    target_queries: jax.Array,
    target_candidates: jax.Array,
    temperature: float,
    kl_order: KLOrder,
) -> jax.Array:
    """KL(S(q, C) | S(q', C')) over in-batch candidates: row i of every [B, D] input is one sample."""
    return _kl(
        _log_similarity(queries, candidates, temperature),
        _log_similarity(target_queries, target_candidates, temperature),
        kl_order,
    )


def soft_modality_binding_loss(
    embeddings: jax.Array,
    labels: jax.Array,
    label_embeddings: jax.Array,
    other_label_embeddings: jax.Array,
    temperature: float = 1.0,
    kl_order: KLOrder = "model_first",
) -> jax.Array:
    """One of the two symmetric terms of soft modality binding (UniAlign Eq. 10-11).

    A batch of dataset 1 (modality M1): embeddings x [B, D] with class labels [B] (int) indexing its
    class-name text embeddings Y¹ = label_embeddings [N1, D]; dataset 2's class-name text embeddings
    Y² = other_label_embeddings [N2, D]. The label-to-label similarity is the soft prior:

      term = mean_b KL( S(x_b, Y²) | S(y¹_{labels[b]}, Y²) ).

    Eq. 11 is the sum of both directions,
      soft_modality_binding_loss(x¹, l¹, Y¹, Y²) + soft_modality_binding_loss(x², l², Y², Y¹);
    each direction needs only its own dataset's samples, so with modality-aware gradient accumulation
    each micro-batch contributes its term (and, with more than two datasets, one term per other
    dataset's label set).
    """
    model = _log_similarity(embeddings, other_label_embeddings, temperature)
    prior = _log_similarity(label_embeddings, other_label_embeddings, temperature)[labels]
    return _kl(model, prior, kl_order)


def anchor_distillation_loss(
    extended: jax.Array,
    first_anchor: jax.Array,
    second_anchor: jax.Array,
    temperature: float = 1.0,
    kl_order: KLOrder = "model_first",
) -> jax.Array:
    """Knowledge distillation from anchor modalities (UniAlign Eq. 12).

    Row i of each [B, D] input is one sample seen in the extended modality (e.g. point cloud P), the
    first anchor (e.g. class-label text T) and the second anchor (e.g. a rendered image I):

      L = KL( S(P, T) | S(I, T) ) + KL( S(P, I) | S(T, I) ),

    with S(a_i, B) the similarity of a_i to the B in-batch candidates of B (Eq. 10); the anchor-to-anchor
    similarities are the (stop-gradient) guidance. The paper leaves the candidate set implicit; the
    batch is the set the model's InfoNCE also contrasts against.
    """
    over_first = _paired_alignment_kl(
        extended, first_anchor, second_anchor, first_anchor, temperature, kl_order
    )
    over_second = _paired_alignment_kl(
        extended, second_anchor, first_anchor, second_anchor, temperature, kl_order
    )
    return over_first + over_second


def model_distillation_loss(
    student: Mapping[str, jax.Array],
    teacher: Mapping[str, jax.Array],
    extended_modality: str,
    anchor_modality: str,
    mse_weight: float = 2000.0,
    temperature: float = 1.0,
    kl_order: KLOrder = "model_first",
    student_feature: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Knowledge distillation from a partial-modal foundation model (UniAlign Eq. 13-15).

    student / teacher: {modality: [B, D]} embeddings of paired samples from the unified encoder E_u
    (x) and the teacher E_f (x̂), for the extended modality e and the anchor modality a:

      L_feat_align  = mean over B·D of (x̂_e − x_e)²                                  (Eq. 13),
      L_modal_align = KL( S(x_e, x_a) | S(x̂_e, x̂_a) ) + KL( S(x_a, x_e) | S(x̂_a, x̂_e) )   (Eq. 14),
      L = λ·L_feat_align + L_modal_align,  λ = mse_weight = 2000                      (Eq. 15).

    Eq. 13 writes ||F̂ − F||²; the reduction here is the element mean (torch `F.mse_loss`), the one for
    which λ = 2000 makes sense: for unit-norm 512-d embeddings it is O(1e-3). Features enter the MSE
    as given (pass the normalised embeddings); the similarities use cosine (Eq. 10). Candidates are
    in-batch, as in `anchor_distillation_loss`. Each side's similarities stay in its own space, so the
    teacher's width may differ from the student's; then the MSE needs the student's feature at the
    teacher's width, `student_feature` [B, D_teacher] (e.g. a projection head of x_e; default x_e).

    Returns (L, {"feature_mse": L_feat_align, "modal_align_kl": L_modal_align}).
    """
    for name, side in (("student", student), ("teacher", teacher)):
        missing = [m for m in (extended_modality, anchor_modality) if m not in side]
        if missing:
            raise KeyError(
                f"model distillation {name} has no embeddings for {missing}; it has {sorted(side)}."
            )
    x_e, x_a = student[extended_modality], student[anchor_modality]
    t_e, t_a = teacher[extended_modality], teacher[anchor_modality]
    feature = x_e if student_feature is None else student_feature
    if feature.shape != t_e.shape:
        raise ValueError(f"Eq. 13 compares the student feature {feature.shape} with the teacher's {t_e.shape}: "
                         "pass student_feature at the teacher's width.")
    feature_mse = jnp.mean(jnp.square(jax.lax.stop_gradient(t_e) - feature))
    modal_align = _paired_alignment_kl(x_e, x_a, t_e, t_a, temperature, kl_order) + _paired_alignment_kl(
        x_a, x_e, t_a, t_e, temperature, kl_order
    )
    metrics = {"feature_mse": feature_mse, "modal_align_kl": modal_align}
    return mse_weight * feature_mse + modal_align, metrics


def unialign_total_loss(
    terms: Mapping[str, jax.Array],
    weights: Mapping[str, float] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """UniAlign training objective (Eq. 16).

      L = L_NCE + α1·L_soft_bind + α2·L_anch_distil + α3·L_model_distil.


    terms: any non-empty subset of `UNIALIGN_LOSS_TERMS` ("nce", "soft_bind", "anchor_distil",
    "model_distil"); an absent term contributes 0 (a micro-batch of a modality without a teacher has
    no "model_distil"). weights: per-term weights, default 1 for every term (the paper's α1 = α2 = α3
    = 1; "model_distil" already contains its λ = 2000 from `model_distillation_loss`).

    Returns (L, the unweighted terms).
    """
    weights = dict(weights or {})
    unknown = sorted((set(terms) | set(weights)) - set(UNIALIGN_LOSS_TERMS))
    if unknown:
        raise ValueError(
            f"unknown UniAlign loss terms {unknown}; expected names from {UNIALIGN_LOSS_TERMS}."
        )
    if not terms:
        raise ValueError("unialign_total_loss needs at least one term.")
    present = [name for name in UNIALIGN_LOSS_TERMS if name in terms]
    total = sum(weights.get(name, 1.0) * terms[name] for name in present)
    return jnp.asarray(total), {name: terms[name] for name in present}
