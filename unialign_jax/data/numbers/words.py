"""The integers 0-99 in each dataset's own label words.

    handwritten  numerals          "47"
    spoken       English words     "forty-seven"   (hyphenated tens-ones, as `number_word`)
    printed      a noun phrase     "the number 47"
"""

from __future__ import annotations

NUM_CONCEPTS = 100
DATASETS = ("handwritten", "spoken", "printed")

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
         "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_word(number: int) -> str:
    """The English words of 0 <= number < 100: 'seven', 'thirteen', 'forty', 'forty-seven'."""
    if not 0 <= number < NUM_CONCEPTS:
        raise ValueError(f"number_word: {number} is not in [0, {NUM_CONCEPTS})")
    if number < 20:
        return _ONES[number]
    tens, ones = divmod(number, 10)
    return _TENS[tens] if ones == 0 else f"{_TENS[tens]}-{_ONES[ones]}"


def label_word(dataset: str, number: int) -> str:
    """The label of `number` in `dataset`'s own words (module docstring)."""
    if dataset == "handwritten":
        return str(number)
    if dataset == "spoken":
        return number_word(number)
    if dataset == "printed":
        return f"the number {number}"
    raise ValueError(f"unknown numbers dataset {dataset!r}; datasets: {DATASETS}")


def label_words(dataset: str) -> tuple[str, ...]:
    """The class names of `dataset`, index = number."""
    return tuple(label_word(dataset, number) for number in range(NUM_CONCEPTS))
