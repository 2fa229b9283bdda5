"""Tests for unialign_jax.eval: retrieval, codebook diagnostics, heads and the CMG protocol, continual metrics."""

import math

import numpy as np
import pytest
from jax import monitoring
from sklearn.metrics import f1_score

from unialign_jax import eval as ev

# ---------------------------------------------------------------------------------------------------
# Retrieval.


def test_retrieval_recall_hand_computed():
    gallery = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    query = np.array([[1.0, 0.1], [0.0, 2.0], [-1.0, 0.2], [5.0, 5.0]])
    relevance = np.array(
        [
            [0, 1, 0, 0],  # cos: g0 .995, g2 .774, g1 .100, g3 -.995 -> g1 ranks 2
            [0, 1, 0, 0],  # g1 is the nearest -> rank 0
            [1, 0, 1, 0],  # cos: g3 .981, g1 .196, g2 -.555, g0 -.981 -> best relevant g2 ranks 2
            [0, 0, 0, 0],  # no relevant item: left out of the average
        ],
        bool,
    )
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    ranks = ev.retrieval.first_relevant_rank(unit(query) @ unit(gallery).T, relevance)
    np.testing.assert_array_equal(ranks, [2, 0, 2, -1])
    recall = ev.retrieval_recall(query, gallery, relevance, ks=(1, 2, 3))
    assert recall == pytest.approx({"R@1": 1 / 3, "R@2": 1 / 3, "R@3": 1.0})


def test_retrieval_ties_count_against_the_query():
    collapsed = np.ones((4, 3))  # a collapsed codebook: every item gets the same vector
    recall = ev.retrieval_recall(collapsed, collapsed, np.eye(4, dtype=bool), ks=(1, 4))
    assert recall == {"R@1": 0.0, "R@4": 1.0}


def test_retrieval_scores_pool_over_time_and_choose_relevance():
    # Time means: video rows -> e0, e1, e0+e1 ; audio rows -> e0, e1, e1. Steps differ, means do not.
    video = np.array([[[2, 0], [0, 0]], [[0, 1], [0, 1]], [[1, 0], [0, 1]]], np.float32)
    audio = np.array([[[1, 0], [1, 0]], [[0, 2], [0, 0]], [[0, 1], [0, 1]]], np.float32)
    features = {"video": video, "audio": audio}
    paired = ev.retrieval_scores(features, modalities=("video", "audio"), paired=True, ks=(1, 2))
    # video->audio: v0 -> a0 rank 0; v1 ties a1 = a2 (one irrelevant tie) -> rank 1; v2 ties all (a0, a1=a2) ->
    # best relevant a2, irrelevant a0 and a1 at the same cosine -> rank 2.
    assert paired["retrieval/video->audio/R@1"] == pytest.approx(1 / 3)
    assert paired["retrieval/video->audio/R@2"] == pytest.approx(2 / 3)
    labels = {"video": np.array([0, 1, 1]), "audio": np.array([0, 1, 1])}
    by_class = ev.retrieval_scores(features, labels, modalities=("video", "audio"), paired=False, ks=(1,))
    # v2 (e0+e1): a0 (class 0) ties a1, a2 (class 1) -> rank 1; the others rank 0.
    assert by_class == pytest.approx({"retrieval/video->audio/R@1": 2 / 3, "retrieval/audio->video/R@1": 1.0})
    with pytest.raises(ValueError, match="needs labels"):
        ev.retrieval_scores(features, modalities=("video", "audio"), paired=False)


# ---------------------------------------------------------------------------------------------------
# Codebook diagnostics.


def _hand_codes():
    return {
        "video": np.array([[0, 0, 1], [2, 0, 1]]),  # code 0 x3, 1 x2, 2 x1
        "audio": np.array([[1, 2, 3]]),  # codes 1, 2, 3 once
        "text": np.array([[2, 2, 4]]),  # code 2 x2, 4 x1
    }


def test_code_usage_counts_and_sharing():
    modalities = ("video", "audio", "text")
    counts = ev.code_usage_counts(_hand_codes(), 6, modalities)
    np.testing.assert_array_equal(counts, [[3, 0, 0], [2, 1, 0], [1, 1, 2], [0, 1, 0], [0, 0, 1], [0, 0, 0]])
    usage = ev.codebook_usage(_hand_codes(), 6, modalities)
    expected_perplexity = math.exp(-sum(p * math.log(p) for p in (3 / 6, 2 / 6, 1 / 6)))
    assert usage == pytest.approx(
        {
            "codebook/active": 6,
            "codebook/used_by_1": 3,  # codes 0, 3, 4
            "codebook/used_by_2": 1,  # code 1
            "codebook/used_by_3+": 1,  # code 2
            "codebook/dead": 1,  # code 5
            "codebook/perplexity/video": expected_perplexity,
            "codebook/perplexity/audio": 3.0,
            "codebook/perplexity/text": math.exp(-(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)),
        }
    )
    strict = ev.codebook_usage(_hand_codes(), 6, modalities, min_count=2)
    # >= 2 selections: code 0 (video), code 1 (video), code 2 (text); codes 3, 4, 5 dead.
    assert (strict["codebook/used_by_1"], strict["codebook/used_by_2"], strict["codebook/dead"]) == (3, 0, 3)


def test_codebook_rejects_inactive_codes():
    with pytest.raises(ValueError, match=r"audio codes must lie in \[0, 3\)"):
        ev.codebook_usage(_hand_codes(), 3, ("video", "audio"))


def test_routing_load_is_mean_router_probability():
    probs = {"audio": np.array([[[0.5, 0.5, 0.0], [0.1, 0.2, 0.7]]]), "text": np.array([[1.0, 0.0, 0.0]])}
    load = ev.routing_load(probs, ("audio", "text"))
    assert load == pytest.approx(
        {
            "routing/audio/expert_0": 0.3,
            "routing/audio/expert_1": 0.35,
            "routing/audio/expert_2": 0.35,
            "routing/text/expert_0": 1.0,
            "routing/text/expert_1": 0.0,
            "routing/text/expert_2": 0.0,
        }
    )


# ---------------------------------------------------------------------------------------------------
# Metrics of the CMG protocol.


def test_localisation_f1_matches_sklearn():
    rng = np.random.default_rng(0)
    step_labels = rng.integers(0, 5, (30, 7))
    predictions = np.where(rng.random((30, 7)) < 0.6, step_labels, rng.integers(0, 7, (30, 7)))  # 5, 6 never true
    step_labels[:3, 4:] = -1  # padding, ignored
    valid = step_labels >= 0
    expected = f1_score(step_labels[valid], predictions[valid], labels=np.unique(step_labels[valid]), average="macro")
    assert ev.localisation_f1(predictions, step_labels) == pytest.approx(expected)
    # Hand case: truth [0, 0, 1, 1], guess [0, 1, 1, 2] -> F1_0 = 2/3, F1_1 = 2·1/(2+1+1) = 1/2.
    assert ev.localisation_f1(np.array([[0, 1, 1, 2]]), np.array([[0, 0, 1, 1]])) == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_classification_accuracy():
    assert ev.classification_accuracy(np.array([1, 2, 3, 0]), np.array([1, 2, 0, 0])) == 0.75


# ---------------------------------------------------------------------------------------------------
# Cross-modal generalization end to end (one shape for all modalities, so one compile per head kind).


def _split(rng, prototypes, num_examples, num_steps, noise):
    labels = rng.integers(0, prototypes.shape[0], num_examples)
    shared = prototypes[labels][:, None, :] + rng.normal(size=(num_examples, num_steps, prototypes.shape[1]))
    per_modality = {
        "video": shared + noise * rng.normal(size=shared.shape),
        "audio": shared + noise * rng.normal(size=shared.shape),  # Y = X + small noise: same class structure
        "text": rng.normal(size=shared.shape),  # unrelated to the labels
    }
    step_labels = np.repeat(labels[:, None], num_steps, axis=1)
    return {m: ev.LabelledFeatures(x.astype(np.float32), labels, step_labels) for m, x in per_modality.items()}


def test_cross_modal_heads_transfer_and_compile_once():
    rng = np.random.default_rng(0)
    num_classes, num_steps, feature_dim = 4, 3, 12
    prototypes = rng.normal(size=(num_classes, feature_dim))
    train = _split(rng, prototypes, 300, num_steps, noise=0.3)
    test = _split(rng, prototypes, 200, num_steps, noise=0.3)
    config = ev.HeadTrainConfig(steps=120, batch_size=32, hidden_dim=24, eval_batch_size=128)

    compiled = []

    def on_event(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kwargs.get("fun_name"))

    monitoring.register_event_duration_secs_listener(on_event)
    try:
        scores = ev.cross_modal_scores(train, test, modalities=("video", "audio", "text"), config=config)
    finally:
        monitoring.unregister_event_duration_listener(on_event)

    chance = 1 / num_classes
    for pair in ("video->audio", "audio->video"):  # shared class structure: the head transfers
        assert scores[f"classification/{pair}"] > 0.9
        assert scores[f"localisation/{pair}"] > 0.8
    for pair in ("video->text", "audio->text"):  # target features unrelated to the labels: chance
        assert abs(scores[f"classification/{pair}"] - chance) < 0.1
        assert scores[f"localisation/{pair}"] < chance + 0.1
    for pair in ("text->video", "text->audio"):  # a head fit to noise maps each class somewhere arbitrary
        assert scores[f"classification/{pair}"] < 0.6
    assert len(scores) == 12  # 6 ordered pairs x (classification, localisation)
    # One training compile per head kind for all six pairs (three source modalities of equal shapes).
    assert compiled.count("jit(_fit_head)") == 2, compiled


def test_cross_modal_scores_name_missing_data():
    rng = np.random.default_rng(1)
    train = _split(rng, rng.normal(size=(2, 4)), 8, 2, noise=0.1)
    with pytest.raises(ValueError, match="test has no features for modality 'audio'"):
        ev.cross_modal_scores(train, {"video": train["video"]}, modalities=("video", "audio"))
    with pytest.raises(ValueError, match="labels go up to 1, but num_classes is 1"):
        ev.cross_modal_scores(train, train, modalities=("video", "audio"), num_classes=1)
    bad = {**train, "audio": ev.LabelledFeatures(train["audio"].features, train["audio"].labels[:3])}
    with pytest.raises(ValueError, match=r"train\['audio'\].labels must be int\[8\]"):
        ev.cross_modal_scores(bad, train, modalities=("video", "audio"))


# ---------------------------------------------------------------------------------------------------
# Continual bookkeeping.


def test_pair_status_marks_pairs_trained_together():
    status = ev.pair_status(("video", "audio", "text"), [("video", "text"), ("audio", "text")])
    assert status == {
        "video->audio": "unseen",
        "video->text": "seen",
        "audio->video": "unseen",
        "audio->text": "seen",
        "text->video": "seen",
        "text->audio": "seen",
    }


def test_forgetting_arithmetic():
    history = [
        {"classification/video->text": 0.50},
        {"classification/video->text": 0.45, "classification/audio->text": 0.60},
        {"classification/video->text": 0.40, "classification/audio->text": 0.62},
    ]
    result = ev.forgetting(history, {"classification/video->text": 0, "classification/audio->text": 1})
    assert result == pytest.approx(
        {"forgetting/classification/video->text": -0.10, "forgetting/classification/audio->text": 0.02}
    )
    with pytest.raises(ValueError, match="missing from the metrics of stage 0"):
        ev.forgetting(history, {"classification/audio->text": 0})


def _three_stage_history():
    """Hand-made scores of video-text, then audio-text, then image-text (text mediating)."""
    return [
        {"classification/video->text": 0.8, "classification/text->video": 0.6, "retrieval/video->text/R@1": 0.5},
        {"classification/video->text": 0.7, "classification/text->video": 0.5, "classification/video->audio": 0.3,
         "classification/audio->video": 0.2, "classification/audio->text": 0.9, "classification/text->audio": 0.7},
        {"classification/video->text": 0.6, "classification/text->video": 0.5, "classification/video->audio": 0.25,
         "classification/audio->video": 0.3, "classification/audio->text": 0.8, "classification/text->audio": 0.7,
         "classification/image->text": 0.9, "classification/audio->image": 0.15},
    ]


_TRAINED = [("video", "text"), ("audio", "text"), ("image", "text")]


def test_accuracy_matrix_orders_pairs_by_first_stage_and_leaves_gaps():
    pairs, matrix = ev.accuracy_matrix(_three_stage_history())
    assert pairs == ["video->text", "text->video", "video->audio", "audio->video", "audio->text", "text->audio",
                     "image->text", "audio->image"]  # retrieval/video->text/R@1 is not a classification pair
    nan = np.nan
    np.testing.assert_array_equal(matrix, [[0.8, 0.6, nan, nan, nan, nan, nan, nan],
                                           [0.7, 0.5, 0.3, 0.2, 0.9, 0.7, nan, nan],
                                           [0.6, 0.5, 0.25, 0.3, 0.8, 0.7, 0.9, 0.15]])


def test_continual_scores_hand_computed():
    history = _three_stage_history()
    # After stage 1: ACC = (0.8 + 0.6) / 2; nothing learned earlier (no BWT), no unseen pair (no FWT).
    assert ev.continual_scores(history[:1], _TRAINED[:1], 0.1) == pytest.approx({"ACC": 0.7})
    # After stage 2: ACC = 3.3 / 6; BWT over video<->text = (-0.1 - 0.1) / 2; FWT over video<->audio,
    # unseen when first scored: ((0.3 - 0.1) + (0.2 - 0.1)) / 2.
    assert ev.continual_scores(history[:2], _TRAINED[:2], 0.1) == pytest.approx(
        {"ACC": 0.55, "BWT": -0.1, "FWT": 0.15})
    # After stage 3: ACC = 4.2 / 8; BWT over the six pairs of stages 1-2:
    # (-0.2 - 0.1 - 0.05 + 0.1 - 0.1 + 0) / 6; FWT adds audio->image at stage 3: (0.2 + 0.1 + 0.05) / 3.
    scores = ev.continual_scores(history, _TRAINED, 0.1)
    assert scores == pytest.approx({"ACC": 0.525, "BWT": -0.35 / 6, "FWT": 0.35 / 3})
    learned_at = {"classification/video->text": 0, "classification/text->video": 0,
                  **{f"classification/{p}": 1 for p in ("video->audio", "audio->video", "audio->text", "text->audio")}}
    assert scores["BWT"] == pytest.approx(np.mean(list(ev.forgetting(history, learned_at).values())))


def test_continual_scores_forward_transfer_takes_a_pair_when_first_scored_and_unseen():
    history = [{"classification/video->audio": 0.4}, {"classification/video->audio": 0.9}]
    # Stage 1 trained video with audio: the pair was trained when first scored, so no FWT.
    scores = ev.continual_scores(history, [("video", "audio", "text"), ("video", "audio")], 0.25)
    assert scores == pytest.approx({"ACC": 0.9, "BWT": 0.5})
    # Unseen at stage 1 and trained at stage 2: FWT from stage 1 (0.4 - 0.25), its later gain in BWT.
    scores = ev.continual_scores(history, [("video", "text"), ("video", "audio")], 0.25)
    assert scores == pytest.approx({"ACC": 0.9, "BWT": 0.5, "FWT": 0.15})
    with pytest.raises(ValueError, match="2 stages of metrics but 1 lists"):
        ev.continual_scores(history, [("video", "text")], 0.25)
    with pytest.raises(ValueError, match=r"chance must lie in \(0, 1\)"):
        ev.continual_scores(history, _TRAINED[:2], 1.0)


def test_aligned_classes_and_below_chance_flags():
    trained = {"video": (0, 1, 2, 3, 4, 5), "audio": (2, 3, 4, 5, 6, 7), "text": tuple(range(8))}
    assert ev.aligned_classes(trained, "video", "audio") == (2, 3, 4, 5)
    assert ev.aligned_classes(trained, "text", "video") == (0, 1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match="no trained classes given for modality 'image'"):
        ev.aligned_classes(trained, "image", "text")
    scores = {"classification/a->b": 0.05, "classification/b->a": 0.1, "aligned/classification/a->b": 0.01,
              "retrieval/a->b/R@1": 0.0}
    assert ev.below_chance(scores, 0.1) == {"below_chance/a->b": 1, "below_chance/b->a": 0}


def test_code_sharing_hand_computed():
    # video tokens 0 0 1 2 0 1, audio 1 2 3, text 2 2 4 (`_hand_codes`).
    pairs = [("video", "audio"), ("audio", "video"), ("video", "text"), ("text", "video"), ("audio", "text")]
    assert ev.code_sharing(_hand_codes(), pairs) == pytest.approx({
        "code_sharing/video->audio": 3 / 6,  # the tokens of codes 1, 2
        "code_sharing/audio->video": 2 / 3,  # codes 1, 2 (not 3)
        "code_sharing/video->text": 1 / 6,  # code 2
        "code_sharing/text->video": 2 / 3,  # 2, 2 (not 4)
        "code_sharing/audio->text": 1 / 3,  # code 2
    })
    with pytest.raises(ValueError, match="no codes given for modality 'image'"):
        ev.code_sharing(_hand_codes(), [("video", "image")])


def test_aligned_class_accuracy_scores_only_the_aligned_test_examples():
    # Audio carries the class structure of video for classes 0 and 1 only; classes 2 and 3 are noise.
    rng = np.random.default_rng(2)
    prototypes = 3 * rng.normal(size=(4, 12))
    train = _split(rng, prototypes, 300, 3, noise=0.3)
    test = _split(rng, prototypes, 200, 3, noise=0.3)
    labels = test["audio"].labels
    noisy = np.isin(labels, (2, 3))
    audio = test["audio"].features.copy()
    audio[noisy] = rng.normal(size=audio[noisy].shape)
    test = {**test, "audio": ev.LabelledFeatures(audio, labels, test["audio"].step_labels)}
    config = ev.HeadTrainConfig(steps=120, batch_size=32, hidden_dim=24, eval_batch_size=128)
    scores = ev.cross_modal_scores(train, test, modalities=("video", "audio"), pairs=[("video", "audio")],
                                   aligned_classes={"video->audio": (0, 1)}, config=config)
    assert scores["aligned/classification/video->audio"] > 0.9
    assert scores["classification/video->audio"] < 0.8
    other = ev.cross_modal_scores(train, test, modalities=("video", "audio"), pairs=[("video", "audio")],
                                  aligned_classes={"video->audio": (2, 3)}, config=config)
    assert other["aligned/classification/video->audio"] < 0.6
    absent = ev.cross_modal_scores(train, test, modalities=("video", "audio"), pairs=[("video", "audio")],
                                   aligned_classes={"video->audio": (7,)}, config=config)
    assert "aligned/classification/video->audio" not in absent  # no test example of class 7


# ---------------------------------------------------------------------------------------------------
# Statistics over seeds.


def test_t_quantile_matches_tables():
    from unialign_jax.eval import statistics

    for probability, dof, expected in ((0.975, 4, 2.776), (0.975, 1, 12.706), (0.975, 2, 4.303),
                                       (0.975, 9, 2.262), (0.95, 10, 1.812)):
        assert statistics.t_quantile(probability, dof) == pytest.approx(expected, abs=5e-4)
    with pytest.raises(ValueError, match="degrees_of_freedom must be >= 1"):
        statistics.t_quantile(0.975, 0)


def test_mean_interval_hand_computed():
    from unialign_jax.eval import statistics

    # mean 3, s = sqrt(2.5), half-width = 2.7764 * 1.5811 / sqrt(5) = 1.9632.
    interval = statistics.mean_interval([1, 2, 3, 4, 5])
    assert (interval.mean, interval.low, interval.high, interval.n) == pytest.approx((3, 1.0368, 4.9632, 5), abs=1e-4)
    assert interval.resolved and not statistics.mean_interval([-1, 1, 2]).resolved
    single = statistics.mean_interval([0.5])
    assert single.mean == 0.5 and math.isnan(single.low) and not single.resolved
    with pytest.raises(ValueError, match="needs finite values"):
        statistics.mean_interval([1.0, float("nan")])
