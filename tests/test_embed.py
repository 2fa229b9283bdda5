"""`unialign_jax.load`, the embed and export CLIs and the README's "Use a trained model" section, on
two tiny workdirs trained once per module: CMG (audio, image) and UniAlign (a BERT backbone
read from a weights file, so that an export can leave it out)."""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import scipy.io.wavfile
from absl import flags
from flax import traverse_util
from PIL import Image

import unialign_jax
from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import configlib
from unialign_jax import embed
from unialign_jax import evaluate
from unialign_jax import export
from unialign_jax import inputs as inputs_lib
from unialign_jax import loop
from unialign_jax import methods
from unialign_jax import train
from unialign_jax import trained
from unialign_jax.data import audio_features
from unialign_jax.data.digits import captions, handwriting
from unialign_jax.inference import TrainedModel
from unialign_jax.inputs import InputError
from unialign_jax.methods.cmg import evaluate as cmg_evaluate

from test_transformer import random_bert_state
from tiny import TINY_SHAPES, tiny_cmg_config
from tiny_unialign import SHAPES as UNIALIGN_SHAPES
from tiny_unialign import tiny_unialign_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cmg_workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmg")
    config = tiny_cmg_config(str(root / "data"), modalities=("audio", "image"), steps=4)
    train.run(config, str(root / "run"))
    return str(root / "run")


@pytest.fixture(scope="module")
def unialign_workdir(tmp_path_factory):
    """(workdir, the backbone weights file it was trained from)."""
    root = tmp_path_factory.mktemp("unialign")
    backbone = str(root / "bert.safetensors")
    safetensors.numpy.save_file(random_bert_state(width=16, depth=1, mlp=32, positions=8), backbone)
    config = tiny_unialign_config(str(root / "data"), steps=2, model_distil=False)
    config.model.backbone_weights = backbone
    train.run(config, str(root / "run"))
    return str(root / "run"), backbone


def _stored_state(workdir):
    config = evaluate.read_config(workdir)
    stage = loop.stage_specs(config)[-1]
    stored, _ = ckpt_lib.StageCheckpointer(os.path.join(workdir, stage.folder)).restore_state()
    return stored


def _random(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def write_wav(path, sample_rate=8000, channels=1):
    time = np.arange(int(0.4 * sample_rate)) / sample_rate
    tone = np.sin(2 * np.pi * 440 * time) * (time > 0.1)  # silence first, then a tone
    samples = (tone * 20000).astype(np.int16)
    scipy.io.wavfile.write(path, sample_rate, samples if channels == 1 else np.stack([samples] * channels, 1))
    return str(path)


def write_png(path, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path), pixels


# --------------------------------------------------------------------------------------------------
# The loaded model.


def test_cmg_embedding_is_the_codebook_rows_of_its_codes_pooled_over_time(cmg_workdir):
    model = unialign_jax.load(cmg_workdir)
    assert model.modalities == ("audio", "image")
    quantizer = _stored_state(cmg_workdir)["quantizer"]["quantizer"]
    codebook, active = np.asarray(quantizer["embedding"]), int(quantizer["active_count"])
    audio = _random((5, *TINY_SHAPES["audio"]))
    encoded = model.encode("audio", audio)
    assert encoded["codes"].shape == (5, TINY_SHAPES["audio"][0])
    assert encoded["codes"].min() >= 0 and encoded["codes"].max() < active
    np.testing.assert_allclose(encoded["embedding"], codebook[encoded["codes"]].mean(axis=1), rtol=1e-6, atol=1e-6)
    compiled = cmg_evaluate.encode_batch._cache_size()
    np.testing.assert_array_equal(model.embed("audio", audio[1]), encoded["embedding"][1:2])  # one example
    model.embed("audio", audio[:3])
    assert cmg_evaluate.encode_batch._cache_size() == compiled  # fixed-size batches: no new compilation


def test_similarity_is_the_cosine_of_the_embeddings():
    similarity = TrainedModel.similarity(np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[0.0, 2.0], [6.0, 8.0]]))
    np.testing.assert_allclose(similarity, [[0.8, 1.0], [0.0, 0.6]], rtol=1e-6)


def test_unialign_embeddings_are_unit_vectors_and_zero_shot_uses_the_runs_label_embeddings(unialign_workdir):
    workdir, _ = unialign_workdir
    model = unialign_jax.load(workdir)
    images = _random((6, *UNIALIGN_SHAPES["image"]))
    embeddings = model.embed("image", images)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    text = model.embed("text", _random((3, *UNIALIGN_SHAPES["text"])))
    np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)

    labels = np.asarray(_stored_state(workdir)["carry"]["label_embeddings"]["image"])[[3, 1, 7]]
    cosine = embeddings @ (labels / np.linalg.norm(labels, axis=1, keepdims=True)).T
    result = model.zero_shot("image", images, ["3", "1", "7"])
    np.testing.assert_allclose(result.similarity, cosine, rtol=1e-5, atol=1e-6)
    assert result.labels == [["3", "1", "7"][i] for i in cosine.argmax(axis=1)]
    with pytest.raises(InputError, match=r"class names \['cat'\] are not classes of the 'image' dataset"):
        model.zero_shot("image", images, ["cat"])
    with pytest.raises(InputError, match="zero-shot classifies the encoded modalities"):
        model.zero_shot("text", _random((1, *UNIALIGN_SHAPES["text"])), ["3"])


def test_cmg_zero_shot_is_refused_without_text_and_bad_requests_name_the_input(cmg_workdir):
    model = unialign_jax.load(cmg_workdir)
    audio = _random((2, *TINY_SHAPES["audio"]))
    with pytest.raises(InputError, match=r"as 'text' captions; stage 'pretrain' has learned \('audio', 'image'\)"):
        model.zero_shot("audio", audio, ["0", "1"])
    with pytest.raises(InputError, match=r"modality 'video': .* embeds \('audio', 'image'\)"):
        model.embed("video", audio)
    with pytest.raises(InputError, match=r"audio inputs: array of shape \(2, 6, 5\); the model expects \[6, 12\]"):
        model.embed("audio", audio[..., :5])
    with pytest.raises(InputError, match="stage 'nope': .* has stages \\['pretrain'\\]"):
        unialign_jax.load(cmg_workdir, stage="nope")
    with pytest.raises(InputError, match="only an export directory takes backbone weights"):
        unialign_jax.load(cmg_workdir, backbone="bert.safetensors")


def test_cmg_zero_shot_embeds_class_names_as_minilm_captions_through_the_text_encoder(tmp_path, monkeypatch):
    """A random CMG state with MiniLM-width text: the digits captions' features of the class names,
    given as text inputs, are classified as themselves (cosine 1 with their own class embedding)."""
    monkeypatch.setitem(TINY_SHAPES, "text", (6, captions.EMBEDDING_DIM))
    config = tiny_cmg_config(str(tmp_path / "data"), modalities=("audio", "text"))
    config.stages[0].data = configlib.features_data("captions")  # language, not the synthetic world (not built)
    stage = loop.stage_specs(config)[0]
    state = methods.for_config(config).random_state(config, stage, jax.random.key(0))
    model = TrainedModel(config, stage, methods.for_config(config).embedder(config, stage, state), "random")
    names = ["zero", "one", "seven", "a handwritten nine"]
    result = model.zero_shot("text", captions.caption_encoder(6)(names), names)
    assert result.labels == names
    np.testing.assert_allclose(np.diag(result.similarity), 1.0, rtol=1e-5)
    assert model.zero_shot("audio", _random((2, *TINY_SHAPES["audio"])), names).similarity.shape == (2, 4)


# --------------------------------------------------------------------------------------------------
# Files.


def test_files_go_through_the_data_paths(cmg_workdir, tmp_path):
    model = unialign_jax.load(cmg_workdir)
    wav = write_wav(tmp_path / "tone.wav")
    rate, samples = scipy.io.wavfile.read(wav)
    expected = audio_features.pooled_log_mel(samples / 32767.0, rate, *TINY_SHAPES["audio"][:1],
                                             num_mel_bins=TINY_SHAPES["audio"][1])
    np.testing.assert_allclose(model.inputs("audio", [wav]), expected[None], rtol=1e-5, atol=1e-5)
    png, pixels = write_png(tmp_path / "digit.png")
    np.testing.assert_allclose(model.inputs("image", png),
                               handwriting.image_rows(pixels / 255.0, *TINY_SHAPES["image"])[None], rtol=1e-6)
    several = _random((3, *TINY_SHAPES["audio"]))
    np.save(tmp_path / "one.npy", several[0])
    np.save(tmp_path / "three.npy", several)
    np.savez(tmp_path / "both.npz", audio=several, text=_random((3, *TINY_SHAPES["text"])))
    read = model.inputs("audio", [tmp_path / "one.npy", tmp_path / "three.npy", tmp_path / "both.npz"])
    np.testing.assert_array_equal(read, np.concatenate([several[:1], several, several]))


@pytest.mark.parametrize("name, modality, message", [
    ("missing.npy", "audio", "no such file"),
    ("notes.txt", "audio", "unsupported file type '.txt'"),
    ("short.npy", "audio", r"array of shape \(6, 5\); the model expects \[6, 12\]"),
    ("other.npz", "audio", r"no array named 'audio' \(has \['text'\]\)"),
    ("digit.png", "audio", "PNG files are read for the 'image' modality, not 'audio'"),
    ("stereo.wav", "audio", "2 channels, expected mono"),
    ("broken.wav", "audio", "unreadable wav file"),
    ("broken.png", "image", "unreadable image"),
    ("slow.wav", "audio", "sample rate 4000 Hz; the log-mel filters reach 4000 Hz"),
    ("tone.wav", "video", r"wav files are read for the \('audio', 'speech'\) modalities, not 'video'"),
])
def test_bad_files_raise_errors_naming_them(tmp_path, name, modality, message):
    path = tmp_path / name
    if name == "notes.txt":
        path.write_text("hello")
    elif name == "short.npy":
        np.save(path, _random((6, 5)))
    elif name == "other.npz":
        np.savez(path, text=_random((6, 16)))
    elif name == "digit.png":
        write_png(path)
    elif name == "stereo.wav":
        write_wav(path, channels=2)
    elif name == "broken.wav":
        path.write_bytes(b"RIFF....WAVEjunk")
    elif name == "broken.png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk")
    elif name == "slow.wav":
        write_wav(path, sample_rate=4000)
    elif name == "tone.wav":
        write_wav(path)
    with pytest.raises(InputError, match=re.escape(str(path)) + ": " + message):
        inputs_lib.read_inputs([path], modality, TINY_SHAPES[modality])


def test_embed_cli_exits_2_with_one_error_line_naming_the_file(cmg_workdir, tmp_path):
    missing = tmp_path / "missing.wav"
    result = subprocess.run([sys.executable, "-m", "unialign_jax.embed", f"--workdir={cmg_workdir}",
                             "--modality=audio", str(missing)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {missing}: no such file"]


# --------------------------------------------------------------------------------------------------
# Export.


def test_cmg_export_round_trip_gives_the_same_embeddings_and_codes(cmg_workdir, tmp_path):
    out = trained.write_export(cmg_workdir, str(tmp_path / "export"))
    manifest = json.loads((out / trained.MANIFEST).read_text())
    assert manifest["fields"] == ["params", "frozen", "quantizer"] and manifest["backbone"]["source"] == ""
    stored = safetensors.numpy.load_file(str(out / trained.WEIGHTS))
    assert {key.split("/")[0] for key in stored} == {"params", "quantizer"}  # one stage: nothing frozen
    params = traverse_util.flatten_dict(_stored_state(cmg_workdir)["params"], sep="/")
    assert {k.split("/", 1)[1] for k in stored if k.startswith("params/")} == set(params)
    assert manifest["arrays"]["quantizer/quantizer/embedding"]["shape"] == [32, 16]
    from_workdir, from_export = unialign_jax.load(cmg_workdir), unialign_jax.load(str(out))
    for modality in ("audio", "image"):
        x = _random((4, *TINY_SHAPES[modality]), seed=1)
        a, b = from_workdir.encode(modality, x), from_export.encode(modality, x)
        np.testing.assert_array_equal(a["codes"], b["codes"])
        np.testing.assert_array_equal(a["embedding"], b["embedding"])
    with pytest.raises(InputError, match="exists and is not an empty directory"):
        trained.write_export(cmg_workdir, str(out))
    with pytest.raises(InputError, match="holds every weight and takes no backbone"):
        unialign_jax.load(str(out), backbone="bert.safetensors")


def test_unialign_export_leaves_out_the_backbone_and_checks_the_one_it_is_given(unialign_workdir, tmp_path):
    workdir, backbone = unialign_workdir
    out = trained.write_export(workdir, str(tmp_path / "export"))
    manifest = json.loads((out / trained.MANIFEST).read_text())
    assert manifest["fields"] == ["params", "carry"] and manifest["backbone"]["source"] == backbone
    stored = safetensors.numpy.load_file(str(out / trained.WEIGHTS))
    assert not any(key.startswith("frozen/") or "/backbone/input/" in key for key in stored)
    assert any("/backbone/encoder/" in key for key in stored)  # MoE-LoRA experts train inside the backbone
    from_workdir, from_export = unialign_jax.load(workdir), unialign_jax.load(str(out), backbone=backbone)
    for modality in ("image", "audio", "text"):
        x = _random((4, *UNIALIGN_SHAPES[modality]), seed=2)
        np.testing.assert_array_equal(from_workdir.embed(modality, x), from_export.embed(modality, x))
    other = str(tmp_path / "other.safetensors")
    safetensors.numpy.save_file(random_bert_state(seed=1, width=16, depth=1, mlp=32, positions=8), other)
    with pytest.raises(InputError, match=f"backbone weights {other}: not the weights the model was trained with"):
        unialign_jax.load(str(out), backbone=other)


# --------------------------------------------------------------------------------------------------
# The README's section, run on the tiny workdirs.


def _section(name):
    readme = (ROOT / "README.md").read_text()
    return readme.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]


def parse_flags(define_flags, argv):
    """(positional arguments, flag values) of a CLI's argv, parsed into a fresh FlagValues."""
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    rest = flag_values(argv)
    return rest[1:], flag_values


def test_readme_use_a_trained_model_runs(cmg_workdir, unialign_workdir, tmp_path, monkeypatch, capsys):
    """Each command and the python block, with the tiny workdirs in place of the README's and the
    synthetic world's class names ('0'...'9') in place of the digits' ('zero'...'nine')."""
    section = _section("Use a trained model")
    replacements = {"workdirs/comet_vt_at_it": cmg_workdir, "workdirs/unialign_digits": unialign_workdir[0],
                    "zero,one,two,three,four,five,six,seven,eight,nine": "0,1,2,3,4,5,6,7,8,9",
                    '["zero", "one", "seven"]': '["0", "1", "7"]'}
    monkeypatch.chdir(tmp_path)
    write_wav("one.wav")
    write_wav("two.wav", sample_rate=16000)
    write_png("digit.png")
    commands = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip().splitlines()
    assert len(commands) == 5
    for command in commands:
        for old, new in replacements.items():
            command = command.replace(old, new)
        program, *argv = shlex.split(command)[2:]
        if program == "unialign_jax.export":
            _, options = parse_flags(export.define_flags, ["export", *argv])
            trained.write_export(options.workdir, options.out, options.stage)
        else:
            files, options = parse_flags(embed.define_flags, ["embed", *argv])
            print(embed.run(files, options))
    printed = capsys.readouterr().out
    assert re.search(r"one\.wav\s+1\.00\s+-?\d\.\d\d", printed)  # the similarity matrix's first row
    assert re.search(r"two\.wav\s+-?\d\.\d\d\s*\n", printed)  # against the one image
    assert np.load("audio.npz")["codes"].shape == (2, TINY_SHAPES["audio"][0])
    assert re.search(r"digit\.png\s+\d\s+-?\d\.\d\d", printed)  # zero-shot label and similarity
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    for old, new in replacements.items():
        block = block.replace(old, new)
    exec(compile(block, "README.md", "exec"), {})
    assert re.search(r"\['[0-9]'\]", capsys.readouterr().out)  # the zero-shot label list
