"""CMG/DCID losses against plain-numpy versions written from the reference formulas (§1.6)."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.losses import (
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
from unialign_jax.losses.objective import cmg_objective

BIMODAL = ("video", "text")
TRIMODAL = ("audio", "video", "text")


def random_sequences(modalities, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    return {m: rng.normal(size=shape).astype(dtype) for m in modalities}


def as_jax(values):
    return {m: jnp.asarray(v) for m, v in values.items()}


def as_float64(values):
    return {m: np.asarray(v, np.float64) for m, v in values.items()}


def logsumexp(x):
    return np.log(np.sum(np.exp(x - x.max()))) + x.max()


# --- reconstruction, commitment --------------------------------------------------------------------


def test_reconstruction_loss_is_elementwise_mean(precision):
    dtype, rtol = precision
    rng = np.random.default_rng(0)
    prediction, target = (rng.normal(size=(2, 3, 4, 5)).astype(dtype) for _ in range(2))
    pairs = zip(prediction.ravel(), target.ravel())
    expected = sum((float(p) - float(t)) ** 2 for p, t in pairs) / prediction.size
    np.testing.assert_allclose(jax.jit(reconstruction_loss)(prediction, target), expected, rtol=rtol)
    with pytest.raises(ValueError, match="shapes differ"):
        reconstruction_loss(prediction, target[..., :4])


# Weights of the reference code for β = 0.25: (own code, each other modality's code).
REFERENCE_COMMITMENT_WEIGHTS = {2: (0.5, 0.25), 3: (0.5, 0.125)}


@pytest.mark.parametrize("modalities", [BIMODAL, TRIMODAL], ids=["bimodal", "trimodal"])
def test_commitment_loss_matches_reference_weights(precision, modalities):
    dtype, rtol = precision
    semantic = random_sequences(modalities, (3, 4, 5), dtype, seed=1)
    codes = random_sequences(modalities, (3, 4, 5), dtype, seed=2)
    loss_fn = jax.jit(functools.partial(commitment_loss, modalities=modalities))
    loss, metrics = loss_fn(as_jax(semantic), as_jax(codes))
    own, other = REFERENCE_COMMITMENT_WEIGHTS[len(modalities)]
    z, q = as_float64(semantic), as_float64(codes)
    expected = {
        m: sum((own if o == m else other) * np.mean((z[m] - q[o]) ** 2) for o in modalities)
        for m in modalities
    }
    for m in modalities:
        np.testing.assert_allclose(metrics[m], expected[m], rtol=rtol)
    np.testing.assert_allclose(loss, sum(expected.values()), rtol=rtol)


def test_commitment_loss_sends_no_gradient_to_the_codebook():
    semantic = as_jax(random_sequences(BIMODAL, (2, 3, 4), np.float32, 3))
    codes = as_jax(random_sequences(BIMODAL, (2, 3, 4), np.float32, 4))
    loss_fn = lambda z, q: commitment_loss(z, q, BIMODAL)[0]
    grad_semantic, grad_codes = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(semantic, codes)
    assert all(np.all(g == 0) for g in grad_codes.values())
    assert all(np.any(g != 0) for g in grad_semantic.values())


# --- CMCM ---------------------------------------------------------------------------------------------


def numpy_cmcm(distances, modalities, code_mask):
    """Reference CMCM with inactive codes removed from the codebook, written with explicit loops."""
    sequence_distributions = {}
    for m in modalities:
        logits = -np.sqrt(np.maximum(distances[m][..., code_mask], 0.0))
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        sequence_distributions[m] = probs.mean(1)
    total = 0.0
    for x, y in itertools.combinations(modalities, 2):
        p_x, p_y = sequence_distributions[x], sequence_distributions[y]
        batch = len(p_x)
        scores = np.zeros((batch, batch))
        for i in range(batch):
            for j in range(batch):
                x_to_y = np.sum(p_x[i] * np.log(p_y[j] + 1e-10))
                y_to_x = np.sum(p_y[i] * np.log(p_x[j] + 1e-10))
                scores[i, j] = x_to_y + y_to_x
        total += -np.mean([scores[i, i] - logsumexp(scores[i]) for i in range(batch)])
    return 0.5 * total, scores


def squared_distances(modalities, shape, capacity, dtype, seed):
    """Expanded-form ||z||² + ||e||² − 2 z·e, as the quantizer computes them."""
    rng = np.random.default_rng(seed)
    codebook = rng.normal(size=(capacity, shape[-1])) * 0.5
    result = {}
    for m in modalities:
        z = rng.normal(size=shape) * 0.5
        d = (z**2).sum(-1, keepdims=True) + (codebook**2).sum(-1) - 2 * z @ codebook.T
        result[m] = d.astype(dtype)
    return result


@pytest.mark.parametrize("modalities", [BIMODAL, TRIMODAL], ids=["bimodal", "trimodal"])
def test_cmcm_loss_matches_numpy(precision, modalities):
    dtype, rtol = precision
    distances = squared_distances(modalities, (5, 4, 3), capacity=7, dtype=dtype, seed=5)
    code_mask = np.array([True, True, False, True, True, False, True])
    loss_fn = jax.jit(functools.partial(cmcm_loss, modalities=modalities))
    expected, _ = numpy_cmcm(as_float64(distances), modalities, code_mask)
    np.testing.assert_allclose(loss_fn(as_jax(distances), code_mask=code_mask), expected, rtol=rtol)
    expected_all_codes, _ = numpy_cmcm(as_float64(distances), modalities, np.ones(7, bool))
    np.testing.assert_allclose(loss_fn(as_jax(distances)), expected_all_codes, rtol=rtol)


def test_cmcm_loss_is_within_1e5_of_the_reference_min_shift_epsilon_form():
    with jax.enable_x64(True):
        distances = squared_distances(BIMODAL, (6, 4, 3), capacity=5, dtype=np.float64, seed=6)
        loss = jax.jit(cmcm_loss, static_argnums=1)(as_jax(distances), BIMODAL)
        _, scores = numpy_cmcm(distances, BIMODAL, np.ones(5, bool))
        shifted = np.exp(scores - scores.min())
        reference = 0.5 * -np.mean(np.log(np.diag(shifted) / (shifted.sum(1) + 1e-5)))
        assert abs(float(loss) - reference) < 1e-5


def test_cmcm_loss_has_finite_gradient_at_zero_and_negative_distance():
    distances = as_jax(squared_distances(BIMODAL, (3, 2, 2), capacity=4, dtype=np.float32, seed=7))
    distances["video"] = distances["video"].at[0, 0, 0].set(0.0).at[1, 1, 2].set(-1e-6)
    code_mask = jnp.array([True, True, True, False])
    loss, grads = jax.jit(jax.value_and_grad(lambda d: cmcm_loss(d, BIMODAL, code_mask)))(distances)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in grads.values())
    assert all(np.all(g[..., 3] == 0) for g in grads.values()), "inactive codes must get no gradient"


def test_cmcm_loss_needs_two_modalities():
    with pytest.raises(ValueError, match="at least two modalities"):
        cmcm_loss({"video": jnp.zeros((2, 3, 4))}, ("video",))
    with pytest.raises(KeyError, match="audio"):
        cmcm_loss({"video": jnp.zeros((2, 3, 4))}, ("video", "audio"))


# --- Cross-CPC -----------------------------------------------------------------------------------------


def test_sample_cpc_time_index_covers_reference_range():
    keys = jax.random.split(jax.random.key(0), 400)
    samples = jax.vmap(lambda k: sample_cpc_time_index(k, seq_len=10, prediction_steps=1))(keys)
    assert samples.dtype == jnp.int32
    assert set(np.asarray(samples).tolist()) == set(range(1, 9))
    with pytest.raises(ValueError, match="seq_len"):
        sample_cpc_time_index(jax.random.key(0), seq_len=3, prediction_steps=2)


def numpy_reference_cpc_accuracy(scores, normalize_over="predictions"):
    """The CMG code's CPC accuracy for one [B, B] score matrix (target i, prediction j):
    `argmax(nn.Softmax()(G), dim=0) == arange(B)`, `nn.Softmax()` normalising dim 1 of a 2-D input.
    With normalize_over="targets" the two axes swap (softmax over dim 0, argmax over dim 1)."""
    g = scores if normalize_over == "predictions" else scores.T
    probabilities = np.exp(g - g.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # softmax over dim 1
    return np.mean(np.argmax(probabilities, axis=0) == np.arange(len(g)))  # argmax over dim 0


def numpy_cross_cpc(semantic, predictions, t, modalities, normalize_over, weights):
    batch, _, steps, _ = predictions[modalities[0]].shape
    total, accuracies = 0.0, {}
    for x in modalities:
        for y in modalities:
            pair_weight = 0.1 if x == y else 1.0
            step_accuracies = []
            for k in range(steps):
                scores = np.zeros((batch, batch))
                for i in range(batch):
                    for j in range(batch):
                        scores[i, j] = semantic[x][i, t + 1 + k] @ predictions[y][j, t, k]
                for i in range(batch):
                    candidates = scores[i, :] if normalize_over == "predictions" else scores[:, i]
                    log_prob = scores[i, i] - logsumexp(candidates)
                    total += pair_weight * weights[x][i, t + 1 + k] * weights[y][i, t] * log_prob
                step_accuracies.append(numpy_reference_cpc_accuracy(scores, normalize_over))
            accuracies[f"accuracy_{x}_from_{y}"] = np.mean(step_accuracies)
    return -total / (batch * steps), accuracies


@pytest.mark.parametrize(
    "modalities, steps, normalize_over, weighted",
    [(BIMODAL, 1, "predictions", False), (TRIMODAL, 2, "targets", True), (BIMODAL, 2, "predictions", True)],
    ids=["bimodal-reference", "trimodal-paper-axis-weighted", "bimodal-two-steps-weighted"],
)
def test_cross_cpc_loss_matches_numpy(precision, modalities, steps, normalize_over, weighted):
    dtype, rtol = precision
    batch, seq_len, dim = 4, 6, 3
    semantic = random_sequences(modalities, (batch, seq_len, dim), dtype, seed=8)
    predictions = random_sequences(modalities, (batch, seq_len, steps, dim), dtype, seed=9)
    rng = np.random.default_rng(10)
    weights = {m: rng.uniform(0.1, 1.0, size=(batch, seq_len)).astype(dtype) for m in modalities}
    loss_fn = jax.jit(
        functools.partial(cross_cpc_loss, modalities=modalities, normalize_over=normalize_over)
    )
    time_index = 3 - steps  # traced: exercises the dynamic slicing
    loss, metrics = loss_fn(
        as_jax(semantic),
        as_jax(predictions),
        jnp.int32(time_index),
        position_weights=as_jax(weights) if weighted else None,
    )
    ones = {m: np.ones((batch, seq_len)) for m in modalities}
    expected, accuracies = numpy_cross_cpc(
        as_float64(semantic), as_float64(predictions), time_index, modalities, normalize_over,
        as_float64(weights) if weighted else ones,
    )
    np.testing.assert_allclose(loss, expected, rtol=rtol)
    assert metrics.keys() == accuracies.keys()
    for name, accuracy in accuracies.items():
        np.testing.assert_allclose(metrics[name], accuracy, err_msg=name)


# Target i · prediction j. Row argmax: 3/3 right; column argmax of G: 1/3; the reference's column
# argmax of the row-softmax: 2/3 (prediction 1's most probable target is 0: P[0, 1] = 0.470 >
# P[1, 1] = 0.378, because row 1 is flat).
NON_SYMMETRIC_SCORES = np.array([[1.0, 0.9, -3.0], [0.0, 0.1, -0.2], [2.0, -3.0, 2.5]])


def test_cpc_accuracy_is_the_references_column_argmax_of_the_row_softmax(precision):
    dtype, _ = precision
    scores = NON_SYMMETRIC_SCORES.astype(dtype)
    expected = numpy_reference_cpc_accuracy(NON_SYMMETRIC_SCORES)
    assert expected == pytest.approx(2 / 3)
    assert np.mean(np.argmax(NON_SYMMETRIC_SCORES, axis=1) == np.arange(3)) == 1.0  # the old metric
    np.testing.assert_allclose(jax.jit(cpc_top1_accuracy)(scores), expected)
    np.testing.assert_allclose(cpc_top1_accuracy(scores.T, axis=-2), expected)

    # Through the loss: targets z_x[i, t+1] = G[i], predictions p_y[j, t] = e_j, so the scores are G.
    semantic = np.zeros((3, 3, 3), dtype)
    semantic[:, 2] = scores
    predictions = np.zeros((3, 3, 1, 3), dtype)
    predictions[:, 1, 0] = np.eye(3, dtype=dtype)
    modalities = ("audio", "video")
    _, metrics = cross_cpc_loss({m: jnp.asarray(semantic) for m in modalities},
                                {m: jnp.asarray(predictions) for m in modalities},
                                jnp.int32(1), modalities)
    for x, y in itertools.product(modalities, modalities):
        np.testing.assert_allclose(metrics[f"accuracy_{x}_from_{y}"], expected)


def test_cross_cpc_loss_rejects_bad_arguments():
    semantic = {"video": jnp.zeros((2, 5, 3)), "text": jnp.zeros((2, 5, 3))}
    predictions = {"video": jnp.zeros((2, 5, 1, 3)), "text": jnp.zeros((2, 4, 1, 3))}
    with pytest.raises(ValueError, match="normalize_over"):
        cross_cpc_loss(semantic, predictions, 1, BIMODAL, normalize_over="rows")
    with pytest.raises(ValueError, match=r"predictions\['text'\]"):
        cross_cpc_loss(semantic, predictions, 1, BIMODAL)


# --- CLUB ---------------------------------------------------------------------------------------------


def test_club_log_likelihood_matches_numpy(precision):
    dtype, rtol = precision
    rng = np.random.default_rng(11)
    mu, logvar, y = (rng.normal(size=(3, 4, 5)).astype(dtype) for _ in range(3))
    m, lv, yy = (a.astype(np.float64) for a in (mu, logvar, y))
    per_position = [
        sum(-((m[b, t, d] - yy[b, t, d]) ** 2) / np.exp(lv[b, t, d]) - lv[b, t, d] for d in range(5)) / 2
        for b in range(3)
        for t in range(4)
    ]
    expected = np.mean(per_position)
    np.testing.assert_allclose(jax.jit(club_log_likelihood)(mu, logvar, y), expected, rtol=rtol)


def numpy_club_mi(mu, logvar, y, permutation):
    """`CLUBSample_group.mi_est` in float64 for [B, T, D] inputs and its batch permutation."""
    m, lv, yy = (np.asarray(a, np.float64) for a in (mu, logvar, y))
    per_sample = []
    for b in range(len(m)):
        variance = np.exp(lv[b].mean(0))  # [D], log-variance averaged over T first
        positive = -((m[b] - yy[b]) ** 2).mean(0) / variance
        negative = -((m[b] - yy[permutation[b]]) ** 2).mean(0) / variance
        per_sample.append(np.sum(positive - negative) / 2)
    return np.mean(per_sample)


def test_club_mi_upper_bound_matches_numpy(precision):
    dtype, rtol = precision
    rng = np.random.default_rng(12)
    mu, logvar, y = (rng.normal(size=(4, 3, 5)).astype(dtype) for _ in range(3))
    permutation = np.array([2, 0, 3, 1])
    result = jax.jit(club_mi_upper_bound)(mu, logvar, y, permutation)
    np.testing.assert_allclose(result, numpy_club_mi(mu, logvar, y, permutation), rtol=rtol)


def test_club_mi_upper_bound_is_zero_for_identity_permutation():
    rng = np.random.default_rng(13)
    mu, logvar, y = (jnp.asarray(rng.normal(size=(4, 3, 5))) for _ in range(3))
    assert club_mi_upper_bound(mu, logvar, y, jnp.arange(4)) == 0.0


def test_sample_club_permutations_one_independent_permutation_per_modality():
    permutations = jax.jit(sample_club_permutations, static_argnums=(1, 2))(
        jax.random.key(0), 16, TRIMODAL)
    assert set(permutations) == set(TRIMODAL)
    for permutation in permutations.values():
        assert permutation.shape == (16,)
        assert sorted(np.asarray(permutation).tolist()) == list(range(16))
    rows = [tuple(np.asarray(p).tolist()) for p in permutations.values()]
    assert len(set(rows)) == 3  # independent draws (equal ones have probability ~1e-13)
    again = sample_club_permutations(jax.random.key(0), 16, TRIMODAL)
    for m in TRIMODAL:
        np.testing.assert_array_equal(again[m], permutations[m])


def _objective_inputs(modalities, dtype, seed):
    """Small random model outputs for `cmg_objective` (B=4, T=5, D=3, 6 codes, CLUB y size 2)."""
    rng = np.random.default_rng(seed)

    def per_modality(*shape):
        return {m: jnp.asarray(rng.normal(size=shape).astype(dtype)) for m in modalities}

    outputs = {
        "reconstruction": per_modality(4, 5, 7),
        "semantic": per_modality(4, 5, 3),
        "code_vectors": per_modality(4, 5, 3),
        "squared_distances": {m: jnp.asarray(rng.uniform(0.1, 4.0, (4, 5, 6)).astype(dtype))
                              for m in modalities},
        "active_mask": jnp.asarray([True] * 5 + [False]),
        "cpc_predictions": per_modality(4, 5, 1, 3),
        "specific": per_modality(4, 5, 2),
    }
    estimates = {m: (mu, logvar) for m, mu, logvar in zip(
        modalities, per_modality(4, 5, 2).values(), per_modality(4, 5, 2).values())}
    return outputs, estimates, per_modality(4, 5, 7)


def test_cmg_objective_uses_each_modalitys_own_club_permutation(precision):
    dtype, rtol = precision
    modalities = ("audio", "text")
    outputs, estimates, targets = _objective_inputs(modalities, dtype, seed=14)
    permutations = {"audio": np.array([1, 2, 3, 0]), "text": np.array([3, 2, 0, 1])}
    objective = jax.jit(functools.partial(
        cmg_objective, modalities=modalities,
        weights={"reconstruction": 1.0, "commitment": 1.0, "cmcm": 1.0, "cpc": 1.0, "club": 1.0},
        commitment_beta=0.25))

    _, metrics = objective(outputs, estimates, targets, cpc_time_index=jnp.int32(1),
                           club_permutations={m: jnp.asarray(p) for m, p in permutations.items()})

    expected = {m: numpy_club_mi(*estimates[m], outputs["specific"][m], permutations[m])
                for m in modalities}
    for m in modalities:
        np.testing.assert_allclose(metrics[f"club/mi_{m}"], expected[m], rtol=rtol)
    np.testing.assert_allclose(metrics["loss/club"], sum(expected.values()), rtol=rtol)
    shared = numpy_club_mi(*estimates["text"], outputs["specific"]["text"], permutations["audio"])
    assert abs(shared - expected["text"]) > 1e-3  # one shared permutation would give another value

    with pytest.raises(KeyError, match=r"club_permutations has no entry for modalities \['text'\]"):
        cmg_objective(outputs, estimates, targets, modalities=modalities,
                      weights={"reconstruction": 1.0, "commitment": 1.0, "cmcm": 1.0, "cpc": 1.0,
                               "club": 1.0},
                      commitment_beta=0.25, cpc_time_index=jnp.int32(1),
                      club_permutations={"audio": jnp.asarray(permutations["audio"])})
