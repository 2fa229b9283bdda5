"""The CMG/DCID objective (and COMET's additions) composed from the pure losses.

    L = w_rec Σ_m L_recon,m + w_com L_commit + w_cmcm L_cmcm + w_cpc L_cpc + w_mi Σ_m L_MI,m
        + w_gate L_gate                                     (COMET, with the CMoE-Adapter)

(CMG §4.4 / COMET §3.4; reference weights all 1). The EWC penalty depends on parameters, not on the
model outputs, so the trainer adds it separately. Inputs are the model's output dicts (see
`unialign_jax.nn.cmg.CMGModel`), so this function stays pure and independent of the network.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from unialign_jax.losses import cmg as cmg_losses
from unialign_jax.losses import continual as continual_losses


def cmg_objective(
    outputs: Mapping,
    club_estimates: Mapping[str, tuple[jax.Array, jax.Array]],
    targets: Mapping[str, jax.Array],
    *,
    modalities: tuple[str, ...],
    weights: Mapping[str, float],
    commitment_beta: float,
    cpc_time_index: jax.Array,
    club_permutations: Mapping[str, jax.Array],
    cpc_normalize_over: str = "predictions",
    cpc_cross_weight: float = 1.0,
    cpc_self_weight: float = 0.1,
    cpc_extra: Mapping | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total stage loss and its terms.

    Args:
      outputs: model outputs (semantic, quantized, code_vectors, squared_distances, active_mask,
        specific, reconstruction, cpc_predictions, optional router_probs).
      club_estimates: {m: (mu, logvar)} of the CLUB nets applied to the quantized vectors.
      targets: reconstruction targets (the raw inputs) per modality.
      modalities: the stage's modalities (the order of the loss terms and pairs; the MM-EMA order
        is the quantizer's own `ema_order`).
      weights: `reconstruction, commitment, cmcm, cpc, club, gate`.
      commitment_beta: β of the commitment loss (reference 0.25).
      cpc_time_index: the shared random CPC time index.
      club_permutations: {m: int [B]} one batch permutation per modality for its CLUB negatives
        (the reference draws one per modality; `losses.cmg.sample_club_permutations`).
      cpc_normalize_over: 'predictions' (reference) or 'targets' (paper Eq. 2).
      cpc_cross_weight, cpc_self_weight: Cross-CPC pair weights (reference 1.0 / 0.1).
      cpc_extra: optional extra CPC participant (COMET Pseudo-Modality Replay):
        {'name', 'semantic' [B,T,D], 'predictions' [B,T,K,D], 'position_weights' [B,T]}.

    Returns:
      (total loss, metrics dict of scalars: `loss/{term}`, `loss/total`, `commitment/{m}`,
      `club/mi_{m}` (each modality's L_MI,m) and `cpc/accuracy_{x}_from_{y}`).
    """
    recon = sum(cmg_losses.reconstruction_loss(outputs["reconstruction"][m], targets[m]) for m in modalities)
    commit, commit_metrics = cmg_losses.commitment_loss(
        outputs["semantic"], outputs["code_vectors"], modalities, beta=commitment_beta
    )
    cmcm = cmg_losses.cmcm_loss(outputs["squared_distances"], modalities, code_mask=outputs["active_mask"])

    cpc_semantic = dict(outputs["semantic"])
    cpc_predictions = dict(outputs["cpc_predictions"])
    cpc_modalities = tuple(modalities)
    position_weights = None
    if cpc_extra is not None:
        name = cpc_extra["name"]
        cpc_semantic[name] = cpc_extra["semantic"]
        cpc_predictions[name] = cpc_extra["predictions"]
        cpc_modalities += (name,)
        batch_steps = cpc_extra["position_weights"].shape
        position_weights = {m: jnp.ones(batch_steps, cpc_extra["position_weights"].dtype) for m in modalities}
        position_weights[name] = cpc_extra["position_weights"]
    cpc, cpc_metrics = cmg_losses.cross_cpc_loss(
        cpc_semantic,
        cpc_predictions,
        cpc_time_index,
        cpc_modalities,
        cross_weight=cpc_cross_weight,
        self_weight=cpc_self_weight,
        normalize_over=cpc_normalize_over,
        position_weights=position_weights,
    )

    missing = [m for m in modalities if m not in club_permutations]
    if missing:
        raise KeyError(f"club_permutations has no entry for modalities {missing}; it has {sorted(club_permutations)}.")
    club_terms = {
        m: cmg_losses.club_mi_upper_bound(*club_estimates[m], outputs["specific"][m], club_permutations[m])
        for m in modalities
    }
    mi = sum(club_terms.values())

    terms = {"reconstruction": recon, "commitment": commit, "cmcm": cmcm, "cpc": cpc, "club": mi}
    if "router_probs" in outputs:
        probs = jnp.concatenate(
            [outputs["router_probs"][m].reshape(-1, outputs["router_probs"][m].shape[-1]) for m in modalities]
        )
        terms["gate"] = continual_losses.gate_load_balance_loss(probs)
    total = sum(weights[name] * value for name, value in terms.items())
    metrics = {f"loss/{name}": value for name, value in terms.items()}
    metrics.update({f"commitment/{k}": v for k, v in commit_metrics.items()})
    metrics.update({f"club/mi_{k}": v for k, v in club_terms.items()})
    metrics.update({f"cpc/{k}": v for k, v in cpc_metrics.items()})
    metrics["loss/total"] = total
    return total, metrics
