"""Typed configuration: dataclasses, overridable from the environment and the command line.

Precedence: command line > environment (MLSA4REC_<FIELD>) > the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing


def _parse(kind, text: str):
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    return kind(text)


def _field_type(cls, field: dataclasses.Field):
    kind = typing.get_type_hints(cls)[field.name]
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def add_arguments(parser: argparse.ArgumentParser, cls, prefix: str = "") -> None:
    for field in dataclasses.fields(cls):
        kind = _field_type(cls, field)
        parser.add_argument(f"--{prefix}{field.name.replace('_', '-')}", dest=f"{prefix}{field.name}",
                            type=lambda text, k=kind: _parse(k, text), default=None,
                            help=f"{kind.__name__}, env MLSA4REC_{field.name.upper()}")


def build(cls, args: argparse.Namespace | None = None, prefix: str = "", **overrides):
    values = {}
    for field in dataclasses.fields(cls):
        env = os.environ.get(f"MLSA4REC_{(prefix + field.name).upper()}")
        if env is not None:
            values[field.name] = _parse(_field_type(cls, field), env)
        given = getattr(args, prefix + field.name, None) if args is not None else None
        if given is not None:
            values[field.name] = given
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)
