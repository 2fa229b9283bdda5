"""Pure loss functions: arrays in, scalar (or (scalar, metrics)) out; each docstring has its equation."""

from unialign_jax.losses.cmg import (
    club_log_likelihood,
    club_mi_upper_bound,
    cmcm_loss,
    commitment_loss,
    cpc_top1_accuracy,
    cross_cpc_loss,
    reconstruction_loss,
    sample_club_permutations,
    sample_cpc_time_index,
)
from unialign_jax.losses.contrastive import (
    diagonal_log_softmax,
    diagonal_top1_accuracy,
    info_nce,
    l2_normalize,
)
from unialign_jax.losses.continual import (
    empirical_fisher,
    ewc_penalty,
    feature_distillation_loss,
    fisher_magnitude,
    gate_load_balance_loss,
)
from unialign_jax.losses.unialign import (
    UNIALIGN_LOSS_TERMS,
    anchor_distillation_loss,
    model_distillation_loss,
    soft_modality_binding_loss,
    unialign_total_loss,
)

__all__ = [
    "UNIALIGN_LOSS_TERMS",
    "anchor_distillation_loss",
    "club_log_likelihood",
    "club_mi_upper_bound",
    "cmcm_loss",
    "commitment_loss",
    "cpc_top1_accuracy",
    "cross_cpc_loss",
    "diagonal_log_softmax",
    "diagonal_top1_accuracy",
    "empirical_fisher",
    "ewc_penalty",
    "feature_distillation_loss",
    "fisher_magnitude",
    "gate_load_balance_loss",
    "info_nce",
    "l2_normalize",
    "model_distillation_loss",
    "reconstruction_loss",
    "sample_club_permutations",
    "sample_cpc_time_index",
    "soft_modality_binding_loss",
    "unialign_total_loss",
]
