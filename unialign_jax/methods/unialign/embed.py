"""The encoders of a trained UniAlign model (`unialign_jax.load`).

    embedding_m = normalise(model(x, m)['embedding'])     an encoded modality m (evaluate.encode)
    embedding_t = label_embeddings.pool_text(x)           the anchor (text): its frozen MiniLM states,
                                                          pooled and normalised (never trained)

Zero-shot (Eq. 10): cosine similarity to class-label text embeddings. With `anchors.source =
'minilm_prompts'` any class name is embedded the way the run embedded its own (the modality's
template, MiniLM, `pool_text`); with the other sources ('text_centroids', 'file') the run has
embeddings for its datasets' classes only, so the names must be among them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from unialign_jax import optim
from unialign_jax.inputs import InputError
from unialign_jax.loop import StageSpec, TrainState
from unialign_jax.losses.contrastive import l2_normalize
from unialign_jax.methods.unialign import config as config_lib
from unialign_jax.methods.unialign import evaluate
from unialign_jax.methods.unialign import label_embeddings as label_lib


class UniAlignEmbedder:
    """`methods.Embedder` of a UniAlign model: every encoded modality and the anchor."""

    def __init__(self, config: ml_collections.ConfigDict, stage: StageSpec, state: TrainState):
        del stage  # one phase
        self.config = config
        self.modalities = tuple(config.model.modalities)
        self.model = config_lib.build_model(config)
        self.params = optim.merge_params(state.params, state.frozen)
        self.stored_labels = {m: np.asarray(v) for m, v in jax.device_get(state.carry["label_embeddings"]).items()}

    def input_shape(self, modality: str) -> tuple[int, ...]:
        return tuple(self.config.model.input_shapes[modality])

    def encode(self, modality: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """{'embedding': float32[N, D], unit rows}."""
        if modality == self.config.model.anchor:
            return {"embedding": np.asarray(label_lib.pool_text(inputs), np.float32)}
        embeddings, _ = evaluate.encode(self.model, self.params, inputs, modality, self.config.eval.batch_size)
        return {"embedding": np.asarray(l2_normalize(embeddings), np.float32)}

    def class_embeddings(self, modality: str, class_names: Sequence[str]) -> np.ndarray:
        """float32[C, D] unit rows, one per class name (module docstring)."""
        anchors = self.config.anchors
        if modality not in self.stored_labels:
            raise InputError(f"zero-shot classifies the encoded modalities {tuple(self.stored_labels)}, "
                             f"not {modality!r} (the anchor's own embeddings are the class space)")
        if anchors.source == "minilm_prompts":
            template = anchors.templates[modality]
            seq_len = self.config.model.input_shapes[self.config.model.anchor][0]
            prompts = [template.format(name=name) for name in class_names]
            return label_lib.minilm_prompt_embeddings(prompts, seq_len, anchors)
        known = label_lib.class_names(self.config.stages[0].data[modality])
        unknown = [name for name in class_names if name not in known]
        if unknown:
            raise InputError(f"class names {unknown} are not classes of the {modality!r} dataset {list(known)}: with "
                             f"anchors.source={anchors.source!r} the run has label embeddings for those only")
        return self.stored_labels[modality][[known.index(name) for name in class_names]]
