"""Captions of the numbers datasets: each describes ONE instance (its writer's strokes, voice or font)
and names the number in the dataset's own label words (`words.label_word`).

Each dataset has `TEMPLATES[dataset]`; every fourth template is used only by the test split (as in
`digits.captions`). Fields: {label} (the dataset's label word: "47", "forty-seven", "the number 47")
and {style} (handwritten: 'light' / 'medium' / 'heavy'; spoken: 'a slow, high-pitched Scottish
female voice'; printed: 'DejaVu Serif bold, tilted left'). The captions are encoded by
`digits.captions.CaptionEncoder` (all-MiniLM-L6-v2 word-piece states).
"""

from __future__ import annotations

from unialign_jax.data.pipeline import SPLITS

TEMPLATES = {
    "handwritten": (
        "{label} written by hand in {style} strokes",
        "a handwritten {label} with {style} strokes",
        "the number {label} in {style} handwriting",
        "{style} pen strokes forming {label}",
        "someone wrote {label} with a {style} hand",
        "a form with {label} written on it in {style} ink",
        "{label}, handwritten, {style} strokes",
        "a scan of a handwritten {label} in {style} ink",
    ),
    "spoken": (
        "{style} says {label}",
        "{label}, spoken by {style}",
        "the word {label} read aloud by {style}",
        "{style} counting {label}",
        "a recording of {style} saying {label}",
        "{style} pronounces {label}",
        "you can hear {style} say {label}",
        "{label} in the words of {style}",
    ),
    "printed": (
        "{label} printed in {style}",
        "{label}, typeset in {style}",
        "a printed label showing {label} in {style}",
        "{label} set in the font {style}",
        "a noisy scan of {label} in {style}",
        "{label} in {style} type",
        "a sign reading {label} in {style}",
        "{label} rendered in {style}",
    ),
}


def split_templates(dataset: str, split: str) -> tuple[str, ...]:
    """The templates of a dataset's split: every fourth one (indices 3, 7) is a test template."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {SPLITS}")
    templates = TEMPLATES[dataset]
    test = templates[3::4]
    return test if split == "test" else tuple(t for t in templates if t not in test)
