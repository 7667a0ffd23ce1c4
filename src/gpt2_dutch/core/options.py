"""Typed dataclass configs that double as command-line parsers and as config files.

Each stage declares one dataclass whose fields carry a help string (`option(default, "help")`) and checks
its own values in `__post_init__`. `add_arguments` turns such a dataclass into argparse options
(`dataset_size` -> `--dataset-size`), so the CLI, the Python API and the tests share one definition.

A config file (`--config FILE`, JSON or YAML) holds the same settings under the field names
(`dataset_size: 10k`); a value is taken from, in order of precedence, the command line, the file, the
field's default. Keys that are not settings are refused, with one exception: a file that declares itself a
run's record (its `"format"` is the dataclass's `RECORD_FORMAT`, as in train's run_config.json) also holds
what the run recorded about itself (status, total_steps, ...), which is ignored, and the settings in the
dataclass's `NOT_REPLAYED` (train's `resume`), which a replay must not take: it is a new run.

The file is read through gpt2_dutch.core.reading: a regular file within CONFIG_BYTES, bounded in depth, number
length and YAML alias expansion; a wrong value is one line naming the file, the key's line and the key, the value
cut short.

One name per idea: an old spelling of a flag stays accepted for one release as `option(aliases=[...])`,
hidden from --help and announced on stderr when used (in a config file too, as its key `old_name`).

This module is imported to build every parser, so it (and every config dataclass) imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from gpt2_dutch.core.errors import UsageError
from gpt2_dutch.core.reading import json_type, line_of, read_config, short

REMOVAL = "it will be removed in the next release"


def parse_duration(text: str, flag: str = "--max-time") -> float:
    """'90s', '30m', '2h', '300' (seconds) -> seconds; one line naming `flag` for anything else. The one parser
    of a wall-clock budget (train's and bench's --max-time)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|)\s*", text)
    if m is None or float(m.group(1)) <= 0:
        raise UsageError(f"{flag} {short(text)} is not a positive duration like 90s, 30m or 2h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def option(default: Any = None, help: str = "", *, aliases: typing.Sequence[str] = (), deprecated: str = "",
           **argparse_kwargs: Any) -> Any:
    """A dataclass field with a help string and optional extra argparse settings (choices, nargs, ...).

    `positional=True` makes it an optional positional argument instead of a --flag. `aliases`: old spellings
    of the flag (`["--dtype"]`), accepted but hidden and announced as deprecated. `deprecated="--report-to
    wandb"`: the whole flag is an old way of saying that, hidden and announced the same way.
    """
    metadata = {"help": help, "aliases": tuple(aliases), "deprecated": deprecated, **argparse_kwargs}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _field_default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def flag_name(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def renamed_notice(prog: str, old: str, new: str) -> None:
    print(f"{prog}: note: {old} is deprecated, use {new} ({REMOVAL})", file=sys.stderr)


def _announcing(action_cls: type[argparse.Action], new: str) -> type[argparse.Action]:
    """`action_cls`, printing a deprecation notice each time one of its (old) option strings is used."""

    class Deprecated(action_cls):  # type: ignore[valid-type, misc]
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: str | None = None) -> None:
            negated = bool(option_string and option_string.startswith("--no-") and new.startswith("--"))
            renamed_notice(parser.prog, option_string or "", "--no-" + new[2:] if negated else new)
            super().__call__(parser, namespace, values, option_string)

    return Deprecated


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one `--flag` per dataclass field of `cls` to `parser`.

    Flags left out are absent from the parsed namespace (default SUPPRESS), so `from_namespace` can tell them
    from flags given with the default's value and let a config file fill them.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = dict(f.metadata)
        aliases, deprecated = meta.pop("aliases", ()), meta.pop("deprecated", "")
        default = _field_default(f)
        if meta.pop("positional", False):  # `gpt2-dutch bench train`: an optional positional argument
            flags: list[str] = [f.name]
            # a positional's default is parsed and checked against its choices, so it cannot be SUPPRESS;
            # None stands for "not given"
            kwargs: dict[str, Any] = {"help": meta.pop("help", ""), "nargs": "?", "default": None}
        else:
            flags = [flag_name(f.name)]
            kwargs = {"help": meta.pop("help", ""), "dest": f.name, "default": argparse.SUPPRESS}
        kwargs.update(meta)
        tp = _unwrap_optional(hints[f.name])
        if tp is bool:
            kwargs.setdefault("action", argparse.BooleanOptionalAction if default else "store_true")
        elif typing.get_origin(tp) is list:
            kwargs.setdefault("action", "append")
            kwargs.setdefault("type", typing.get_args(tp)[0])
        elif "action" not in kwargs:
            kwargs.setdefault("type", tp)
        if default not in (None, [], False) and kwargs.get("help"):
            kwargs["help"] += f" (default: {default})"
        if deprecated:
            kwargs["help"] = argparse.SUPPRESS
        action = parser.add_argument(*flags, **kwargs)
        if deprecated:
            action.__class__ = _announcing(type(action), deprecated)
        if aliases:
            parser.add_argument(*aliases, **{**kwargs, "help": argparse.SUPPRESS,
                                             "action": _announcing(type(action), flags[0])})


def from_namespace(cls: type, namespace: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """Build the dataclass `cls` from parsed arguments: a flag given wins over `base` (a config file's
    values, from `config_values`), which wins over the field's default."""
    values = dict(base or {})
    given = vars(namespace)
    for f in dataclasses.fields(cls):
        if f.init and f.name in given and not (f.metadata.get("positional") and given[f.name] is None):
            values[f.name] = given[f.name]
    return cls(**values)


# ------------------------------------------------------------------------------------------- config files

class ConfigFile(dict):
    """A config file's mapping of settings, with the file's text (to name the line of a wrong value)."""

    text = ""


def read_config_file(path: str | Path, where: str | None = None) -> dict[str, Any]:
    """The mapping in a JSON (`.json`) or YAML (anything else; JSON is YAML too) file; one-line UsageError
    for a file that is missing, not a regular file, too large, unreadable, not JSON/YAML, beyond the bounds of
    gpt2_dutch.core.reading, or not a mapping. `where` names it in errors (default: `--config PATH`)."""
    where = where or f"--config {path}"
    if Path(path).is_dir():
        raise UsageError(f"{where} is a directory; give a .json or .yaml file")
    data, text = read_config(path, where)
    if data is None:  # an empty file (or only comments): no settings
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{where} must hold a mapping of settings (key: value), not a {_json_type(data)}")
    settings = ConfigFile(data)
    settings.text = text
    return settings


def _key_where(data: dict[str, Any], where: str, key: str) -> str:
    """`--config F line N: key`, the line where the file has one to give."""
    text = getattr(data, "text", "")
    line = line_of(text, (key,)) if text else None
    return f"{where}{f' line {line}' if line else ''}: {key}"


def config_values(cls: type, data: dict[str, Any], where: str, prog: str = "gpt2-dutch") -> dict[str, Any]:
    """The settings of `cls` in a config file's mapping, under their field names, each checked against its
    field's type (a string that the command line would accept, like YAML's `6e-4`, is converted)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    record_format = getattr(cls, "RECORD_FORMAT", None)
    declared = data.get("format")
    if declared is not None and declared != record_format:
        raise UsageError(f"{where} is a {short(declared)} file, not settings of this command")
    record = declared is not None  # a run's record: replayed as a new run with the same settings
    old_keys = {alias.lstrip("-").replace("-", "_"): name for name, f in fields.items()
                for alias in f.metadata.get("aliases", ())}
    values: dict[str, Any] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if key == "format":
            continue
        name = old_keys.get(key, key)
        f = fields.get(name)
        if f is None:
            if not record:
                unknown.append(str(key))
            continue
        if not f.init:
            continue  # derived from the other settings: a saved config holds it, the dataclass recomputes it
        if record and name in getattr(cls, "NOT_REPLAYED", ()):
            if value not in (None, _field_default(f)):
                print(f"{prog}: note: {where}: {key} {short(value)} is not replayed: this starts a new run with the "
                      "same settings", file=sys.stderr)
            continue
        if name != key:
            renamed_notice(prog, f"{where}: key {key!r}", repr(name))
        if f.metadata.get("deprecated") and value != _field_default(f):
            renamed_notice(prog, f"{where}: key {key!r}", f.metadata["deprecated"])
        values[name] = _file_value(value, hints[name], f, _key_where(data, where, str(key)))
    if unknown:
        hints_ = [short(k) + (f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(
            k.replace("-", "_"), [n for n, f in fields.items() if f.init], n=1)) else "") for k in unknown[:5]]
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""  # the one line stays short
        raise UsageError(f"{where}: unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(hints_)}{more}; keys "
                         "are the flags' names with underscores (--dataset-path: dataset_path)")
    return values


def load_config(cls: type, path: str | Path, **overrides: Any) -> Any:
    """`cls` from a config file, with `overrides` (field=value) on top: the Python form of `--config`."""
    return cls(**{**config_values(cls, read_config_file(path), f"--config {path}"), **overrides})


_json_type = json_type


def _file_value(value: Any, hint: Any, f: dataclasses.Field, where: str) -> Any:
    tp = _unwrap_optional(hint)
    if value is None:
        if tp is not hint or _field_default(f) is None:
            return None
        raise UsageError(f"{where} must not be null")
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise UsageError(f"{where} must be a list (got the {_json_type(value)} {short(value)})")
        return [_scalar(v, typing.get_args(tp)[0], f, where) for v in value]
    return _scalar(value, tp, f, where)


def _scalar(value: Any, tp: Any, f: dataclasses.Field, where: str) -> Any:
    kind = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(tp, str(tp))
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp in (int, float) and isinstance(value, str):  # as the command line reads it: YAML gives 6e-4 as text
        try:
            value = tp(value)
            ok = True
        except ValueError:
            ok = False
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, tp)
    if not ok:
        raise UsageError(f"{where} must be {kind} (got the {_json_type(value)} {short(value)})")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise UsageError(f"{where} must be one of {', '.join(map(str, choices))} (got {short(value)})")
    return value
