"""UniAlign losses (Eq. 10-16) against plain numpy."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.losses import (
    anchor_distillation_loss,
    model_distillation_loss,
    soft_modality_binding_loss,
    unialign_total_loss,
)


def similarity(query, candidates, temperature):
    """Eq. 10 for one query: softmax over candidates of the cosine similarity / τ."""
    query = query / np.linalg.norm(query)
    candidates = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    logits = candidates @ query / temperature
    return np.exp(logits) / np.exp(logits).sum()


def kl(model, target, kl_order):
    p, q = (model, target) if kl_order == "model_first" else (target, model)
    return np.sum(p * np.log(p / q))


def in_batch_kl(queries, candidates, target_queries, target_candidates, temperature, kl_order):
    terms = []
    for query, target_query in zip(queries, target_queries):
        model = similarity(query, candidates, temperature)
        target = similarity(target_query, target_candidates, temperature)
        terms.append(kl(model, target, kl_order))
    return np.mean(terms)


def normal(rng, shape, dtype):
    return rng.normal(size=shape).astype(dtype)


@pytest.mark.parametrize("kl_order", ["model_first", "target_first"])
def test_soft_modality_binding_both_directions_match_eq11(precision, kl_order):
    dtype, rtol = precision
    rng = np.random.default_rng(0)
    x1, x2 = normal(rng, (5, 4), dtype), normal(rng, (3, 4), dtype)
    labels1, labels2 = np.array([0, 2, 1, 2, 0]), np.array([3, 0, 1])
    y1, y2 = normal(rng, (3, 4), dtype), normal(rng, (4, 4), dtype)
    temperature = 0.5
    loss_fn = jax.jit(
        functools.partial(soft_modality_binding_loss, temperature=temperature, kl_order=kl_order)
    )
    loss = loss_fn(x1, labels1, y1, y2) + loss_fn(x2, labels2, y2, y1)

    def direction(x, labels, own_labels, other_labels):
        x, own_labels, other_labels = (a.astype(np.float64) for a in (x, own_labels, other_labels))
        return np.mean([
            kl(similarity(x[b], other_labels, temperature),
               similarity(own_labels[labels[b]], other_labels, temperature), kl_order)
            for b in range(len(x))
        ])

    expected = direction(x1, labels1, y1, y2) + direction(x2, labels2, y2, y1)
    np.testing.assert_allclose(loss, expected, rtol=rtol)


def test_soft_modality_binding_is_zero_when_samples_sit_on_their_label_embedding():
    rng = np.random.default_rng(1)
    labels_embeddings, other = jnp.asarray(rng.normal(size=(3, 4))), jnp.asarray(rng.normal(size=(5, 4)))
    labels = jnp.array([2, 0, 1, 1])
    samples = 2.0 * labels_embeddings[labels]  # same direction: same cosine similarities
    loss = soft_modality_binding_loss(samples, labels, labels_embeddings, other)
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    assert soft_modality_binding_loss(samples[::-1], labels, labels_embeddings, other) > 0


@pytest.mark.parametrize("kl_order", ["model_first", "target_first"])
def test_anchor_distillation_matches_eq12(precision, kl_order):
    dtype, rtol = precision
    rng = np.random.default_rng(2)
    points, text, image = (normal(rng, (4, 5), dtype) for _ in range(3))
    loss_fn = jax.jit(functools.partial(anchor_distillation_loss, temperature=0.3, kl_order=kl_order))
    loss = loss_fn(points, text, image)
    points, text, image = (a.astype(np.float64) for a in (points, text, image))
    expected = in_batch_kl(points, text, image, text, 0.3, kl_order) + in_batch_kl(
        points, image, text, image, 0.3, kl_order
    )
    np.testing.assert_allclose(loss, expected, rtol=rtol)


def test_anchor_distillation_is_zero_only_when_all_views_agree():
    embeddings = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5)))
    loss = anchor_distillation_loss(embeddings, embeddings, embeddings)
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    assert anchor_distillation_loss(embeddings, embeddings, embeddings[::-1]) > 0


@pytest.mark.parametrize("kl_order", ["model_first", "target_first"])
def test_model_distillation_matches_eq13_to_15(precision, kl_order):
    dtype, rtol = precision
    rng = np.random.default_rng(4)
    student = {m: normal(rng, (4, 6), dtype) for m in ("audio", "text")}
    teacher = {m: normal(rng, (4, 6), dtype) for m in ("audio", "text")}
    loss_fn = jax.jit(
        functools.partial(
            model_distillation_loss,
            extended_modality="audio",
            anchor_modality="text",
            temperature=0.2,
            kl_order=kl_order,
        )
    )
    loss, metrics = loss_fn(student, teacher)
    s = {m: v.astype(np.float64) for m, v in student.items()}
    t = {m: v.astype(np.float64) for m, v in teacher.items()}
    feature_mse = np.mean((t["audio"] - s["audio"]) ** 2)
    modal_align = in_batch_kl(s["audio"], s["text"], t["audio"], t["text"], 0.2, kl_order) + in_batch_kl(
        s["text"], s["audio"], t["text"], t["audio"], 0.2, kl_order
    )
    np.testing.assert_allclose(metrics["feature_mse"], feature_mse, rtol=rtol)
    np.testing.assert_allclose(metrics["modal_align_kl"], modal_align, rtol=rtol)
    np.testing.assert_allclose(loss, 2000.0 * feature_mse + modal_align, rtol=rtol)


def test_model_distillation_with_a_wider_teacher_matches_eq13_to_15(precision):
    """A teacher of width 5 against a 3-d student: the KLs compare in-batch similarities, each in its
    own space; Eq. 13 compares the student's projected feature with the teacher's."""
    dtype, rtol = precision
    rng = np.random.default_rng(6)
    student = {m: normal(rng, (4, 3), dtype) for m in ("audio", "text")}
    teacher = {m: normal(rng, (4, 5), dtype) for m in ("audio", "text")}
    projected = normal(rng, (4, 5), dtype)
    _, metrics = model_distillation_loss(student, teacher, "audio", "text", temperature=0.5,
                                         student_feature=projected)
    student, teacher = ({m: v.astype(np.float64) for m, v in side.items()} for side in (student, teacher))
    modal_align = (in_batch_kl(student["audio"], student["text"], teacher["audio"], teacher["text"], 0.5, "model_first")
                   + in_batch_kl(student["text"], student["audio"], teacher["text"], teacher["audio"], 0.5, "model_first"))
    np.testing.assert_allclose(metrics["feature_mse"], np.mean((teacher["audio"] - projected) ** 2), rtol=rtol)
    np.testing.assert_allclose(metrics["modal_align_kl"], modal_align, rtol=rtol)
    with pytest.raises(ValueError, match=r"pass student_feature at the teacher's width"):
        model_distillation_loss(student, teacher, "audio", "text")


def test_model_distillation_behaviour():
    rng = np.random.default_rng(5)
    student = {m: jnp.asarray(rng.normal(size=(3, 4))) for m in ("points", "image")}
    loss, _ = model_distillation_loss(student, student, "points", "image")
    np.testing.assert_allclose(loss, 0.0, atol=1e-7)
    teacher = {m: v + 0.1 for m, v in student.items()}
    grad_teacher = jax.grad(lambda t: model_distillation_loss(student, t, "points", "image")[0])(teacher)
    assert all(np.all(g == 0) for g in grad_teacher.values()), "the teacher is a constant"
    with pytest.raises(KeyError, match="depth"):
        model_distillation_loss(student, teacher, "depth", "image")


def test_unialign_total_loss_weights_terms():
    terms = {"nce": jnp.float32(1.5), "soft_bind": jnp.float32(0.2), "model_distil": jnp.float32(3.0)}
    total, metrics = unialign_total_loss(terms)
    np.testing.assert_allclose(total, 4.7, rtol=1e-6)  # α = 1, absent anchor term counts 0
    total, _ = unialign_total_loss(terms, {"soft_bind": 0.5, "anchor_distil": 2.0})
    np.testing.assert_allclose(total, 1.5 + 0.1 + 3.0, rtol=1e-6)
    assert metrics == terms
    with pytest.raises(ValueError, match="soft_binding"):
        unialign_total_loss({"nce": 1.0, "soft_binding": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        unialign_total_loss({})
