"""The one check of command-line and config settings: each settings dataclass says what values it accepts.

A dataclass declares the range of its numeric fields in a class attribute (`valid: ClassVar[dict[str, Valid]] =
{"k": at_least(1)}`; subclasses add to their parents'); `check_fields`, called from `__post_init__`, rejects a
bad value at parse time, before any data or model is read, with the flag and the accepted range named. (Field
metadata would be the natural place, but `HfArgumentParser` hands all of it to argparse.) Data files are
checked by `geoguard.corpora`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

Valid = tuple[Callable[[float], bool], str]
"""A predicate on a field's value and the words for what it accepts (`"an integer >= 1"`)."""


def at_least(low: float) -> Valid:
    return (lambda value: value >= low, f">= {low}")


def above(low: float) -> Valid:
    return (lambda value: value > low, f"> {low}")


def between(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Valid:
    """Accept `low <= value <= high`; `open_low` / `open_high` exclude an end."""
    words = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return (
        lambda value: (value > low if open_low else value >= low) and (value < high if open_high else value <= high),
        words,
    )


def check_fields(settings: object) -> None:
    """Raise `ValueError` naming the first field of the dataclass `settings` whose value is out of its range.

    `None` is accepted for optional fields (it means "not set").
    """
    ranges = {}
    for cls in reversed(type(settings).__mro__):
        ranges |= vars(cls).get("valid", {})
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if field.name not in ranges or value is None:
            continue
        accepts, words = ranges[field.name]
        if not accepts(value):
            raise ValueError(f"--{field.name} must be {words}, got {value!r}.")
