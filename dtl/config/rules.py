"""What a config field carries in its metadata -- its documentation (`doc`, which is also its flag's ``--help``
text), its check (`rule`, and the common ones named here) and how its flag is given (`bare_flag`) -- and how
fields are checked: Literal choices and the field's rule, by `validate_section`, which each section's
``__post_init__`` calls (a ValueError naming the field and the value).

Metadata pieces combine with ``|``: ``field(default=1, metadata=POSITIVE | doc("Passes over the training
set."))``."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, Literal


def doc(text: str) -> dict[str, Any]:
    """A field's documentation, as dataclass field metadata: one text per field, read by `field_doc` (for the
    flag's ``--help``). Line breaks and indentation of a triple-quoted text collapse to single spaces."""
    return {"doc": " ".join(text.split())}


def field_doc(f: dataclasses.Field[Any]) -> str:
    """The documentation a field carries (`doc`); a KeyError names a field written without one."""
    try:
        return f.metadata["doc"]
    except KeyError:
        raise KeyError(f"config field {f.name!r} has no doc(...) in its metadata") from None


def rule(check: Callable[[Any], bool], message: str) -> dict[str, Any]:
    """A field's check, as dataclass field metadata: ``x: int = field(default=1, metadata=rule(...) | doc(...))``
    keeps the rule beside the field it checks. `message` completes "<field> ...": e.g. "must be > 0"."""
    return {"rule": (check, message)}


def bare_flag(value: str) -> dict[str, Any]:
    """Field metadata: the flag may be given without a value (``--cache-images`` alone), meaning `value`;
    ``--cache-images DIR`` gives DIR."""
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
