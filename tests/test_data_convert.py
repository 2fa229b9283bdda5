"""Tests of the `features` converter (unialign_jax.data.convert / data.features) on files written here."""

import csv
import pathlib

import ml_collections
import numpy as np
import pytest

from unialign_jax.data import convert as convert_cli
from unialign_jax.data import features, pipeline

h5py = pytest.importorskip("h5py")

STEPS = 4
SHAPES = {"video": (STEPS, 3, 3, 8), "audio": (STEPS, 6), "text": (STEPS, 5)}


def make_split(num_examples: int, first_id: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {m: rng.normal(size=(num_examples, *shape)) for m, shape in SHAPES.items()}  # float64 inputs
    arrays["label"] = rng.integers(0, 5, num_examples)
    arrays["step_labels"] = rng.integers(0, 5, (num_examples, STEPS))
    arrays["id"] = np.array([f"clip{first_id + i}" for i in range(num_examples)])
    return arrays


def write_h5(path: pathlib.Path, arrays: dict) -> pathlib.Path:
    with h5py.File(path, "w") as f:
        for key, value in arrays.items():
            f[key] = value.astype("S") if key == "id" else value
    return path


def write_npy_dir(path: pathlib.Path, arrays: dict) -> pathlib.Path:
    path.mkdir()
    for key, value in arrays.items():
        np.save(path / f"{key}.npy", value)
    return path


def write_clips(path: pathlib.Path, arrays: dict) -> pathlib.Path:
    path.mkdir()
    with open(path / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label"])
        writer.writerows(zip(arrays["id"], arrays["label"]))
    for key in (*SHAPES, "step_labels"):
        (path / key).mkdir()
        for clip_id, value in zip(arrays["id"], arrays[key]):
            np.save(path / key / f"{clip_id}.npy", value)
    return path


def data_config(data_dir, dataset: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"name": "features", "data_dir": str(data_dir), "dataset": dataset})


def assert_round_trip(config, split: str, arrays: dict) -> None:
    loaded = pipeline.load_split(config, split, modalities=tuple(SHAPES))
    for modality in SHAPES:
        assert loaded[modality].dtype == np.float32
        np.testing.assert_array_equal(loaded[modality], arrays[modality].astype(np.float32), err_msg=modality)
    np.testing.assert_array_equal(loaded["label"], arrays["label"])
    np.testing.assert_array_equal(loaded["step_labels"], arrays["step_labels"])
    assert list(loaded["id"]) == list(arrays["id"])


@pytest.mark.parametrize("layout", ["npz+h5", "npy+clips"])
def test_round_trip_through_the_pipeline(tmp_path, layout):
    train, test = make_split(12, 0, seed=1), make_split(6, 100, seed=2)
    if layout == "npz+h5":
        np.savez(tmp_path / "train.npz", **train)
        inputs = {"train": tmp_path / "train.npz", "test": write_h5(tmp_path / "test.h5", test)}
    else:
        inputs = {"train": write_npy_dir(tmp_path / "train", train), "test": write_clips(tmp_path / "test", test)}
    path = features.convert("toy", inputs, data_dir=tmp_path / "tfds", num_classes=7)
    assert path == tmp_path / "tfds" / "features" / "toy" / "1.0.0"

    config = data_config(tmp_path / "tfds", "toy")
    assert pipeline.dataset_modalities(config) == ("video", "audio", "text")
    assert pipeline.make_builder(config).info.features["label"].num_classes == 7
    assert_round_trip(config, "train", train)
    assert_round_trip(config, "test", test)
    batch = next(pipeline.make_train_iterator(
        config, modalities=("video", "text"), batch_size=4, seed=0, process_index=0, process_count=1))
    assert batch["video"].shape == (4, *SHAPES["video"]) and batch["text"].shape == (4, *SHAPES["text"])


def test_cli_converts_without_step_labels_and_refuses_to_overwrite(tmp_path, capsys):
    train = make_split(5, 0, seed=3)
    del train["step_labels"]
    np.savez(tmp_path / "train.npz", **train)
    (tmp_path / "classes.txt").write_text("".join(f"class {i}\n" for i in range(5)))
    argv = ["--name=mine", f"--data_dir={tmp_path / 'tfds'}", f"--split=train={tmp_path / 'train.npz'}",
            f"--class_names={tmp_path / 'classes.txt'}"]
    assert convert_cli.main(argv) == 0
    config = data_config(tmp_path / "tfds", "mine")
    loaded = pipeline.load_split(config, "train", modalities=("audio",))
    np.testing.assert_array_equal(loaded["step_labels"], np.repeat(train["label"][:, None], STEPS, axis=1))
    assert pipeline.make_builder(config).info.features["label"].names == [f"class {i}" for i in range(5)]

    capsys.readouterr()
    assert convert_cli.main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert convert_cli.main([*argv, "--overwrite"]) == 0


def test_reading_a_dataset_that_was_never_converted_says_how_to_convert(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m unialign_jax.data.convert --name=absent"):
        pipeline.dataset_modalities(data_config(tmp_path, "absent"))
    with pytest.raises(ValueError, match="unknown field"):
        pipeline.make_builder(ml_collections.ConfigDict({"name": "features", "dataset": "x", "shape": 3}))


# Each bad input: (how to spoil a valid split, the words the error must contain). `{file}` is the
# spoiled file, so every message is checked to name it.
def _set(key, value):
    return lambda arrays: arrays.update({key: value})


def _set_row(key, index, value):
    def spoil(arrays):
        arrays[key] = arrays[key].copy()
        arrays[key][index] = value

    return spoil


STACKED_CASES = {
    "unknown array": (_set("visual", np.zeros((8, STEPS, 2))), "{file}: unknown array(s) ['visual']"),
    "no label": (lambda a: a.pop("label"), "{file}: no 'label' array"),
    "no id": (lambda a: a.pop("id"), "{file}: no 'id' array"),
    "integer features": (
        _set("audio", np.ones((8, STEPS, 6), np.int32)), "{file} [audio]: dtype int32, expected floating"
    ),
    "rank": (_set("text", np.ones((8, STEPS))), "{file} [text]: per-example shape (4,), expected (T, D)"),
    "NaN": (_set_row("audio", 3, np.nan), "{file} [audio]: 1 example(s) contain NaN, Inf or values beyond the "
                                          "float32 range: 3 (id 'clip3')"),
    "beyond float32": (_set_row("video", 6, 1e40), "{file} [video]: 1 example(s) contain NaN, Inf"),
    "row count": (_set("audio", np.zeros((7, STEPS, 6))), "{file} [audio]: pairing: 7 rows, but 8 ids and labels"),
    "duplicate id": (_set_row("id", 5, "clip2"), "{file} [id]: pairing: 1 duplicate id(s) at 5 (id 'clip2')"),
    "steps differ": (_set("text", np.zeros((8, STEPS + 1, 5))), "modalities have different numbers of steps T"),
    "float labels": (_set("label", np.zeros(8)), "{file} [label]: labels must be integers, got dtype float64"),
    "negative label": (_set_row("label", 1, -2), "{file} [label]: negative labels at 1 (id 'clip1')"),
    "step labels shape": (_set("step_labels", np.zeros((8, 2), int)), "{file} [step_labels]: step labels must be "
                                                                      "integers of shape (8, 4)"),
    "pickled ids": (_set("id", np.array([f"c{i}" for i in range(8)], dtype=object)), "{file} [id]: object array"),
}


@pytest.mark.parametrize("case", list(STACKED_CASES))
def test_rejects_bad_stacked_inputs(tmp_path, case):
    spoil, expected = STACKED_CASES[case]
    arrays = make_split(8, 0, seed=4)
    spoil(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(features.FeatureInputError) as error:
        features.convert("bad", {"train": tmp_path / "bad.npz"}, data_dir=tmp_path / "tfds")
    assert expected.format(file=tmp_path / "bad.npz") in str(error.value)
    assert not (tmp_path / "tfds" / "features" / "bad").exists()


def test_rejects_missing_and_unreadable_files_and_lists_every_problem(tmp_path):
    with pytest.raises(features.FeatureInputError, match=f"{tmp_path / 'nowhere.npz'}: not found"):
        features.convert("x", {"train": tmp_path / "nowhere.npz"}, data_dir=tmp_path / "tfds")
    (tmp_path / "broken.npz").write_bytes(b"not a zip file")
    with pytest.raises(features.FeatureInputError, match=f"{tmp_path / 'broken.npz'}: unreadable"):
        features.convert("x", {"train": tmp_path / "broken.npz"}, data_dir=tmp_path / "tfds")
    (tmp_path / "broken.h5").write_bytes(b"not hdf5")
    with pytest.raises(features.FeatureInputError, match=f"{tmp_path / 'broken.h5'}: unreadable"):
        features.convert("x", {"train": tmp_path / "broken.h5"}, data_dir=tmp_path / "tfds")

    arrays = make_split(8, 0, seed=5)
    arrays["audio"][2, 0, 0] = np.inf
    arrays["label"][4] = -1
    np.savez(tmp_path / "two_problems.npz", **arrays)
    with pytest.raises(features.FeatureInputError, match="2 problem") as error:
        features.convert("x", {"train": tmp_path / "two_problems.npz"}, data_dir=tmp_path / "tfds")
    assert "2 (id 'clip2')" in str(error.value) and "4 (id 'clip4')" in str(error.value)


def test_rejects_bad_per_clip_inputs(tmp_path):
    def clips(name, spoil):
        folder = write_clips(tmp_path / name, make_split(6, 0, seed=6))
        spoil(folder)
        with pytest.raises(features.FeatureInputError) as error:
            features.convert(name, {"train": folder}, data_dir=tmp_path / "tfds")
        return str(error.value), folder

    message, folder = clips("missing", lambda f: (f / "audio" / "clip3.npy").unlink())
    assert (f"{folder / 'audio'}: pairing: 1 example(s) of labels.csv have no file, "
            f"e.g. {folder / 'audio' / 'clip3.npy'}") in message
    message, folder = clips("orphan", lambda f: np.save(f / "text" / "stray.npy", np.zeros(SHAPES["text"])))
    assert f"1 file(s) have no row in labels.csv, e.g. {folder / 'text' / 'stray.npy'}" in message
    message, folder = clips("shape", lambda f: np.save(f / "video" / "clip4.npy", np.zeros((STEPS, 3, 3, 9))))
    assert f"{folder / 'video' / 'clip4.npy'}: shape (4, 3, 3, 9), expected (4, 3, 3, 8)" in message
    message, folder = clips("nan", lambda f: np.save(f / "text" / "clip1.npy", np.full(SHAPES["text"], np.nan)))
    assert f"{folder / 'text'}: 1 example(s) contain NaN" in message and "1 (id 'clip1')" in message
    message, folder = clips("csv", lambda f: (f / "labels.csv").write_text("id,label\nclip0,1\nclip1,one\n"))
    assert f"{folder / 'labels.csv'} row 3: expected '<id>,<integer label>', got 'clip1,one'" in message
    message, folder = clips("header", lambda f: (f / "labels.csv").write_text("name,class\nclip0,1\n"))
    assert f"{folder / 'labels.csv'}: the first row must be the header 'id,label'" in message


def test_rejects_splits_that_disagree(tmp_path):
    train, test = make_split(6, 0, seed=7), make_split(4, 3, seed=8)  # ids clip3..clip5 in both
    np.savez(tmp_path / "train.npz", **train)
    np.savez(tmp_path / "test.npz", **test)
    with pytest.raises(features.FeatureInputError, match=r"3 id\(s\) appear in both split 'train' and split 'test'"):
        features.convert("x", {"train": tmp_path / "train.npz", "test": tmp_path / "test.npz"}, data_dir=tmp_path)

    test = make_split(4, 50, seed=8)
    test["audio"] = test["audio"][..., :5]
    np.savez(tmp_path / "test.npz", **test)
    with pytest.raises(features.FeatureInputError, match="differ from split 'train'"):
        features.convert("x", {"train": tmp_path / "train.npz", "test": tmp_path / "test.npz"}, data_dir=tmp_path)
    with pytest.raises(features.FeatureInputError, match=r"labels >= num_classes \(2\) at"):
        features.convert("x", {"train": tmp_path / "train.npz"}, data_dir=tmp_path, num_classes=2)
