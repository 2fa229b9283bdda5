"""Tests of the synthetic world (unialign_jax.data.synthetic) and the grain pipeline (data.pipeline)."""

import re

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unialign_jax.data import pipeline, synthetic
from unialign_jax.data.synthetic.world import SyntheticWorld

NUM_CONCEPTS = 6
SEQ_LEN = 8
NUM_TRAIN = 96
NUM_TEST = 60
MODALITIES = ("video", "audio", "text")


def small_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    fields = {
        "name": "synthetic",
        "data_dir": None if data_dir is None else str(data_dir),
        "num_concepts": NUM_CONCEPTS,
        "seq_len": SEQ_LEN,
        "modality_shapes": {"video": (SEQ_LEN, 3, 3, 8), "audio": (SEQ_LEN, 16), "text": (SEQ_LEN, 16)},
        "num_train": NUM_TRAIN,
        "num_test": NUM_TEST,
        "noise": 0.5,
        "seed": 3,
        "concepts": None,
    }
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def train_iterator(config, *, modalities=("audio",), batch_size=8, seed=0, process_index=0, process_count=1):
    return pipeline.make_train_iterator(
        config, modalities=modalities, batch_size=batch_size, seed=seed,
        process_index=process_index, process_count=process_count,
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def config(data_dir):
    return small_config(data_dir)


def test_build_is_deterministic_and_seeded(config, tmp_path):
    elsewhere = small_config(tmp_path / "other")
    for split in ("train", "test"):
        first = pipeline.load_split(config, split, modalities=MODALITIES)
        second = pipeline.load_split(elsewhere, split, modalities=MODALITIES)
        assert first.keys() == second.keys()
        for key in first:
            np.testing.assert_array_equal(first[key], second[key], err_msg=f"{split}/{key}")
    reseeded = pipeline.load_split(small_config(tmp_path / "reseeded", seed=4), "test", modalities=("audio",))
    assert not np.allclose(reseeded["audio"], first["audio"])


def test_shapes_and_dtypes(config):
    assert pipeline.dataset_modalities(config) == MODALITIES
    assert len(pipeline.build_source(config, "train")) == NUM_TRAIN
    loaded = pipeline.load_split(config, "test", modalities=("video", "text"), max_examples=7)
    assert set(loaded) == {"video", "text", "label", "step_labels", "id"}
    assert loaded["video"].shape == (7, SEQ_LEN, 3, 3, 8) and loaded["video"].dtype == np.float32
    assert loaded["text"].shape == (7, SEQ_LEN, 16) and loaded["text"].dtype == np.float32
    assert loaded["label"].shape == (7,) and loaded["label"].dtype == np.int32
    assert loaded["step_labels"].shape == (7, SEQ_LEN) and loaded["step_labels"].dtype == np.int32
    assert list(loaded["id"]) == [f"test_{i:07d}" for i in range(7)]

    batch = next(train_iterator(config, modalities=("video", "audio"), batch_size=10))
    assert set(batch) == {"video", "audio", "label", "step_labels"}
    assert batch["video"].shape == (10, SEQ_LEN, 3, 3, 8) and batch["video"].dtype == np.float32
    assert batch["audio"].shape == (10, SEQ_LEN, 16) and batch["audio"].dtype == np.float32
    assert batch["label"].shape == (10,) and batch["label"].dtype == np.int32
    assert batch["step_labels"].shape == (10, SEQ_LEN) and batch["step_labels"].dtype == np.int32


def test_labels_are_the_dominant_step_concept(config):
    loaded = pipeline.load_split(config, "train", modalities=("audio",))
    labels, step_labels = loaded["label"], loaded["step_labels"]
    assert np.all((0 <= step_labels) & (step_labels < NUM_CONCEPTS))
    assert np.bincount(labels, minlength=NUM_CONCEPTS).tolist() == [NUM_TRAIN // NUM_CONCEPTS] * NUM_CONCEPTS
    modes = np.array([np.bincount(row, minlength=NUM_CONCEPTS).argmax() for row in step_labels])
    np.testing.assert_array_equal(modes, labels)
    dominant_fraction = (step_labels == labels[:, None]).mean(axis=1)
    assert dominant_fraction.min() >= 0.6
    assert (dominant_fraction < 1.0).mean() > 0.5  # most examples also contain distractor events


def test_each_modality_is_informative_through_its_own_map(config):
    train = pipeline.load_split(config, "train", modalities=MODALITIES)
    test = pipeline.load_split(config, "test", modalities=MODALITIES)
    class_means = {}
    for modality in MODALITIES:
        pooled_train = train[modality].reshape(NUM_TRAIN, SEQ_LEN, -1).mean(axis=1)
        pooled_test = test[modality].reshape(NUM_TEST, SEQ_LEN, -1).mean(axis=1)
        means = np.stack([pooled_train[train["label"] == c].mean(axis=0) for c in range(NUM_CONCEPTS)])
        distances = ((pooled_test[:, None, :] - means[None]) ** 2).sum(axis=-1)
        accuracy = (distances.argmin(axis=1) == test["label"]).mean()
        assert accuracy > 0.8, (modality, accuracy)  # nearest class mean; chance is 1/6
        class_means[modality] = means
    # audio and text have the same dimension but not the same map: their class means are unrelated.
    correlation = np.corrcoef(class_means["audio"].ravel(), class_means["text"].ravel())[0, 1]
    assert abs(correlation) < 0.5


def test_world_is_shared_across_concept_subsets_and_modality_sets():
    full = SyntheticWorld(10, {"text": (16,), "audio": (16,)}, seed=3)
    smaller = SyntheticWorld(4, {"text": (16,)}, seed=3)
    np.testing.assert_array_equal(smaller.concept_embeddings, full.concept_embeddings[:4])
    np.testing.assert_array_equal(smaller.maps["text"].w2, full.maps["text"].w2)
    assert not np.allclose(full.maps["text"].w2, full.maps["audio"].w2)
    step_labels = np.array([[0, 1, 1], [2, 2, 3]])
    np.testing.assert_array_equal(
        smaller.render(step_labels, 0.5, entropy=[7])["text"], full.render(step_labels, 0.5, entropy=[7])["text"]
    )


def test_process_shards_are_disjoint_shuffled_and_cover_an_epoch(config):
    stored = pipeline.load_split(config, "train", modalities=("audio",))["audio"]
    shards = []
    for process_index in range(2):
        iterator = train_iterator(config, batch_size=16, seed=1, process_index=process_index, process_count=2)
        batches = [next(iterator) for _ in range(NUM_TRAIN // 16)]  # one epoch of global batches, 8 per process
        assert all(batch["audio"].shape[0] == 8 for batch in batches)
        shards.append([row.tobytes() for batch in batches for row in batch["audio"]])
    assert len(set(shards[0])) == len(shards[0]) == NUM_TRAIN // 2
    assert not set(shards[0]) & set(shards[1])
    assert set(shards[0]) | set(shards[1]) == {row.tobytes() for row in stored}
    assert shards[0][:8] != [row.tobytes() for row in stored[0:16:2]]  # not the stored order


def test_iterator_state_resumes_at_the_same_batch(config, tmp_path):
    iterator = train_iterator(config, modalities=("text",), seed=5)
    for _ in range(13):  # crosses an epoch boundary (12 batches per epoch)
        next(iterator)
    state = iterator.get_state()
    manager = ocp.CheckpointManager(
        tmp_path / "ckpt", item_names=("data",), item_handlers={"data": grain.checkpoint.CheckpointHandler()}
    )
    manager.save(13, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = [next(iterator) for _ in range(3)]

    restored_from_state = train_iterator(config, modalities=("text",), seed=5)
    restored_from_state.set_state(state)
    restored_by_orbax = train_iterator(config, modalities=("text",), seed=5)
    manager.restore(13, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored_by_orbax)))
    for restored in (restored_from_state, restored_by_orbax):
        for want in expected:
            got = next(restored)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])
    assert not np.array_equal(next(train_iterator(config, modalities=("text",), seed=5))["text"], expected[0]["text"])


def test_concept_subsets_are_respected(data_dir):
    per_split = small_config(data_dir, concepts={"train": (0, 1, 2), "test": (2, 3, 4)})
    train = pipeline.load_split(per_split, "train", modalities=("audio",))
    test = pipeline.load_split(per_split, "test", modalities=("audio",))
    assert set(np.unique(train["step_labels"])) == set(np.unique(train["label"])) == {0, 1, 2}
    assert set(np.unique(test["step_labels"])) == {2, 3, 4}
    single = pipeline.load_split(small_config(data_dir, concepts=(4,)), "test", modalities=("audio",))
    assert np.all(single["step_labels"] == 4) and np.all(single["label"] == 4)


def test_config_name_is_a_stable_hash_of_the_world(tmp_path):
    def name(config):
        return synthetic.SyntheticConfig.from_data_config(config).name

    base = small_config(tmp_path)
    assert name(base) == name(small_config(tmp_path / "elsewhere"))  # data_dir is not part of the world
    reordered = small_config(
        tmp_path, modality_shapes={"text": [SEQ_LEN, 16], "audio": (SEQ_LEN, 16), "video": (SEQ_LEN, 3, 3, 8)}
    )
    assert name(reordered) == name(base)
    assert name(small_config(tmp_path, concepts=tuple(range(NUM_CONCEPTS)))) == name(base)
    assert name(small_config(tmp_path, concepts=())) == name(base)
    assert name(small_config(tmp_path, noise=0.6)) != name(base)
    assert name(small_config(tmp_path, concepts=(0, 1))) != name(base)


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("UNIALIGN_DATA_DIR", str(tmp_path / "env"))
    assert pipeline.resolve_data_dir(small_config(tmp_path / "explicit")) == str(tmp_path / "explicit")
    assert pipeline.resolve_data_dir(small_config(None)) == str(tmp_path / "env")
    assert pipeline.resolve_data_dir(small_config("")) == str(tmp_path / "env")
    monkeypatch.delenv("UNIALIGN_DATA_DIR")
    assert pipeline.resolve_data_dir(small_config(None)).endswith("/.cache/unialign_jax/tfds")
    with pytest.raises(ValueError, match="is a URI; datasets are read from a local or mounted directory"):
        pipeline.resolve_data_dir(small_config("gs://bucket/tfds"))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"name": "imagenet"}, "'name'"),
        ({"num_concepts": 1}, "'num_concepts'"),
        ({"seq_len": 0}, "'seq_len'"),
        ({"num_train": 2.5}, "'num_train'"),
        ({"noise": -1.0}, "'noise'"),
        ({"modality_shapes": {"smell": (SEQ_LEN, 4)}}, "'modality_shapes'"),
        ({"modality_shapes": {"audio": (SEQ_LEN, 4, 4)}}, "modality_shapes['audio']"),
        ({"modality_shapes": {"audio": (SEQ_LEN + 1, 4)}}, "'seq_len'"),
        ({"concepts": (0, 6)}, "'concepts'"),
        ({"concepts": (1, 1)}, "'concepts'"),
        ({"concepts": {"validation": (0,)}}, "'concepts'"),
        ({"num_concept": 3}, "num_concept"),
    ],
)
def test_bad_data_config_is_rejected_naming_the_field(tmp_path, overrides, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        pipeline.make_builder(small_config(tmp_path, **overrides))


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"modalities": ("depth",)}, "modalities"),
        ({"modalities": "audio"}, "modalities"),
        ({"batch_size": 10, "process_count": 4}, "batch_size"),
        ({"process_index": 2, "process_count": 2}, "process_index"),
    ],
)
def test_bad_iterator_arguments_are_rejected(config, overrides, field):
    with pytest.raises(ValueError, match=field):
        train_iterator(config, **overrides)


def test_unknown_split_is_rejected(config):
    with pytest.raises(ValueError, match="split 'validation'"):
        pipeline.load_split(config, "validation", modalities=("audio",))
