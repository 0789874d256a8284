"""Typed configuration: dataclasses, overridable from the environment and the command line.

Precedence: command line > environment (MLSA4REC_<FIELD>) > the dataclass default.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import re
import tokenize
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


def field_help(cls) -> dict[str, str]:
    """Each field's description: the comment on its line in the class's source, else the
    comment lines right above it. The comments readers of the code see are the CLI's help, so
    the two cannot drift apart (tests/test_config_help.py checks every option has one)."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}          # line number -> comment text
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    out, above = {}, []
    for number, line in enumerate(source.splitlines(), start=1):
        if line.strip().startswith("#"):
            above.append(comments.get(number, ""))
            continue
        match = re.match(r"^    (\w+)\s*:", line)
        if match and not line.strip().startswith(("def ", "@")):
            out[match.group(1)] = comments.get(number) or " ".join(above)
        above = []
    return out


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    descriptions = field_help(cls)
    for field in dataclasses.fields(cls):
        kind = _field_type(cls, field)
        text = descriptions.get(field.name, "")
        help_text = (f"{text} " if text else "") + (
            f"({kind.__name__}, default {_shown(field.default)}; "
            f"env MLSA4REC_{field.name.upper()})")
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name,
                            type=_converter(kind), default=None,
                            metavar=kind.__name__.upper(), help=help_text.replace("%", "%%"))


def _shown(default) -> str:
    """A default as one types it: strings quoted, booleans as true/false."""
    if isinstance(default, str):
        return repr(default)
    return str(default).lower() if isinstance(default, bool) else str(default)


def _converter(kind):
    def convert(text: str):
        return _parse(kind, text)
    convert.__name__ = kind.__name__      # argparse: "invalid int value: 'ten'"
    return convert


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
