"""Modality tokenizers (unialign_jax.nn.tokenizers): shapes, token order, FPS and kNN grouping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.nn import tokenizers as tk

WIDTH = 8


def _apply(module, inputs):
    variables = module.init(jax.random.key(0), inputs)
    return variables["params"], jax.jit(module.apply)(variables, inputs)


def _patch_tokens_numpy(image, kernel, stride, weight):
    """Reference conv patch embedding in row-major patch order: image [H, W, C], weight [kh, kw, C, D]."""
    rows = (image.shape[0] - kernel[0]) // stride[0] + 1
    cols = (image.shape[1] - kernel[1]) // stride[1] + 1
    return np.stack(
        [
            np.einsum(
                "hwc,hwcd->d",
                image[r * stride[0] : r * stride[0] + kernel[0], c * stride[1] : c * stride[1] + kernel[1]],
                weight,
            )
            for r in range(rows)
            for c in range(cols)
        ]
    )


def test_image_tokenizer_patches_in_row_major_order_plus_positions():
    images = np.random.default_rng(0).normal(size=(2, 8, 12, 3)).astype(np.float32)
    params, tokens = _apply(tk.ImageTokenizer(WIDTH, patch_size=4), images)
    assert tokens.shape == (2, 6, WIDTH) and params["pos_embedding"].shape == (6, WIDTH)
    expected = _patch_tokens_numpy(images[1], (4, 4), (4, 4), np.asarray(params["patch_embed"]["kernel"]))
    np.testing.assert_allclose(tokens[1], expected + params["pos_embedding"], rtol=1e-5, atol=1e-5)


def test_audio_tokenizer_is_ast_frequency_major():
    # AST defaults: 16x16 kernel, stride 10 over 128 mel x 512 frames -> 12 x 50 = 600 tokens.
    spectrogram = np.zeros((1, 512, 128), np.float32)
    assert jax.eval_shape(
        lambda x: tk.AudioTokenizer(WIDTH).init_with_output(jax.random.key(0), x)[0], spectrogram
    ).shape == (1, 600, WIDTH)
    # Small configuration: [time 50, mel 40], 8x8 kernel, stride 6 -> 6 mel rows x 8 time columns.
    spectrogram = np.random.default_rng(1).normal(size=(2, 50, 40)).astype(np.float32)
    params, tokens = _apply(tk.AudioTokenizer(WIDTH, patch_size=8, stride=6), spectrogram)
    assert tokens.shape == (2, 48, WIDTH)
    weight = np.asarray(params["patches"]["patch_embed"]["kernel"])
    expected = _patch_tokens_numpy(spectrogram[0].T[..., None], (8, 8), (6, 6), weight)  # (mel x time) map
    np.testing.assert_allclose(tokens[0], expected + params["patches"]["pos_embedding"], rtol=1e-5, atol=1e-5)


def test_depth_tokenizer_takes_one_channel():
    depth = np.ones((2, 8, 8), np.float32)
    _, tokens = _apply(tk.DepthTokenizer(WIDTH, patch_size=4), depth)
    assert tokens.shape == (2, 4, WIDTH)
    with pytest.raises(ValueError, match=r"\[B, H, W\] or \[B, H, W, 1\]"):
        tk.DepthTokenizer(WIDTH, patch_size=4).init(jax.random.key(0), np.ones((2, 8, 8, 3), np.float32))


def test_video_tokenizer_is_time_major_with_temporal_embedding():
    frame = np.random.default_rng(2).normal(size=(8, 8, 3)).astype(np.float32)
    video = np.broadcast_to(frame, (2, 3, 8, 8, 3))  # the same frame three times
    module = tk.VideoTokenizer(WIDTH, patch_size=4)
    params = module.init(jax.random.key(0), video)["params"]
    params["temporal_embedding"] = jnp.arange(3.0)[:, None] * jnp.ones(WIDTH)
    tokens = module.apply({"params": params}, video)
    assert tokens.shape == (2, 12, WIDTH)
    per_frame = tokens.reshape(2, 3, 4, WIDTH)
    np.testing.assert_allclose(per_frame[:, 2] - per_frame[:, 0], 2.0, rtol=1e-5)


# A hand-made cloud on the x axis (small y offsets break distance ties).
LINE = np.array(
    [
        [0, 0, 0],
        [1, 0.01, 0],
        [2, 0.02, 0],
        [3, 0.03, 0],
        [10, 0.04, 0],
        [11, 0.05, 0],
        [12, 0.06, 0],
        [20, 0.07, 0],
    ],
    np.float32,
)


def test_farthest_point_sampling_on_a_hand_made_cloud():
    # From point 0: farthest is x=20 (7); then x=10 (4, 10 from both picks); then x=3 (3); then x=12/x=1.
    cloud = np.stack([LINE, LINE[::-1]])  # the same cloud reversed: start is x=20
    chosen = np.asarray(jax.jit(tk.farthest_point_sampling, static_argnums=1)(cloud, 4))
    np.testing.assert_array_equal(chosen[0], [0, 7, 4, 3])
    np.testing.assert_array_equal(LINE[::-1][chosen[1], 0], [20, 0, 10, 3])
    random_cloud = np.random.default_rng(3).normal(size=(2, 64, 3)).astype(np.float32)
    picks = np.asarray(tk.farthest_point_sampling(random_cloud, 32))
    assert all(len(set(row)) == 32 for row in picks)


def test_knn_groups_are_the_nearest_points_nearest_first():
    centers = LINE[None, [0, 4, 7]]
    neighbours = np.asarray(tk.knn_indices(LINE[None], centers, 3))
    np.testing.assert_array_equal(neighbours[0], [[0, 1, 2], [4, 5, 6], [7, 6, 5]])
    groups = np.asarray(tk.gather_points(LINE[None], neighbours))
    np.testing.assert_array_equal(groups[0, 1, :, 0], [10, 11, 12])


def test_point_cloud_tokenizer_shapes_and_centred_groups():
    rng = np.random.default_rng(4)
    points = rng.normal(size=(2, 64, 6)).astype(np.float32)  # xyz + rgb
    module = tk.PointCloudTokenizer(WIDTH, num_groups=8, group_size=4)
    params, tokens = _apply(module, points)
    assert tokens.shape == (2, 8, WIDTH)
    # Groups are centred: translating the cloud moves only the centre embedding.
    shifted = points.copy()
    shifted[..., :3] += 5.0
    group_features = lambda p: module.apply(
        {"params": params}, p, capture_intermediates=lambda m, _: m.name == "group_encoder"
    )
    _, state = group_features(points)
    _, shifted_state = group_features(shifted)
    np.testing.assert_allclose(
        shifted_state["intermediates"]["group_encoder"]["__call__"][0],
        state["intermediates"]["group_encoder"]["__call__"][0],
        rtol=1e-4,
        atol=1e-4,
    )


def test_feature_tokenizer_projects_and_accepts_shorter_sequences():
    module = tk.FeatureTokenizer(WIDTH, num_positions=10)
    params, tokens = _apply(module, np.ones((2, 10, 5), np.float32))
    assert tokens.shape == (2, 10, WIDTH)
    short = module.apply({"params": params}, np.ones((2, 3, 5), np.float32))
    np.testing.assert_allclose(short, tokens[:, :3], rtol=1e-6)
    with pytest.raises(ValueError, match="11 tokens exceed the 10 positional embeddings"):
        module.apply({"params": params}, np.ones((2, 11, 5), np.float32))
