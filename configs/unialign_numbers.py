"""UniAlign on the numbers benchmark: four encoded modalities from three unpaired datasets, each with its
own label words, concept range and held-out concepts; teachers of another width trained on data the
student never reads.

    python -m unialign_jax.train --config=configs/unialign_numbers.py --workdir=workdirs/unialign_numbers
    python -m unialign_jax.evaluate --workdir=workdirs/unialign_numbers
    python configs/unialign_numbers.py          # trainable / frozen parameter counts by module group

Datasets (`unialign_jax.data.numbers`): image and video read `handwritten` (numbers 0-59, label words
"47"), audio reads `spoken` (20-79, "forty-seven"), printed reads `printed` (40-99, "the number 47");
so 0-19 exist only in handwriting and 80-99 only in print. In each dataset the numbers ending in
`HELD_OUT_DIGIT[dataset]` are absent from its training split and present in its test split (zero-shot
to numbers the modality never saw; most of them are trained in another modality). Class prompts are
the label words themselves (`{name}`), embedded by MiniLM as the captions are.

Teachers (model distillation, `unialign_jax.methods.unialign.teachers`): one per encoded modality,
`TEACHER_DIM`-d (not the backbone's 384, so each caches its own anchor features), trained on another
build of its dataset (seed + `TEACHER_SEED_OFFSET`: other digit pairs, voices' rates and pitches,
fonts' sizes and angles) over all 100 numbers, the held-out ones included. The teachers' builds use
the train split's sources only (train writers, voices, fonts), so no test source reaches the student.

Arg string: `unialign_config.parse_ablation_arg` (`routing=`, `experts=`, `top_k=`, `soft_bind=`,
`anchor_distil=`, `model_distil=`, `steps=`, `seed=`).
"""

import ml_collections

from unialign_jax import configlib
from unialign_jax.data import numbers
from unialign_jax.methods.unialign import config as unialign_config

MODALITIES = ("image", "video", "audio", "printed", "text")
ENCODED = ("image", "video", "audio", "printed")
HELD_OUT_DIGIT = {"handwritten": 5, "spoken": 8, "printed": 2}  # e.g. handwritten trains without 5, 15, ..., 55
TEACHER_DIM = 256
TEACHER_SEED_OFFSET = 1000
MINILM = {"width": 384, "depth": 6, "num_heads": 12, "mlp_dim": 1536, "norm_position": "post", "activation": "gelu",
              "layer_norm_epsilon": 1e-12}


def student_data(dataset: str, seed: int) -> ml_collections.ConfigDict:
    """The dataset over its default range, without its held-out numbers in the training split."""
    concepts = numbers.DEFAULT_CONCEPTS[dataset]
    train = tuple(n for n in concepts if n % 10 != HELD_OUT_DIGIT[dataset])
    return configlib.numbers_data(dataset, concepts={"train": train, "test": concepts}, seed=seed)


def get_config(arg=None):
    arg = unialign_config.parse_ablation_arg(arg)
    config = unialign_config.base_config(arg)
    shapes = configlib.numbers_shapes()
    config.model.modalities = MODALITIES
    config.model.input_shapes = {m: shapes[m] for m in MODALITIES}
    config.model.backbone = "bert"
    config.model.backbone_weights = "minilm"
    config.model.transformer = dict(MINILM)
    config.model.tokenizers = {m: {"kind": "features"} for m in ENCODED}
    config.model.embed_dim = 384
    config.accumulation = {"steps": 1, "micro_batch_sizes": {m: 32 for m in ENCODED}}
    config.batch_size = 32 * len(ENCODED)
    config.optim.learning_rate = 1e-3  # the paper's 2e-4 is for 100 epochs at batch 2048
    config.optim.warmup_steps = 30
    config.log_every = 25
    config.checkpoint.every = 200
    config.anchors.templates = {m: "{name}" for m in ENCODED}  # the label words are each dataset's own
    datasets = {m: student_data(numbers.MODALITY_DATASETS[m], arg.seed) for m in ENCODED}
    config.teachers.modalities = ENCODED
    config.teachers.dims = {m: TEACHER_DIM for m in ENCODED}
    config.teachers.data = {
        m: configlib.numbers_data(numbers.MODALITY_DATASETS[m], concepts=tuple(range(100)),
                                  seed=arg.seed + TEACHER_SEED_OFFSET)
        for m in ENCODED
    }
    config.teachers.auto_train = True
    config.stages = [unialign_config.unialign_stage("unialign", MODALITIES, datasets, steps=arg.steps or 400)]
    config.eval.data = dict(datasets)
    config.eval.batch_size = 128
    return config


if __name__ == "__main__":
    from unialign_jax.methods.unialign import model  # pylint: disable=import-outside-toplevel

    print(model.parameter_table(get_config()))
