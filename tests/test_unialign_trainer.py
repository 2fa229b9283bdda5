"""The UniAlign step: compile once, frozen backbone, modality-aware gradient accumulation, loss
composition and mixed-modality data, on a tiny random backbone (the CLIs: test_unialign_run.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from unialign_jax import optim
from unialign_jax import parallel
from unialign_jax import loop
from unialign_jax.data import mixed
from unialign_jax.data import pipeline
from unialign_jax.losses import unialign as unialign_losses
from unialign_jax.losses.contrastive import info_nce, l2_normalize
from unialign_jax.methods.unialign import label_embeddings
from unialign_jax.methods.unialign import method as ua_method
from unialign_jax.methods.unialign import model as ua_model
from unialign_jax.methods.unialign import step as ua_step
from unialign_jax.methods.unialign import teachers

from tiny_unialign import tiny_unialign_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny config, its state, step and two mixed batches (teachers trained into a temporary workdir)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny_unialign_config(str(tmp_path_factory.mktemp("data")))
    (stage,) = loop.stage_specs(config)
    mesh = parallel.make_mesh(config.mesh)
    state = ua_model.fresh_state(config, stage)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    shardings = loop.state_shardings(abstract, mesh, config.sharding_rules)
    step = ua_step.UniAlignStep(config, stage, mesh, abstract, shardings)
    ua_method.METHOD.prepare(config, workdir)
    iterator = ua_method.train_iterator(config, stage, workdir)
    batches = [parallel.global_batch(next(iterator), mesh) for _ in range(3)]
    return config, stage, mesh, shardings, state, step, batches


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def test_only_adapters_tokenizers_and_heads_train(setup):
    config, _, _, _, state, _, _ = setup
    trainable, frozen = _flat(state.params), _flat(state.frozen)
    assert frozen and all(path.startswith("backbone/") for path in frozen)
    assert not any(path.startswith("backbone/") for path in frozen if "adapter/" in path)
    adapters = [path for path in trainable if path.startswith("backbone/")]
    assert adapters and all("_adapter/" in path for path in adapters)
    assert {path.split("/")[0] for path in trainable if not path.startswith("backbone/")} == {
        "tokenizer_image", "tokenizer_audio", "head_image", "head_audio", "distill_head_image", "log_logit_scale"}


def test_step_compiles_once_and_the_backbone_does_not_move(setup):
    _, _, _, shardings, state, step, batches = setup
    state = jax.device_put(jax.tree.map(jnp.copy, state), shardings)
    before = jax.device_get(state)
    for batch in batches:
        state, metrics = step(state, batch)
    assert step.trace_count == 1 and int(state.step) == 3
    after = jax.device_get(state)
    for path, value in _flat(before.frozen).items():
        np.testing.assert_array_equal(_flat(after.frozen)[path], value, err_msg=path)
    moved = {path.split("/")[0] for path, value in _flat(before.params).items()
             if not np.array_equal(value, _flat(after.params)[path])}
    assert {"backbone", "tokenizer_image", "tokenizer_audio", "head_image", "head_audio"} <= moved
    for name in ("loss/total", "loss/nce", "loss/soft_bind", "loss/anchor_distil", "loss/model_distil",
                 "image/feature_mse", "audio/nce_accuracy"):
        assert np.isfinite(float(metrics[name])), name
    assert "audio/model_distil" not in metrics  # only image has a teacher


def test_accumulation_equals_the_gradient_of_the_summed_per_modality_losses(setup):
    config, _, _, _, state, step, batches = setup
    batch = jax.device_get(batches[0])
    accumulated, metrics = jax.jit(step.gradients)(state, batch)

    def reference_loss(params):  # sum over modalities of the mean over that modality's micro-batches
        total = 0.0
        for modality in ("image", "audio"):
            fields = {k.split("/")[1]: v for k, v in batch.items() if k.startswith(f"{modality}/")}
            steps = config.accumulation.steps
            for a in range(steps):
                micro_batch = {k: v[a::steps] for k, v in fields.items()}
                total += step.modality_loss(params, state, micro_batch, modality)[0] / steps
        return total

    loss, reference = jax.jit(jax.value_and_grad(reference_loss))(state.params)
    np.testing.assert_allclose(float(metrics["loss/total"]), float(loss), rtol=1e-5)
    for path, value in _flat(reference).items():
        scale = np.abs(value).max()  # float32 sums in another order: tolerance relative to the array
        np.testing.assert_allclose(_flat(accumulated)[path], value, rtol=1e-4, atol=1e-5 * scale, err_msg=path)


def test_modality_loss_is_eq16_of_the_pure_losses(setup):
    config, _, _, _, state, step, batches = setup
    fields = {k.split("/")[1]: np.asarray(v)[:8] for k, v in jax.device_get(batches[0]).items() if k.startswith("image/")}
    tau = config.loss.temperature

    @jax.jit
    def losses(state, fields):
        total, metrics = step.modality_loss(state.params, state, fields, "image")
        outputs = step.model.apply({"params": optim.merge_params(state.params, state.frozen)}, fields["inputs"], "image")
        classes = state.carry["label_embeddings"]
        caption = label_embeddings.pool_text(fields["text"])
        label_anchor = classes["image"][fields["label"]]
        expected = {
            "nce": info_nce(outputs["embedding"], caption, outputs["log_logit_scale"])[0],
            "soft_bind": unialign_losses.soft_modality_binding_loss(
                outputs["embedding"], fields["label"], classes["image"], classes["audio"], tau),
            "anchor_distil": unialign_losses.anchor_distillation_loss(outputs["embedding"], label_anchor, caption, tau),
            "model_distil": unialign_losses.model_distillation_loss(
                {"image": outputs["embedding"], "text": caption},
                {"image": fields["teacher"], "text": caption}, "image", "text", temperature=tau,
                student_feature=l2_normalize(outputs["distillation"]))[0],
        }
        return total, metrics, expected

    total, metrics, expected = losses(state, fields)
    for name, value in expected.items():
        np.testing.assert_allclose(float(metrics[name]), float(value), rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(float(total), float(sum(expected.values())), rtol=1e-5)


def test_loss_switches_remove_their_terms(tmp_path):
    config = tiny_unialign_config(str(tmp_path / "data"), soft_bind=False, anchor_distil=False, model_distil=False)
    config.loss.nce_anchor = "label"
    (stage,) = loop.stage_specs(config)
    state = ua_model.fresh_state(config, stage)
    assert not any(path.startswith("distill_head_") for path in _flat(state.params))
    batch = next(ua_method.train_iterator(config, stage, str(tmp_path)))
    assert set(batch) == {"image/inputs", "image/label", "audio/inputs", "audio/label"}  # no captions, no teacher
    mesh = parallel.make_mesh(config.mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    step = ua_step.UniAlignStep(config, stage, mesh, abstract, loop.state_shardings(abstract, mesh, []))
    fields = {k.split("/")[1]: v for k, v in batch.items() if k.startswith("audio/")}
    total, metrics = jax.jit(step.modality_loss, static_argnums=3)(state.params, state, fields, "audio")
    assert set(metrics) & set(unialign_losses.UNIALIGN_LOSS_TERMS) == {"nce"}
    np.testing.assert_allclose(float(total), float(metrics["nce"]))


def test_mixed_batches_draw_each_modality_from_its_own_shuffle(tmp_path):
    config = tiny_unialign_config(str(tmp_path / "data"))
    data = config.stages[0].data["image"]
    num_train = len(pipeline.build_source(data, "train"))
    labels = pipeline.load_split(data, "train", modalities=("image",))["label"]
    index = np.arange(num_train)
    iterator = mixed.make_mixed_iterator(
        {"image": data, "audio": data}, modalities=("image", "audio"), batch_sizes={"image": 16, "audio": 8}, seed=0,
        extra={"image": {"index": index}, "audio": {"index": index}}, process_index=0, process_count=1)
    seen = {"image": [], "audio": []}
    for _ in range(10):  # 160 image rows: more than two epochs of 64 examples
        batch = next(iterator)
        assert batch["image/inputs"].shape == (16, 4, 6) and batch["audio/inputs"].shape == (8, 4, 5)
        for modality in seen:
            rows = batch[f"{modality}/index"]
            np.testing.assert_array_equal(batch[f"{modality}/label"], labels[rows])  # joined by stored index
            seen[modality].append(rows)
    image, audio = np.concatenate(seen["image"]), np.concatenate(seen["audio"])
    assert sorted(image[:num_train]) == list(range(num_train))  # each epoch covers the split once
    assert not np.array_equal(image[:8], audio[:8])  # independent shuffles: rows are not paired


def test_an_external_teacher_wider_than_the_anchor_needs_and_gets_its_anchor_features(tmp_path):
    """A 24-d teacher against 16-d anchors (as ONE-PEACE's 1536-d against CLIP's 512-d): its file must
    hold the teacher's anchor embeddings, which reach the step as `teacher_anchor`."""
    config = tiny_unialign_config(str(tmp_path / "data"))
    config.teachers.dims = {"image": 24}
    (stage,) = loop.stage_specs(config)
    num_train = len(pipeline.build_source(config.stages[0].data["image"], "train"))
    directory = teachers.teacher_dir(config, str(tmp_path))
    directory.mkdir(parents=True)
    stored = dict(features=np.ones((num_train, 24), np.float32), test_top1=0.0,
                  data_config=config.stages[0].data["image"].to_json(sort_keys=True))
    np.savez(directory / "image.npz", **stored)
    with pytest.raises(ValueError, match="24-d but the anchor is 16-d: the file must also hold `anchor_features`"):
        teachers.load_teachers(config, str(tmp_path))
    np.savez(directory / "image.npz", **stored, anchor_features=np.ones((num_train, 24), np.float32))
    batch = next(ua_method.train_iterator(config, stage, str(tmp_path)))
    assert batch["image/teacher"].shape == batch["image/teacher_anchor"].shape == (16, 24)
    assert set(batch) == set(ua_model.random_batch(config, num_classes=10))

    state = ua_model.fresh_state(config, stage)
    mesh = parallel.make_mesh(config.mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    step = ua_step.UniAlignStep(config, stage, mesh, abstract, loop.state_shardings(abstract, mesh, []))
    _, metrics = step(state, parallel.global_batch(batch, mesh))
    assert np.isfinite(float(metrics["image/model_distil"])) and float(metrics["image/feature_mse"]) > 0
