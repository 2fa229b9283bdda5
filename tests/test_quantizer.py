"""Tests for unialign_jax.nn.quantizer: MM-EMA against a numpy transcription of the formula,
active-code masking, dead-code restarts, codebook growth and pseudo-modality replay."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.nn import quantizer as vq

CODE_DIM = 3


def _quantizer(modalities, capacity=6, active=5, **kwargs):
    return vq.VectorQuantizer(
        codebook_capacity=capacity, code_dim=kwargs.pop("code_dim", CODE_DIM),
        initial_active_codes=active, modalities=modalities, **kwargs)


def _apply(module, state, features, *, update, seed=0):
    output, variables = module.apply(
        {"quantizer": state}, features, update=update, mutable=["quantizer"],
        rngs={"quantizer": jax.random.key(seed)})
    return output, variables["quantizer"]


def _random_features(rng, modalities, shape=(2, 4, CODE_DIM)):
    """Standard-normal float32 features of `shape` per modality, drawn in `modalities` order."""
    return {m: jnp.asarray(rng.normal(size=shape), jnp.float32) for m in modalities}


def _random_state(rng, capacity, active, code_dim=CODE_DIM):
    """A trained-looking state whose embedding is deliberately NOT W/N."""
    return {
        "embedding": jnp.asarray(rng.normal(size=(capacity, code_dim)), jnp.float32),
        "ema_weight": jnp.asarray(rng.normal(size=(capacity, code_dim)), jnp.float32),
        "ema_count": jnp.asarray(rng.uniform(0.5, 2.0, size=capacity), jnp.float32),
        "unused_steps": jnp.zeros((capacity,), jnp.int32),
        "active_count": jnp.asarray(active, jnp.int32),
    }


def _numpy_mm_ema(state, features, order, *, decay, epsilon, own_weight):
    """The MM-EMA step written out from the formula, one (code, b, t) at a time, in float64."""
    embedding = np.asarray(state["embedding"], np.float64)
    weight = np.asarray(state["ema_weight"], np.float64).copy()
    count = np.asarray(state["ema_count"], np.float64).copy()
    active = int(state["active_count"])
    z = {m: np.asarray(features[m], np.float64) for m in order}
    batch, steps, _ = z[order[0]].shape
    codes = {}
    for m in order:
        codes[m] = np.zeros((batch, steps), int)
        for b in range(batch):
            for t in range(steps):
                distances = [np.sum((z[m][b, t] - embedding[k]) ** 2) for k in range(active)]
                codes[m][b, t] = int(np.argmin(distances))
    others_weight = (1 - own_weight) / (len(order) - 1) if len(order) > 1 else 0.0
    for m in order:  # Sequential: one full EMA update per modality, in the given order.
        for k in range(active):
            count[k] = decay * count[k] + (1 - decay) * np.sum(codes[m] == k)
        total = count[:active].sum()
        count[:active] = (count[:active] + epsilon) / (total + active * epsilon) * total
        for k in range(active):
            assigned_sum = np.zeros(embedding.shape[1])
            for b in range(batch):
                for t in range(steps):
                    if codes[m][b, t] == k:
                        mixed = (own_weight if len(order) > 1 else 1.0) * z[m][b, t]
                        for other in order:
                            if other != m:
                                mixed = mixed + others_weight * z[other][b, t]
                        assigned_sum += mixed
            weight[k] = decay * weight[k] + (1 - decay) * assigned_sum
    new_embedding = embedding.copy()
    new_embedding[:active] = weight[:active] / count[:active, None]
    return codes, {"embedding": new_embedding, "ema_weight": weight, "ema_count": count}


@pytest.mark.parametrize(
    "modalities, present, ema_order, order",
    [
        (("text", "audio"), ("audio", "text"), None, ("audio", "text")),
        (("video", "text", "audio"), ("video", "audio", "text"), None, ("audio", "video", "text")),
        (("video", "audio", "text"), ("video", "audio", "text"), ("text", "audio", "video"),
         ("text", "audio", "video")),
        (("video", "audio", "text"), ("audio", "text"), None, ("audio", "text")),  # COMET stage 2.
        (("depth", "text", "image"), ("image", "text", "depth"), None, ("text", "depth", "image")),
    ],
    ids=["bimodal", "trimodal-default", "trimodal-custom-order", "video-absent", "non-reference"],
)
def test_mm_ema_step_matches_hand_computation(modalities, present, ema_order, order):
    rng = np.random.default_rng(0)
    # Large ε and small γ make Laplace smoothing (with M = 5 active codes, not 6) and the
    # sequential order visible far above float32 noise.
    decay, epsilon = 0.8, 0.3
    state = _random_state(rng, capacity=6, active=5)
    features = _random_features(rng, present)
    order_setting = {} if ema_order is None else {"ema_order": ema_order}
    module = _quantizer(modalities, decay=decay, epsilon=epsilon, **order_setting)

    output, new_state = _apply(module, state, features, update=True)

    codes, expected = _numpy_mm_ema(
        state, features, order, decay=decay, epsilon=epsilon, own_weight=0.5)
    for m in present:
        np.testing.assert_array_equal(output.codes[m], codes[m])
        np.testing.assert_array_equal(output.code_vectors[m], state["embedding"][codes[m]])
        np.testing.assert_allclose(output.quantized[m], state["embedding"][codes[m]], atol=1e-6)
        expected_distances = np.sum(
            (np.asarray(features[m])[:, :, None] - np.asarray(state["embedding"])) ** 2, axis=-1)
        np.testing.assert_allclose(output.squared_distances[m], expected_distances, atol=1e-5)
    for name in ("embedding", "ema_weight", "ema_count"):
        np.testing.assert_allclose(new_state[name], expected[name], rtol=2e-5, atol=1e-6)
        np.testing.assert_array_equal(new_state[name][5], state[name][5])  # Inactive row.
    _, other_order = _numpy_mm_ema(
        state, features, order[::-1], decay=decay, epsilon=epsilon, own_weight=0.5)
    assert not np.allclose(new_state["embedding"], other_order["embedding"], rtol=1e-3)


def _numpy_reference_mm_ema(state, audio, video, text=None, *, decay=0.99, epsilon=1e-5):
    """The reference's training-mode MM-EMA in float64, transcribed block by block.

    `Cross_VQEmbeddingEMA_AVT.forward` (main_model_2.py): assignments from the pre-update
    embedding, then an audio block, a video block and a text block, each
    `ema_count = γ·N + (1−γ)·Σ enc; n = Σ N; N = (N + ε)/(n + M·ε)·n;
    ema_weight = γ·W + 0.5(1−γ)·enc_ownᵀ z_own + 0.25(1−γ)·enc_ownᵀ z_o1 + 0.25(1−γ)·enc_ownᵀ z_o2;
    embedding = W / N`. Without text: the bimodal `Cross_VQEmbeddingEMA_AT` / AV forward (audio
    block, then the other modality's block, weights 0.5/0.5). Every code is active (M = C).
    """
    embedding = np.asarray(state["embedding"], np.float64)
    count = np.asarray(state["ema_count"], np.float64)
    weight = np.asarray(state["ema_weight"], np.float64)
    num_codes, dim = embedding.shape
    flat = {"a": audio, "v": video, "t": text}
    flat = {k: np.asarray(v, np.float64).reshape(-1, dim) for k, v in flat.items() if v is not None}
    encodings = {}
    for name, z in flat.items():
        distances = (np.sum(embedding ** 2, axis=1) + np.sum(z ** 2, axis=1, keepdims=True)
                     - 2.0 * z @ embedding.T)
        encodings[name] = np.eye(num_codes)[np.argmin(distances, axis=-1)]
    blocks = ([("a", "v", "t"), ("v", "a", "t"), ("t", "a", "v")] if text is not None
              else [("a", "v"), ("v", "a")])
    for own, *others in blocks:
        enc = encodings[own]
        count = decay * count + (1 - decay) * enc.sum(axis=0)
        n = count.sum()
        count = (count + epsilon) / (n + num_codes * epsilon) * n
        other_weight = 0.25 if text is not None else 0.5
        weight = (decay * weight + 0.5 * (1 - decay) * enc.T @ flat[own]
                  + sum(other_weight * (1 - decay) * enc.T @ flat[o] for o in others))
        embedding = weight / count[:, None]
    return {"embedding": embedding, "ema_weight": weight, "ema_count": count}


@pytest.mark.parametrize("trimodal", [True, False], ids=["AVT", "AT"])
def test_default_ema_order_matches_reference_and_order_matters(precision, trimodal):
    dtype, rtol = precision
    rng = np.random.default_rng(3)
    capacity = 5  # all active, so the Laplace smoothing's M is the reference's
    state = {k: jnp.asarray(v, dtype) if v.dtype.kind == "f" else v
             for k, v in _random_state(rng, capacity, capacity).items()}
    present = ("video", "text", "audio") if trimodal else ("text", "audio")
    features = {m: rng.normal(size=(2, 4, CODE_DIM)).astype(dtype) for m in present}
    # γ = 0.9 (the reference's constructor argument; 0.99 by default) makes the order effect,
    # O((1 − γ)²), far larger than float32 noise. The modalities are listed in a non-reference
    # order: the default ema_order must still update audio first.
    decay = 0.9
    module = _quantizer(present, capacity=capacity, active=capacity, decay=decay)
    _, new_state = jax.jit(functools.partial(_apply, module, update=True))(state, features)

    if trimodal:
        expected = _numpy_reference_mm_ema(state, features["audio"], features["video"],
                                           features["text"], decay=decay)
    else:  # The AT quantizer's second argument is the text sequence.
        expected = _numpy_reference_mm_ema(state, features["audio"], features["text"], decay=decay)
    for name in ("embedding", "ema_weight", "ema_count"):
        np.testing.assert_allclose(new_state[name], expected[name], rtol=rtol, atol=rtol, err_msg=name)

    reversed_module = _quantizer(present, capacity=capacity, active=capacity, decay=decay,
                                 ema_order=vq.REFERENCE_EMA_ORDER[::-1])
    _, reversed_state = jax.jit(functools.partial(_apply, reversed_module, update=True))(
        state, features)
    difference = np.abs(np.asarray(reversed_state["embedding"]) - expected["embedding"])
    assert difference.max() > 1e-2 * np.abs(expected["embedding"]).max()


def test_mm_ema_update_order_is_a_priority_list():
    assert vq.REFERENCE_EMA_ORDER == ("audio", "video", "text")
    assert vq.mm_ema_update_order(("text", "video")) == ("video", "text")
    assert vq.mm_ema_update_order(("depth", "text", "image", "audio")) == (
        "audio", "text", "depth", "image")
    assert vq.mm_ema_update_order(("video", "text"), ("text", "point")) == ("text", "video")
    with pytest.raises(ValueError, match="distinct"):
        vq.mm_ema_update_order(("audio",), ("audio", "audio"))
    module = _quantizer(("audio", "text"), ema_order=("text", "text"))
    with pytest.raises(ValueError, match="distinct"):
        module.init(jax.random.key(0), {"audio": jnp.zeros((1, 2, CODE_DIM))}, update=False)


def test_inactive_codes_never_chosen_even_when_closest():
    rng = np.random.default_rng(1)
    state = _random_state(rng, capacity=6, active=4)
    features = jnp.asarray(rng.normal(size=(2, 4, CODE_DIM)), jnp.float32)
    # Rows 4 and 5 (inactive) coincide with some features exactly.
    state["embedding"] = state["embedding"].at[4].set(features[0, 0]).at[5].set(features[1, 2])
    module = _quantizer(("audio", "text"), active=4)

    output, new_state = _apply(module, state, {"audio": features, "text": features}, update=True)

    assert int(jnp.max(output.codes["audio"])) < 4
    np.testing.assert_array_equal(output.active_mask, [True] * 4 + [False] * 2)
    for name in ("embedding", "ema_weight", "ema_count", "unused_steps"):
        np.testing.assert_array_equal(new_state[name][4:], state[name][4:])


@pytest.mark.parametrize("reset_ema_on_restart", [False, True])
def test_restart_exactly_after_dead_code_steps_plus_one_unused_steps(reset_ema_on_restart):
    # Four active codes far apart and one inactive; D = 2; dead after MORE than 3 unused steps.
    module = vq.VectorQuantizer(
        codebook_capacity=5, code_dim=2, initial_active_codes=4, modalities=("audio", "text"),
        dead_code_steps=3, active_code_steps=1, reset_ema_on_restart=reset_ema_on_restart)
    embedding = jnp.asarray([[0, 0], [10, 0], [0, 10], [10, 10], [-10, -10]], jnp.float32)
    state = {
        "embedding": embedding,
        "ema_weight": embedding,
        "ema_count": jnp.ones((5,), jnp.float32),
        "unused_steps": jnp.full((5,), -1, jnp.int32),
        "active_count": jnp.asarray(4, jnp.int32),
    }
    step = jax.jit(functools.partial(_apply, module, update=True))
    every_code = jnp.asarray([[[0, 0], [10, 0], [0, 10], [10, 10]]], jnp.float32)
    every_code = {"audio": every_code, "text": every_code}
    only_code_0 = {m: jnp.zeros((1, 4, 2), jnp.float32) for m in ("audio", "text")}

    _, state = step(state, every_code, seed=0)  # Every active code used: counters 0.
    np.testing.assert_array_equal(state["unused_steps"], [0, 0, 0, 0, -1])
    for unused in (1, 2, 3):  # Not yet: a restart needs MORE than dead_code_steps = 3.
        _, state = step(state, only_code_0, seed=unused)
        np.testing.assert_array_equal(state["unused_steps"], [0, unused, unused, unused, -1])
        assert float(jnp.min(jnp.linalg.norm(state["embedding"][1:4], axis=-1))) > 9.0
    before = state
    _, state = step(state, only_code_0, seed=4)  # 4th step of disuse = dead_code_steps + 1.

    np.testing.assert_array_equal(state["unused_steps"], [0, 0, 0, 0, -1])
    # Restarted onto the only activated code (code 0, post-update) plus U(±1/1024) noise.
    offsets = state["embedding"][1:4] - state["embedding"][0]
    assert float(jnp.max(jnp.abs(offsets))) <= 1 / 1024
    assert float(jnp.min(jnp.abs(offsets))) > 0
    np.testing.assert_array_equal(state["embedding"][4], [-10, -10])  # Inactive: untouched.
    if reset_ema_on_restart:
        np.testing.assert_allclose(state["ema_weight"][1:4] / state["ema_count"][1:4, None],
                                   state["embedding"][1:4], rtol=1e-6)
    else:  # Reference: only `embedding` is written; W/N still points at the old rows.
        old_rows = state["ema_weight"][1:4] / state["ema_count"][1:4, None]
        np.testing.assert_allclose(old_rows, before["embedding"][1:4], rtol=0.05)

    _, state = step(state, only_code_0, seed=5)  # Restarted codes are not chosen in this batch.
    norms = jnp.linalg.norm(state["embedding"][1:4], axis=-1)
    if reset_ema_on_restart:  # The restart persists.
        assert float(jnp.max(norms)) < 1e-2
    else:  # The reference trap: W/N rebuilds the old row at the next EMA step.
        assert float(jnp.min(norms)) > 9.0


def test_no_nan_with_unused_codes_over_several_steps():
    module = _quantizer(("video", "audio", "text"), capacity=16, active=12, code_dim=8,
                        dead_code_steps=2, active_code_steps=2)
    rng = np.random.default_rng(2)
    features = _random_features(rng, ("video", "audio", "text"), shape=(2, 3, 8))
    state = module.init(jax.random.key(0), features, update=False)["quantizer"]
    step = jax.jit(lambda state, seed: _apply(module, state, features, update=True, seed=seed))
    for seed in range(6):
        output, state = step(state, seed)
        for leaf in jax.tree.leaves((output, state)):
            assert bool(jnp.all(jnp.isfinite(leaf))), "non-finite value in output or state"
    assert int(jnp.max(state["unused_steps"][:12])) <= 2  # Dead codes were restarted.


def test_update_false_and_init_leave_state_unchanged():
    module = _quantizer(("audio", "text"))
    rng = np.random.default_rng(3)
    features = _random_features(rng, ("audio", "text"))
    state = module.init(jax.random.key(0), features, update=True)["quantizer"]
    np.testing.assert_array_equal(state["ema_count"], np.zeros(6))
    np.testing.assert_array_equal(state["unused_steps"], np.full(6, -1))
    np.testing.assert_array_equal(state["embedding"][5], np.zeros(CODE_DIM))  # Inactive row.
    assert float(jnp.max(jnp.abs(state["embedding"]))) <= 1 / 5

    state = _random_state(rng, capacity=6, active=5)
    output, new_state = module.apply(
        {"quantizer": state}, features, update=False, mutable=["quantizer"])
    for name, value in state.items():
        np.testing.assert_array_equal(new_state["quantizer"][name], value)
    assert output.codes["text"].dtype == jnp.int32


def test_gradients_straight_through_and_distances():
    module = _quantizer(("audio",))
    rng = np.random.default_rng(4)
    state = _random_state(rng, capacity=6, active=5)
    features = jnp.asarray(rng.normal(size=(1, 2, CODE_DIM)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(1, 2, CODE_DIM)), jnp.float32)

    def loss(features):
        output = module.apply({"quantizer": state}, {"audio": features}, update=False)
        return (jnp.sum(output.quantized["audio"] * cotangent)
                + jnp.sum(output.squared_distances["audio"]))

    # d/dz [q_st·c] = c; d/dz Σ_k ||z − e_k||² = Σ_k 2(z − e_k).
    expected = cotangent + 2 * (6 * features - jnp.sum(state["embedding"], axis=0))
    np.testing.assert_allclose(jax.grad(loss)(features), expected, rtol=1e-5, atol=1e-5)


def test_bad_features_raise():
    module = _quantizer(("audio", "text"))
    features = {"speech": jnp.zeros((1, 2, CODE_DIM))}
    with pytest.raises(ValueError, match="unknown to this codebook"):
        module.init(jax.random.key(0), features, update=False)
    features = {"audio": jnp.zeros((1, 2, CODE_DIM)), "text": jnp.zeros((1, 3, CODE_DIM))}
    with pytest.raises(ValueError, match="paired features"):
        module.init(jax.random.key(0), features, update=False)


@pytest.fixture(scope="module")
def trained_state():
    """Capacity 6 with 5 active codes, after one training step from `init`."""
    module = _quantizer(("audio", "text"))
    rng = np.random.default_rng(5)
    features = _random_features(rng, ("audio", "text"))
    state = module.init(jax.random.key(0), features, update=False)["quantizer"]
    _, state = _apply(module, state, features, update=True)
    return state


def _assert_old_codes_identical(grown, state, num_old):
    for name in ("embedding", "ema_weight", "ema_count", "unused_steps"):
        np.testing.assert_array_equal(grown[name][:num_old], state[name][:num_old])


def test_grow_codebook_within_capacity(trained_state):
    state = trained_state
    new_rows = jnp.asarray([[50, 0, 0]], jnp.float32)
    grown = vq.grow_codebook(state, new_rows)

    _assert_old_codes_identical(grown, state, 5)
    assert grown["embedding"].shape == (6, CODE_DIM) and int(grown["active_count"]) == 6
    np.testing.assert_array_equal(grown["embedding"][5:], new_rows)
    mean_count = float(jnp.mean(state["ema_count"][:5]))
    np.testing.assert_allclose(grown["ema_count"][5:], mean_count)
    np.testing.assert_allclose(grown["ema_weight"][5:], new_rows * mean_count)
    np.testing.assert_array_equal(grown["unused_steps"][5:], [-1])
    roomier = vq.grow_codebook(state, new_rows, capacity=7)  # Fits, but asked for 7 rows.
    _assert_old_codes_identical(roomier, state, 5)
    assert roomier["embedding"].shape == (7, CODE_DIM) and int(roomier["active_count"]) == 6
    with pytest.raises(ValueError, match="new_rows must be"):
        vq.grow_codebook(state, jnp.zeros((2, CODE_DIM + 1)))


def test_grow_codebook_reallocates_and_new_rows_stay_stable(trained_state):
    state = trained_state
    new_rows = jnp.asarray([[50, 0, 0], [0, 50, 0], [0, 0, 50]], jnp.float32)
    grown = vq.grow_codebook(state, new_rows)  # 5 + 3 > 6: reallocate to 8 rows.
    _assert_old_codes_identical(grown, state, 5)
    assert grown["embedding"].shape == (8, CODE_DIM) and int(grown["active_count"]) == 8
    np.testing.assert_array_equal(grown["embedding"][5:], new_rows)
    padded = vq.grow_codebook(state, new_rows, capacity=10)
    _assert_old_codes_identical(padded, state, 5)
    np.testing.assert_array_equal(padded["unused_steps"][8:], [-1, -1])
    np.testing.assert_array_equal(padded["embedding"][8:], np.zeros((2, CODE_DIM)))
    with pytest.raises(ValueError, match="cannot hold"):
        vq.grow_codebook(state, new_rows, capacity=7)

    # One EMA step that assigns nothing to the new rows leaves them where they are.
    module = _quantizer(("audio", "text"), capacity=8, active=5)
    features = jnp.broadcast_to(grown["embedding"][:5], (2, 5, CODE_DIM))
    output, stepped = _apply(module, grown, {"audio": features, "text": features}, update=True)
    assert int(jnp.max(output.codes["audio"])) < 5
    np.testing.assert_allclose(stepped["embedding"][5:], new_rows, rtol=1e-3)


def test_pseudo_modality_sequence_picks_nearest_allowed_code():
    rng = np.random.default_rng(6)
    teacher = rng.normal(size=(6, CODE_DIM)).astype(np.float32)  # Active: rows 0-3.
    current = rng.normal(size=(8, CODE_DIM)).astype(np.float32)  # New codes: rows 6-7.
    features = rng.normal(size=(2, 5, CODE_DIM)).astype(np.float32)
    features[0, 0], features[0, 1] = teacher[5], current[2]  # Exactly on forbidden rows.
    features[1, 0] = current[7] + 1e-3

    sequence, on_new_code = jax.jit(vq.pseudo_modality_sequence)(
        features, teacher, 4, current, 6, 8)

    candidates = np.concatenate([teacher[:4], current[6:8]])
    nearest = np.argmin(
        np.sum((features[:, :, None] - candidates) ** 2, axis=-1), axis=-1)
    np.testing.assert_array_equal(sequence, candidates[nearest])
    np.testing.assert_array_equal(on_new_code, nearest >= 4)
    assert bool(on_new_code[1, 0])


def test_init_codebook_rows_from_features_finds_clusters():
    rng = np.random.default_rng(7)
    centers = np.asarray([[10, 0, 0], [0, 10, 0], [0, 0, 10]], np.float32)
    features = np.concatenate([c + 0.1 * rng.normal(size=(20, CODE_DIM)) for c in centers])
    rows = vq.init_codebook_rows_from_features(jax.random.key(0), features, 3)
    assert rows.shape == (3, CODE_DIM)
    order = np.argsort(np.argmax(np.asarray(rows), axis=-1))
    np.testing.assert_allclose(rows[order], centers, atol=0.1)


def test_owned_codes_are_chosen_but_never_updated_or_restarted():
    # Codes 0-3 active, 1 and 3 owned; audio and text use codes 0 and 1 every step, never 2 or 3.
    module = vq.VectorQuantizer(codebook_capacity=5, code_dim=2, initial_active_codes=4,
                                modalities=("audio", "text"), dead_code_steps=1, active_code_steps=1)
    embedding = jnp.asarray([[0, 0], [10, 0], [0, 10], [10, 10], [-10, -10]], jnp.float32)
    owned = jnp.asarray([False, True, False, True, False])
    state = {"embedding": embedding, "ema_weight": embedding, "ema_count": jnp.ones((5,), jnp.float32),
             "unused_steps": jnp.full((5,), -1, jnp.int32), "active_count": jnp.asarray(4, jnp.int32)}
    features = jnp.asarray([[[1, 1], [9, 1]]], jnp.float32)
    features = {"audio": features, "text": features}
    step = jax.jit(functools.partial(_apply, module, update=True))
    free, owning = state, {**state, "owned": owned}
    for seed in range(3):
        output, owning = step(owning, features, seed=seed)
        np.testing.assert_array_equal(output.codes["audio"], [[0, 1]])  # the owned code 1 is still chosen
        _, free = step(free, features, seed=seed)
    np.testing.assert_array_equal(owning["owned"], owned)
    for name in ("embedding", "ema_weight", "ema_count"):  # owned rows 1 and 3 as they were
        np.testing.assert_array_equal(owning[name][jnp.array([1, 3])], state[name][jnp.array([1, 3])])
    assert not np.allclose(free["embedding"][1], embedding[1])  # without ownership the EMA moves code 1
    assert not np.allclose(free["embedding"][3], embedding[3])  # ... and dead code 3 is restarted
    offsets = owning["embedding"][2] - owning["embedding"][jnp.array([0, 1])]  # free dead code 2 restarted
    assert float(jnp.min(jnp.max(jnp.abs(offsets), axis=-1))) <= 1 / 1024
