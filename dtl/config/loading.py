"""Reading settings into a `Config`: defaults < TOML file < command-line flags, and the field docstrings that
double as `--help` text (parsed from dtl/config.py, so the two never drift apart)."""

from __future__ import annotations

import argparse
import ast
import functools
import inspect
import sys
from pathlib import Path
from typing import Any

from dtl.config import SECTIONS, Config
from dtl.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@functools.cache
def field_docs() -> dict[str, str]:
    """Field name -> the docstring written under it (parsed from this file, so help text has one source)."""
    docs: dict[str, str] = {}
    for cls in SECTIONS.values():
        body = ast.parse(inspect.getsource(cls)).body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
    return docs


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults < TOML (--config) < flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_toml(Path(args.config)))
    for name in Config.field_names():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    try:
        return Config.from_dict(values)
    except (TypeError, ValueError) as err:
        raise UserError(f"invalid configuration: {err}") from None


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML config as flat settings: keys may use dashes or underscores, may sit under a [train]
    table, or in section tables ([optim], [data], ...)."""
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    flat: dict[str, Any] = {}
    for key, value in data.get("train", data).items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
