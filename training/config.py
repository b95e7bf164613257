"""Dataclass configs from argv: one ``--field value`` flag per field, nested dataclasses as ``--corpus.seed``.

A JSON file (``--config file.json``) may set any field; unknown keys are rejected with the key named.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _leaf_fields(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            yield from _leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, kind, f


def _parser_type(kind: Any):
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if args else kind
    if base is bool:
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if typing.get_origin(kind) in (list, tuple):
        return typing.get_args(kind)[0]
    return base


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    for name, kind, f in _leaf_fields(cls):
        nargs = "+" if typing.get_origin(kind) in (list, tuple) else None
        parser.add_argument(f"--{name}", dest=name, type=_parser_type(kind), nargs=nargs,
                            default=argparse.SUPPRESS, help=f.metadata.get("help", ""))
    parser.add_argument("--config", dest="__config_file", default=None, help="JSON file with config values")


def _apply(cls: type[T], values: dict, where: str) -> T:
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key {where}{key!r}; known keys: {', '.join(sorted(known))}")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{key!r} must be a mapping")
            value = _apply(hints[key], value, f"{where}{key}.")
        elif typing.get_origin(hints[key]) is tuple:
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_args(cls: type[T], namespace: argparse.Namespace) -> T:
    values: dict = {}
    path = getattr(namespace, "__config_file", None)
    if path:
        with open(path) as fh:
            values = json.load(fh)
    for dotted, value in vars(namespace).items():
        if dotted == "__config_file" or "." not in dotted and dotted not in {f.name for f in dataclasses.fields(cls)}:
            continue
        node = values
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return _apply(cls, values, "")
