"""Typed configuration: dataclasses, overridable from the environment and the command line.

Precedence: command line > environment (MLSA4REC_<FIELD>) > the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing


class ConfigError(ValueError):
    """A setting that does not exist or a value that does not parse."""


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


def parse_fields(cls, texts: dict[str, str]) -> dict:
    """{field name: text} -> {field name: value of the field's type}; a clear ValueError
    for a name cls does not have or a value that does not parse."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out = {}
    for name, text in texts.items():
        if name not in fields:
            raise ConfigError(f"{name!r} is not a setting of {cls.__name__}; "
                             f"known: {', '.join(sorted(fields))}")
        out[name] = _parse_setting(_field_type(cls, fields[name]), text, name)
    return out


def _parse_setting(kind, text: str, label: str):
    try:
        return _parse(kind, text)
    except ValueError:
        raise ConfigError(f"{label}={text!r} is not a valid {kind.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    for field in dataclasses.fields(cls):
        kind = _field_type(cls, field)
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name,
                            type=lambda text, k=kind: _parse(k, text), default=None,
                            help=f"{kind.__name__}, env MLSA4REC_{field.name.upper()}")


def build(cls, args: argparse.Namespace | None = None, **overrides):
    values = {}
    for field in dataclasses.fields(cls):
        env_name = f"MLSA4REC_{field.name.upper()}"
        if env_name in os.environ:
            values[field.name] = _parse_setting(_field_type(cls, field), os.environ[env_name],
                                                env_name)
        given = getattr(args, field.name, None) if args is not None else None
        if given is not None:
            values[field.name] = given
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)
