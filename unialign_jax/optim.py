"""Config -> optax transformation; trainable/frozen split and parameter groups by regex.

Parameter paths are '/'-joined names (`semantic_encoder_video/Dense_0/kernel`). Two ordered regex
tables in the config decide everything:
- `frozen_patterns`: parameters matching any of them are moved out of the optimised tree into
  `TrainState.frozen` (pre-trained backbones, earlier-stage modules);
- `optim.groups`: `[(group_name, regex), ...]`, first match wins; every trainable parameter must match
  one (an error lists those that do not). Each group's gradient is clipped to its own global norm
  (`optim.clip_norm`, reference: 0.5 per module, not one global clip) before the shared optimizer.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import ml_collections
import optax
from flax import traverse_util


def optimizer_config(name: str, learning_rate: float, *, weight_decay: float, schedule: str, clip_norm: float,
                     groups: Sequence[Sequence[str]], warmup_steps: int = 0, b1: float = 0.9, b2: float = 0.999,
                     eps: float = 1e-8) -> dict:
    """The `config.optim` entry `make_optimizer` reads: optimizer `name` ('adam' | 'adamw'), its
    hyper-parameters, the learning-rate `schedule` and the clipped parameter `groups`."""
    return dict(name=name, learning_rate=learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                schedule=schedule, warmup_steps=warmup_steps, clip_norm=clip_norm, groups=[list(g) for g in groups])


def split_params(params: dict, patterns: Sequence[str]) -> tuple[dict, dict]:
    """Splits a nested param dict into (matched, unmatched) by regex over '/'-joined paths."""
    compiled = [re.compile(p) for p in patterns]
    matched, rest = {}, {}
    for path, leaf in traverse_util.flatten_dict(params, sep="/").items():
        (matched if any(p.search(path) for p in compiled) else rest)[path] = leaf
    return (traverse_util.unflatten_dict(matched, sep="/"), traverse_util.unflatten_dict(rest, sep="/"))


def merge_params(*trees: dict) -> dict:
    """Union of disjoint nested dicts (inverse of `split_params`)."""
    flat: dict[str, Any] = {}
    for tree in trees:
        for path, leaf in traverse_util.flatten_dict(tree, sep="/").items():
            if path in flat:
                raise ValueError(f"Parameter {path!r} is present in more than one tree.")
            flat[path] = leaf
    return traverse_util.unflatten_dict(flat, sep="/")


def group_labels(params: dict, groups: Sequence[tuple[str, str]]) -> dict:
    """Same-structure tree of group names; raises if a parameter matches no group."""
    compiled = [(name, re.compile(pattern)) for name, pattern in groups]
    labels, unmatched = {}, []
    for path in traverse_util.flatten_dict(params, sep="/"):
        label = next((name for name, pattern in compiled if pattern.search(path)), None)
        if label is None:
            unmatched.append(path)
        labels[path] = label
    if unmatched:
        raise ValueError(
            f"config.optim.groups: no group matches {unmatched[:5]}"
            f"{' ...' if len(unmatched) > 5 else ''}; add a pattern (e.g. ('other', '.*'))."
        )
    return traverse_util.unflatten_dict(labels, sep="/")


OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "warmup_cosine")


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Constant (reference) or warmup + cosine decay, from `optim.schedule`."""
    if optim.schedule == "constant":
        return optax.constant_schedule(optim.learning_rate)
    if optim.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, optim.learning_rate, optim.warmup_steps, max(total_steps, optim.warmup_steps + 1)
        )
    raise ValueError(
        f"config.optim.schedule: unknown schedule {optim.schedule!r} (known: constant, warmup_cosine)."
    )


def make_optimizer(
    optim: ml_collections.ConfigDict, params: dict, total_steps: int
) -> optax.GradientTransformation:
    """Per-group gradient clipping followed by Adam or AdamW."""
    labels = group_labels(params, optim.groups)
    names = sorted({name for name, _ in optim.groups})
    clip = optax.partition({name: optax.clip_by_global_norm(optim.clip_norm) for name in names}, labels)
    schedule = learning_rate_schedule(optim, total_steps)
    if optim.name == "adam":
        base = optax.adam(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.name == "adamw":
        base = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    else:
        raise ValueError(f"config.optim.name: unknown optimizer {optim.name!r} (known: adam, adamw).")
    return optax.chain(clip, base)
