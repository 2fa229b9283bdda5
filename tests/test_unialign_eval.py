"""Zero-shot classification through text anchors (eval.zero_shot) on hand-made embeddings."""

import numpy as np
import pytest

from unialign_jax.eval import zero_shot

# Three classes on the axes of R^3; five examples.
CLASSES = np.eye(3, dtype=np.float32)
EMBEDDINGS = np.array([
    [1.0, 0.1, 0.0],   # class 0, top-1 right
    [0.2, 1.0, 0.5],   # class 1, top-1 right
    [0.9, 0.0, 0.8],   # class 2: rank 1 (class 0 is closer)
    [0.0, 0.0, 2.0],   # class 0: rank 2
    [1.0, 1.0, 0.0],   # class 1: tied with class 0 -> counts against the example (rank 1)
], np.float32)
LABELS = np.array([0, 1, 2, 0, 1])


def test_label_ranks_and_top_k_by_hand():
    np.testing.assert_array_equal(zero_shot.label_ranks(EMBEDDINGS, LABELS, CLASSES), [0, 0, 1, 2, 1])
    accuracy = zero_shot.top_k_accuracy(EMBEDDINGS, LABELS, CLASSES, ks=(1, 2, 3))
    assert accuracy == {"top1": pytest.approx(2 / 5), "top2": pytest.approx(4 / 5), "top3": 1.0}


def test_similarity_is_cosine():
    scaled = EMBEDDINGS * np.array([[3.0], [0.5], [7.0], [1.0], [2.0]], np.float32)
    np.testing.assert_array_equal(zero_shot.label_ranks(scaled, LABELS, 5 * CLASSES),
                                  zero_shot.label_ranks(EMBEDDINGS, LABELS, CLASSES))


def test_collapsed_embeddings_score_zero_not_chance():
    collapsed = np.ones((4, 3), np.float32)
    assert zero_shot.top_k_accuracy(collapsed, np.array([0, 1, 2, 0]), CLASSES, ks=(1,))["top1"] == 0.0


def test_zero_shot_scores_per_modality_with_chance_levels():
    scores = zero_shot.zero_shot_scores(
        {"image": EMBEDDINGS, "audio": CLASSES}, {"image": LABELS, "audio": np.arange(3)},
        {"image": CLASSES, "audio": CLASSES}, modalities=("image", "audio"), ks=(1, 5))
    assert scores["zero_shot/image/top1"] == pytest.approx(0.4)
    assert scores["zero_shot/audio/top1"] == 1.0
    assert scores["zero_shot/image/chance_top1"] == pytest.approx(1 / 3)
    assert scores["zero_shot/image/chance_top5"] == 1.0  # k > C: every label is in the top 5


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="labels must lie in"):
        zero_shot.top_k_accuracy(EMBEDDINGS, LABELS + 1, CLASSES)
    with pytest.raises(ValueError, match="float\\[N, D\\] and float\\[C, D\\]"):
        zero_shot.top_k_accuracy(EMBEDDINGS, LABELS, CLASSES[:, :2])
    with pytest.raises(ValueError, match="missing for modality 'audio'"):
        zero_shot.zero_shot_scores({"image": EMBEDDINGS}, {"image": LABELS}, {"image": CLASSES},
                                   modalities=("image", "audio"))
