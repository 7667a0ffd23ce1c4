"""Typed dataclass configs that double as command-line parsers.

Each stage declares one dataclass whose fields carry a help string (`option(default, "help")`) and checks
its own values in `__post_init__`. `add_arguments` turns such a dataclass into argparse options
(`dataset_size` -> `--dataset-size`), so the CLI, the Python API and the tests share one definition.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def option(default: Any = None, help: str = "", **argparse_kwargs: Any) -> Any:
    """A dataclass field with a help string and optional extra argparse settings (choices, nargs, ...);
    `positional=True` makes it an optional positional argument instead of a --flag."""
    metadata = {"help": help, **argparse_kwargs}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--flag` per dataclass field of `cls` to `parser`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = dict(f.metadata)
        if meta.pop("positional", False):  # `gpt2-dutch bench train`: an optional positional argument
            flags: list[str] = [f.name]
            kwargs: dict[str, Any] = {"help": meta.pop("help", ""), "nargs": "?"}
        else:
            flags = [f"--{f.name.replace('_', '-')}", *meta.pop("aliases", [])]
            kwargs = {"help": meta.pop("help", ""), "dest": f.name}
        kwargs.update(meta)
        tp = _unwrap_optional(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if tp is bool:
            kwargs.setdefault("action", argparse.BooleanOptionalAction if default else "store_true")
        elif typing.get_origin(tp) is list:
            kwargs.setdefault("action", "append")
            kwargs.setdefault("type", typing.get_args(tp)[0])
            default = None  # argparse appends to the default list otherwise
        elif "action" not in kwargs:
            kwargs.setdefault("type", tp)
        if default not in (None, [], False) and kwargs.get("help"):
            kwargs["help"] += f" (default: {default})"
        kwargs["default"] = default
        parser.add_argument(*flags, **kwargs)


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """Build the dataclass `cls` from parsed arguments (list options left unset become [])."""
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(namespace, f.name)
        if value is None and f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        values[f.name] = value
    return cls(**values)
