"""Reading settings into a `Config`: defaults < TOML file < command-line flags; one flag per field, its
``--help`` the documentation the field carries (`dtl.config.rules.doc`)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any

from dtl.config import SECTIONS, Config
from dtl.config.rules import choices_of, field_doc
from dtl.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


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


def _base_type(hint: Any) -> type:
    """int | None -> int; Literal[...] -> str."""
    if choices_of(hint):
        return str
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (`finetune_last_n` -> `--finetune-last-n`), grouped by section in --help;
    defaults stay None so we can tell which flags were actually given and let them win over a TOML file."""
    parser.add_argument("--config", metavar="TOML", help="Read settings from a TOML file; flags win over it.")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, (cls.__doc__ or "").strip())
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            flag = "--" + f.name.replace("_", "-")
            base = _base_type(hint)
            help_text = f"{field_doc(f)} (default: {f.default})"
            if base is bool:
                group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            elif typing.get_origin(hint) is tuple:  # tuple[float, float] -> --crop-scale MIN MAX
                kinds = typing.get_args(hint)
                group.add_argument(flag, type=kinds[0], nargs=len(kinds), default=None,
                                   metavar=("MIN", "MAX") if len(kinds) == 2 else None, help=help_text)
            elif "bare" in f.metadata:  # --cache-images alone, or --cache-images DIR
                group.add_argument(flag, type=base, nargs="?", const=f.metadata["bare"], default=None,
                                   metavar=f.name.upper(), help=help_text)
            else:
                group.add_argument(flag, type=base, default=None, choices=choices_of(hint) or None,
                                   metavar=None if choices_of(hint) else f.name.upper(), help=help_text)


def config_from_flags(flags: list[str]) -> Config:
    """A Config from train.py's flags (e.g. ``["--model", "resnet18", "--epochs", "2"]``), as `dtl train` reads
    them."""
    parser = argparse.ArgumentParser(prog="dtl train")
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(flags))
