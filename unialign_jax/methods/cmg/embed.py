"""The encoders of a trained CMG/COMET stage (`unialign_jax.load`).

An example of modality m is encoded by the evaluation's encode-only path
(`evaluate.encode_batch`: semantic encoder, adapter, quantizer; no dropout, codebook unchanged):

    codes[t]  = argmin_k |z_t - e_k|          the nearest active code of step t   int32[T]
    embedding = (1/T) sum_t e_codes[t]        the quantized sequence pooled       float32[D]

Zero-shot: CMG/COMET train no classifier, so a class name is embedded as a caption of the mediator
modality (`text`): its MiniLM word-piece states (`data.digits.captions`, the way the digits captions
were made), through the text encoder and the codebook, pooled as above. An input is given the class
whose embedding is the most cosine-similar. This needs text inputs of MiniLM states ([T, 384]) and a
text dataset of real language, so it is refused for the procedural synthetic world.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from unialign_jax import loop
from unialign_jax import optim
from unialign_jax.eval.batching import padded_chunks
from unialign_jax.inputs import InputError
from unialign_jax.methods.cmg import model as model_lib
from unialign_jax.methods.cmg.evaluate import encode_batch

TEXT = "text"  # the modality class names are embedded as (the mediator of the paper's stages)


class CMGEmbedder:
    """`methods.Embedder` of a CMG/COMET stage: every modality seen up to the stage."""

    def __init__(self, config: ml_collections.ConfigDict, stage: loop.StageSpec, state: loop.TrainState):
        self.config, self.stage = config, stage
        self.modalities = stage.seen_modalities
        self.model, _ = model_lib.build_models(config, stage)
        self.variables = {"params": optim.merge_params(state.params, state.frozen), "quantizer": state.quantizer}

    def input_shape(self, modality: str) -> tuple[int, ...]:
        return tuple(self.config.model.input_shapes[modality])

    def encode(self, modality: str, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """{'embedding': float32[N, D] (code vectors pooled over time), 'codes': int32[N, T]}."""
        codes, vectors = [], []
        for padded, size in padded_chunks({modality: inputs}, self.config.eval.batch_size):
            encoded, _ = jax.device_get(encode_batch(self.model, self.variables, padded))
            codes.append(encoded[modality][0][:size])
            vectors.append(encoded[modality][1][:size])
        return {"embedding": np.concatenate(vectors).mean(axis=1).astype(np.float32),
                "codes": np.concatenate(codes).astype(np.int32)}

    def class_embeddings(self, modality: str, class_names: Sequence[str]) -> np.ndarray:
        """float32[C, D]: each class name as a text caption, embedded like `encode` (module docstring)."""
        from unialign_jax.data.digits import captions  # pylint: disable=import-outside-toplevel

        del modality  # every modality is compared with the same text embeddings
        if TEXT not in self.modalities:
            raise InputError(f"zero-shot embeds class names as {TEXT!r} captions; stage {self.stage.name!r} has "
                             f"learned {self.modalities} only")
        shape = self.input_shape(TEXT)
        earlier = loop.stage_specs(self.config)[: self.stage.index + 1]
        text_data = [s.data for s in earlier if TEXT in s.modalities]
        if len(shape) != 2 or shape[1] != captions.EMBEDDING_DIM or any(d.name == "synthetic" for d in text_data):
            raise InputError(f"zero-shot embeds class names as MiniLM captions ([T, {captions.EMBEDDING_DIM}]); this "
                             f"model's {TEXT!r} inputs are {list(shape)} from "
                             f"{sorted({d.name for d in text_data})} data, not MiniLM states of real text")
        minilm_path = next((d.get("minilm_path") for d in text_data if d.get("minilm_path")), None)
        features = captions.caption_encoder(shape[0], minilm_path)(list(class_names))
        return self.encode(TEXT, features)["embedding"]

