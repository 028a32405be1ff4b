"""Command-line options from config dataclasses (TRL style: help on every field).

Each field becomes `--field-name`, typed from its default, with its metadata help. A
field whose value is itself a dataclass contributes that dataclass's fields. The
environment variable INSTRUCTLOOP_<FIELD_NAME> overrides the default. A field whose
metadata says `secret` (a token, a URL that may carry a password) never shows its value
in --help, only where it came from.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, TypeVar

T = TypeVar("T")


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one option per field of cls (recursing into dataclass-valued fields)."""
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip())
    for f in dataclasses.fields(cls):
        default = _field_default(f)
        if dataclasses.is_dataclass(default):
            add_dataclass_arguments(parser, type(default))
            continue
        env_name = f"INSTRUCTLOOP_{f.name.upper()}"
        env = os.environ.get(env_name)
        kind = _bool if isinstance(default, bool) else type(default)
        if env is not None:
            default = kind(env)
        shown = "%(default)s"
        if f.metadata.get("secret"):
            shown = f"${env_name}, set" if env is not None else ("set" if default else "none")
        if kind is _bool:
            group.add_argument(
                f"--{f.name.replace('_', '-')}",
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{f.metadata.get('help', '')} (default: %(default)s)",
            )
            continue
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            type=kind,
            default=default,
            metavar=f.name.upper(),
            help=f"{f.metadata.get('help', '')} (default: {shown})",
        )


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build cls (and its nested dataclasses) from parsed options."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        default = _field_default(f)
        if dataclasses.is_dataclass(default):
            values[f.name] = dataclass_from_args(type(default), args)
        else:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    raise TypeError(f"config field {f.name} needs a default")
