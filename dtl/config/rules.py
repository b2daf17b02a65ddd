"""How config fields are checked: the rules a field carries in its metadata (`rule`, and the common ones named
here), Literal choices, and `validate_section`, which each section's ``__post_init__`` calls (a ValueError
naming the field and the value)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, Literal


def rule(check: Callable[[Any], bool], message: str) -> dict[str, Any]:
    """A field's check, as dataclass field metadata: ``x: int = field(default=1, metadata=rule(...))`` keeps the
    rule beside the field it checks. `message` completes "<field> ...": e.g. "must be > 0"."""
    return {"rule": (check, message)}


def bare_flag(value: str) -> dict[str, Any]:
    """Field metadata: the flag may be given without a value (``--cache-images`` alone), meaning `value`;
    ``--cache-images DIR`` gives DIR. Combine with a rule by merging: ``{**rule(...), **bare_flag(...)}``."""
    return {"bare": value}


POSITIVE = rule(lambda v: v > 0, "must be > 0")
POSITIVE_IF_GIVEN = rule(lambda v: v is None or v > 0, "must be > 0 when given")
NON_NEGATIVE = rule(lambda v: v >= 0, "must be >= 0")
FRACTION = rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
FRACTION_IF_GIVEN = rule(lambda v: v is None or 0 <= v < 1, "must be in [0, 1)")
PROBABILITY = rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")


def validate_section(section: Any) -> None:
    """Every field of a config section: tuples from lists, Literal choices, the field's own rule."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if typing.get_origin(hints[f.name]) is tuple:  # flags (nargs), TOML and config.json give lists
            kind = typing.get_args(hints[f.name])[0]
            value = tuple(kind(v) for v in value) if isinstance(value, (list, tuple)) else (value,)
            setattr(section, f.name, value)
        choices = choices_of(hints[f.name])
        if choices:
            _check(f.name, value, value in choices, f"must be one of {', '.join(choices)}")
        if "rule" in f.metadata:
            check, message = f.metadata["rule"]
            _check(f.name, value, check(value), message)


def _check(name: str, value: Any, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")


def choices_of(hint: Any) -> tuple[str, ...]:
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return ()
