"""Model-agnostic evaluation on arrays: downstream heads, retrieval, codebook and continual metrics.

Nothing here imports the models, the trainer or the data pipeline: callers pass arrays (quantized
features, labels, code indices, router probabilities) and get flat {metric key: float} dicts whose
keys `report.py` knows how to tabulate:

  classification/X->Y, localisation/X->Y       cross_modal.cross_modal_scores
  aligned/classification/X->Y                  cross_modal.cross_modal_scores(aligned_classes=...)
  retrieval/X->Y/R@k                           retrieval.retrieval_scores
  codebook/...                                 codebook.codebook_usage
  code_sharing/X->Y                            codebook.code_sharing
  routing/<modality>/expert_<j>                codebook.routing_load
  forgetting/<key>                             cross_modal.forgetting
  below_chance/X->Y                            continual.below_chance
  ACC, BWT, FWT (and the accuracy matrix)      continual.continual_scores, continual.accuracy_matrix
"""

from unialign_jax.eval.codebook import code_sharing, code_usage_counts, codebook_usage, perplexity, routing_load
from unialign_jax.eval.continual import accuracy_matrix, aligned_classes, below_chance, continual_scores
from unialign_jax.eval.cross_modal import (
    LabelledFeatures,
    classification_accuracy,
    cross_modal_scores,
    forgetting,
    localisation_f1,
    ordered_pairs,
    pair_name,
    pair_status,
)
from unialign_jax.eval.heads import ClassificationHead, HeadTrainConfig, LocalisationHead, predict, train_head
from unialign_jax.eval.retrieval import pool_sequence, retrieval_recall, retrieval_scores

__all__ = [
    "ClassificationHead",
    "HeadTrainConfig",
    "LabelledFeatures",
    "LocalisationHead",
    "accuracy_matrix",
    "aligned_classes",
    "below_chance",
    "classification_accuracy",
    "code_sharing",
    "code_usage_counts",
    "codebook_usage",
    "continual_scores",
    "cross_modal_scores",
    "forgetting",
    "localisation_f1",
    "ordered_pairs",
    "pair_name",
    "pair_status",
    "perplexity",
    "pool_sequence",
    "predict",
    "retrieval_recall",
    "retrieval_scores",
    "routing_load",
    "train_head",
]
