"""The `features` data source: a user's pre-extracted features, converted once into array_record.

The CMG/COMET reference code trains on pre-extracted feature sequences, e.g. per clip video
[10, 7, 7, 512] (VGG19 pool5 per second), audio [10, 128] (VGGish), text [10, 768] (BERT tokens).
Convert them once, then read them through the pipeline with the data config
`{name: 'features', data_dir: ..., dataset: NAME}`:

    python -m unialign_jax.data.convert --name=vatex --data_dir=/data/tfds \
        --split=train=/data/vatex/train.h5 --split=test=/data/vatex/test.h5 \
        [--class_names=classes.txt | --num_classes=N] [--overwrite]

Input layouts (one path per split; any split names, the trainer reads 'train'):

1. Stacked arrays: an `.npz` file, an `.h5`/`.hdf5` file (needs h5py; top-level datasets) or a
   folder of `.npy` files (memory-mapped), holding
       <modality>    float[N, T, D] or float[N, T, H, W, C], modality names from
                     `pipeline.MODALITIES` (video, audio, text, image, speech, depth, points, printed)
       label         int[N], class ids >= 0
       id            [N] pair ids: strings (fixed-width, not pickled objects) or integers
       step_labels   optional int[N, T], per-step classes (default: `label` at every step)
   Row i of every array is the same example: the modalities of a row are a pair (or tuple).
2. One file per clip: a folder with
       labels.csv                header `id,label`, then one row per example
       <modality>/<id>.npy       float[T, ...] for each id and modality
       step_labels/<id>.npy      optional int[T]
   Files of the same id are a pair; every id needs a file in every modality folder.

Checks (all problems are collected and reported together, each with its file, example index and
id): readable files; known array / folder names; `label` and `id` present; floating-point
features of rank (T, D) or (T, H, W, C) with one T for all modalities and the same shapes in all
splits; integer labels >= 0 and < num_classes; no NaN / Inf / beyond-float32 values; pairing
(equal row counts, no duplicate ids, no id in two splits, a file for every id and a row for every
file). Features are stored as float32.
"""

from unialign_jax.data.features.builder import (
    Features,
    FeaturesConfig,
    convert,
    dataset_dir,
    default_config,
    make_builder,
)
from unialign_jax.data.features.inputs import FeatureInputError, SplitInputs, read_split

__all__ = [
    "FeatureInputError",
    "Features",
    "FeaturesConfig",
    "SplitInputs",
    "convert",
    "dataset_dir",
    "default_config",
    "make_builder",
    "read_split",
]
