"""The one way to read the JSON, YAML and JSON Lines files we are handed: bounded, and wrong in one line.

`--config` files, manifest.json, run_config.json, metrics.jsonl and a model's config.json are read here. Every
reader:

- opens regular files only: a FIFO, a device (`/dev/zero`) or a socket is refused before a byte is read;
- reads at most `max_bytes` (one more byte tells a file that is too large), and a JSON Lines file at most
  `max_line_bytes` per line;
- bounds what it parses: nesting deeper than `MAX_DEPTH`, a number literal longer than `MAX_NUMBER_CHARS`,
  and a YAML document whose aliases expand to more than `MAX_YAML_NODES` nodes (an anchor bomb) are refused;
- raises `BadFile` (a `UsageError`: one line, exit 2) naming the file, the line where it knows it, and the
  field, with any value it echoes cut to `SHOWN_CHARS`.

`check_types(obj, schema, where)` checks a parsed mapping against a small schema (required keys and their
types; `Opt(type)` for a key that may be absent or null) with the same kind of one line.

Imports nothing heavy (yaml only when a YAML file is read): the CLI's parsers use it.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gpt2_dutch.core.errors import UsageError

MAX_DEPTH = 100  # nesting of lists and mappings; our files use at most 4
MAX_NUMBER_CHARS = 100  # characters of one number literal (a float's repr is at most 24)
MAX_YAML_NODES = 100_000  # nodes of a YAML document once its aliases are expanded
SHOWN_CHARS = 80  # of a value echoed in an error
CONFIG_BYTES = 4 * 2**20  # a --config file, run_config.json, manifest.json, a model's config.json
METRICS_BYTES = 2**30  # metrics.jsonl: a long run logging every step stays well below
LINE_BYTES = 2**20  # one line of a JSON Lines file


class BadFile(UsageError):
    """A file that cannot be read as what it should be: one line naming it (exit status 2)."""


class Opt:
    """In a `check_types` schema: a key that may be absent or null, else of type `tp`."""

    def __init__(self, tp: Any):
        self.tp = tp


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, SHOWN_CHARS, SHOWN_CHARS
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6


def short(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` for an error line: bounded however large or deep `value` is, cut to `limit` characters."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def json_type(value: Any) -> str:
    """The JSON name of a value's type, as errors say it ("the string 'x'")."""
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "mapping",
            type(None): "null"}.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------ bytes

def file_kind(mode: int) -> str:
    """What a non-regular file is, in words, from its st_mode."""
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "not a regular file")


def _not_found(what: str, advice: str) -> BadFile:
    return BadFile(f"{what} not found" + (f"; {advice}" if advice else ""))


def open_regular(path: str | Path, what: str, advice: str = "") -> Any:
    """A binary file object on `path`, refused in one line unless it is a regular file.

    Checked before opening (a device or FIFO is never opened) and again on the open descriptor (the path
    may have been swapped meanwhile; O_NONBLOCK keeps opening a FIFO from waiting for a writer)."""
    tail = f"; {advice}" if advice else ""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise BadFile(f"{what} is {file_kind(mode)}, not a regular file{tail}")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise _not_found(what, advice) from None
    except OSError as e:
        raise BadFile(f"{what} cannot be read ({e.strerror}){tail}") from None
    except ValueError as e:  # a NUL byte in the name
        raise BadFile(f"{what} cannot be read ({e}){tail}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise BadFile(f"{what} is {file_kind(mode)}, not a regular file{tail}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_bytes(path: str | Path, what: str, max_bytes: int, advice: str = "") -> bytes:
    """The bytes of the regular file `path` (at most `max_bytes` of them, else one line)."""
    with open_regular(path, what, advice) as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise BadFile(f"{what} cannot be read ({e.strerror})") from None
    if len(data) > max_bytes:
        raise BadFile(f"{what} is larger than {_size(max_bytes)}, too large for this kind of file"
                      + (f"; {advice}" if advice else ""))
    return data


def _size(n: int) -> str:
    return f"{n // 2**30} GiB" if n >= 2**30 and n % 2**30 == 0 else f"{n // 2**20} MiB" if n % 2**20 == 0 \
        else f"{n} bytes"


def decode(data: bytes, what: str, advice: str = "") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadFile(f"{what} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
                      + (f"; {advice}" if advice else "")) from None


def read_text(path: str | Path, what: str, max_bytes: int = CONFIG_BYTES, advice: str = "") -> str:
    return decode(read_bytes(path, what, max_bytes, advice), what, advice)


# ------------------------------------------------------------------------------------------------- JSON

class _LongNumber(ValueError):
    def __init__(self, literal: str):
        super().__init__(literal)
        self.literal = literal


def _number(convert: Any) -> Any:
    def parse(literal: str) -> Any:
        if len(literal) > MAX_NUMBER_CHARS:
            raise _LongNumber(literal)
        return convert(literal)

    return parse


_parse_int, _parse_float = _number(int), _number(float)
_BRACKETS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _line_at(text: str, index: int) -> int:
    return text.count("\n", 0, max(0, index)) + 1


def _too_deep_line(text: str) -> int | None:
    """The line where the JSON `text` first nests deeper than MAX_DEPTH, or None."""
    depth = 0
    for m in _BRACKETS.finditer(text):
        token = m.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return _line_at(text, m.start())
        elif token in "]}":
            depth -= 1
    return None


def nests_deeper_than(value: Any, max_depth: int = MAX_DEPTH) -> bool:
    """Whether `value` nests lists and mappings deeper than `max_depth` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        v, depth = stack.pop()
        if depth > max_depth:
            return True
        stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v) if isinstance(c, (dict, list)))
    return False


_ESCAPE = re.compile(r"\\[uU]")


def _lone_surrogate(value: Any) -> str | None:
    """A string (or key) in `value` that is not text (a lone surrogate from an escape like \\ud800), or None."""
    stack = [value]
    while stack:
        v = stack.pop()
        items = [*v.keys(), *v.values()] if isinstance(v, dict) else v if isinstance(v, list) else [v]
        for item in items:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return item
            elif isinstance(item, (dict, list)):
                stack.append(item)
    return None


def _check_text(value: Any, text: str, what: str, tail: str, shift: int = 0) -> None:
    if _ESCAPE.search(text) is None:  # no escape, no surrogate: the text itself decoded as UTF-8
        return
    bad = _lone_surrogate(value)
    if bad is not None:
        lone = next(c for c in bad if 0xD800 <= ord(c) <= 0xDFFF)
        m = re.search(re.escape(f"\\u{ord(lone):04x}"), text, re.I)
        raise _limit(what, m and _line_at(text, m.start()) + shift, f"the string {short(bad)} holds a lone surrogate "
                     "escape, which is not text", tail)


def _limit(what: str, line: int | None, problem: str, tail: str) -> BadFile:
    return BadFile(f"{what}{f' line {line}' if line else ''}: {problem}{tail}")


class BeyondBounds(ValueError):
    """A JSON text that `loads` refuses before or while parsing it: `problem` says how, `line` where (1-based in
    the text, or None)."""

    def __init__(self, problem: str, line: int | None):
        super().__init__(problem)
        self.problem, self.line = problem, line


def loads(text: str) -> Any:
    """`json.loads(text)`, bounded: a number literal longer than MAX_NUMBER_CHARS or nesting deeper than MAX_DEPTH
    raises `BeyondBounds`; a syntax error is json.JSONDecodeError. For readers with their own wording (the data
    files' `path:line:` errors); files we are handed whole go through `parse_json`."""
    try:
        value = json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
        too_deep = nests_deeper_than(value)
    except _LongNumber as e:
        raise BeyondBounds(f"a number of {len(e.literal)} characters; at most {MAX_NUMBER_CHARS} are read",
                           _line_at(text, text.find(e.literal))) from None
    except RecursionError:  # the decoder recurses once per level: deeper than the interpreter allows
        too_deep = True
    if too_deep:
        raise BeyondBounds(f"lists or mappings nested deeper than {MAX_DEPTH} levels", _too_deep_line(text))
    return value


def parse_json(text: str, what: str, advice: str = "", first_line: int = 1) -> Any:
    """The value of the JSON document `text` (of the file `what`, where it starts on `first_line`), bounded in
    depth and in number length."""
    tail, shift = (f"; {advice}" if advice else ""), first_line - 1
    try:
        value = loads(text)
    except json.JSONDecodeError as e:
        raise BadFile(f"{what} is not valid JSON (line {e.lineno + shift}, column {e.colno}: {e.msg}){tail}") from None
    except BeyondBounds as e:
        raise _limit(what, e.line and e.line + shift, e.problem, tail) from None
    _check_text(value, text, what, tail, shift)
    return value


def read_json(path: str | Path, what: str | None = None, *, max_bytes: int = CONFIG_BYTES,
              schema: dict[str, Any] | None = None, advice: str = "") -> Any:
    """The JSON value in the regular file `path`; checked against `schema` (see `check_types`) when given.
    `what` names the file in errors (default: its path); `advice` ends them ("preprocess the data again")."""
    what = what or str(path)
    text = read_text(path, what, max_bytes, advice)
    value = parse_json(text, what, advice)
    if schema is not None:
        check_types(value, schema, what, text=text, advice=advice)
    return value


def read_json_or_none(path: str | Path, *, max_bytes: int = CONFIG_BYTES, schema: dict[str, Any] | None = None
                      ) -> Any:
    """As `read_json`, but None where the file is missing, not a regular file, too large or damaged: for readers
    that state less rather than fail."""
    try:
        return read_json(path, max_bytes=max_bytes, schema=schema)
    except UsageError:
        return None


# ------------------------------------------------------------------------------------------ JSON Lines

def iter_jsonl(path: str | Path, what: str | None = None, *, max_bytes: int = METRICS_BYTES,
               max_line_bytes: int = LINE_BYTES, schema: dict[str, Any] | None = None
               ) -> Iterator[tuple[int, bytes, Any]]:
    """(line number, the line's bytes, its value) for each non-blank line of a JSON Lines file.

    The value is a `BadFile` (not raised) for a line that does not parse or is longer than `max_line_bytes`, so
    a caller decides: a line cut short by a kill is skipped, a wrong one refused. A line that parses but does
    not match `schema` raises. A missing file yields nothing; not a regular file, or more than `max_bytes` in
    all, raises."""
    what = what or str(path)
    try:
        f = open_regular(path, what)
    except BadFile:
        if not os.path.lexists(path):
            return
        raise
    total = 0
    with f:
        for number, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), start=1):
            total += len(raw)
            if total > max_bytes:
                raise BadFile(f"{what} is larger than {_size(max_bytes)}, too large for this kind of file")
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                for rest in iter(lambda: f.readline(max_line_bytes), b""):  # the remainder of the long line
                    total += len(rest)
                    if rest.endswith(b"\n"):
                        break
                yield number, raw, BadFile(f"{what} line {number} is longer than {_size(max_line_bytes)}")
                continue
            if not raw.strip():
                continue
            try:
                value: Any = parse_json(decode(raw, f"{what} line {number}"), what, first_line=number)
            except BadFile as e:
                value = e
            else:
                if schema is not None:
                    check_types(value, schema, f"{what} line {number}")
            yield number, raw, value


# ------------------------------------------------------------------------------------------------- YAML

def _check_yaml(root: Any, what: str, tail: str) -> None:
    """Refuse a composed YAML document that nests deeper than MAX_DEPTH, expands (through its aliases) to more
    than MAX_YAML_NODES nodes, refers to itself, or holds a number literal longer than MAX_NUMBER_CHARS."""
    import yaml

    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: Any, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        line = node.start_mark.line + 1
        if depth > MAX_DEPTH:
            raise _limit(what, line, f"lists or mappings nested deeper than {MAX_DEPTH} levels", tail)
        if key in open_:
            raise _limit(what, line, "an alias refers to the node that holds it", tail)
        if isinstance(node, yaml.ScalarNode):
            if node.tag.endswith((":int", ":float")) and len(node.value) > MAX_NUMBER_CHARS:
                raise _limit(what, line, f"a number of {len(node.value)} characters; at most {MAX_NUMBER_CHARS} "
                             "are read", tail)
            n = 1
        else:
            open_.add(key)
            children = [c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode) \
                else node.value
            n = 1
            for child in children:
                n += size(child, depth + 1)
                if n > MAX_YAML_NODES:
                    raise _limit(what, line, f"more than {MAX_YAML_NODES:,} values once its aliases are expanded",
                                 tail)
            open_.discard(key)
        sizes[key] = n
        return n

    size(root, 1)


def parse_yaml(text: str, what: str, advice: str = "") -> Any:
    """The value of the YAML document `text` (safe tags only), bounded in depth, expansion and number length."""
    import yaml  # only when a YAML file is read

    tail = f"; {advice}" if advice else ""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()  # what yaml.safe_load does, with a look at the nodes in between
        except RecursionError:  # the composer recurses once per level
            raise _limit(what, None, f"lists or mappings nested deeper than {MAX_DEPTH} levels", tail) from None
        if node is None:
            return None
        _check_yaml(node, what, tail)
        value = loader.construct_document(node)
        _check_text(value, text, what, tail)
        return value
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise BadFile(f"{what} is not valid YAML ({at}{problem}){tail}") from None
    except ValueError as e:  # a scalar its tag cannot hold, such as the date 2026-13-45
        raise BadFile(f"{what} is not valid YAML ({str(e)[:SHOWN_CHARS]}){tail}") from None
    finally:
        loader.dispose()


def yaml_key_lines(text: str) -> dict[str, int]:
    """The line of each top-level key of a YAML (or JSON) mapping document, for errors about a key's value;
    {} where the document is not a mapping or does not parse."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except (yaml.YAMLError, RecursionError):
        return {}
    finally:
        loader.dispose()
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def read_config(path: str | Path, what: str, max_bytes: int = CONFIG_BYTES) -> tuple[Any, str]:
    """(value, text) of a JSON (`.json`) or YAML (anything else; JSON is YAML too) file."""
    text = read_text(path, what, max_bytes)
    if Path(path).suffix.lower() == ".json":
        return parse_json(text, what), text
    return parse_yaml(text, what), text


# ------------------------------------------------------------------------------------------------ types

_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", list: "a list",
          dict: "a mapping"}


def _is(value: Any, tp: Any) -> bool:
    if isinstance(tp, tuple):
        return any(_is(value, t) for t in tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _kind(tp: Any) -> str:
    if isinstance(tp, tuple):
        return " or ".join(_kind(t) for t in tp)
    return _KINDS.get(tp, getattr(tp, "__name__", str(tp)))


def line_of(text: str, keys: tuple[str, ...]) -> int | None:
    """The line of the key path `keys` in a JSON or YAML document's `text`, found by reading the keys in order
    (good for the files we write, one key per line); None where it is not found."""
    pos = 0
    for key in keys:
        m = re.compile(r"""(?:^|[{,\s])["']?""" + re.escape(key) + r"""["']?\s*:""", re.M).search(text, pos)
        if m is None:
            return None
        pos = m.end()
    return _line_at(text, pos) if keys else None


def check_types(obj: Any, schema: dict[str, Any], where: str, *, text: str | None = None, advice: str = "",
                _path: tuple[str, ...] = ()) -> None:
    """Check that the mapping `obj` holds every key of `schema` with a value of its type, else one line naming
    `where` (the file), the line (found in `text` when given) and the field.

    A schema maps a key to a type (`int` is never a boolean; `float` takes whole numbers too), a tuple of types,
    a nested schema (a mapping), or `Opt(...)` of one of those (the key may be absent or null). Keys the schema
    does not name are left alone."""
    tail = f"; {advice}" if advice else ""

    def at(path: tuple[str, ...]) -> str:
        line = line_of(text, path) if text is not None and path else None
        return f"{where}{f' line {line}' if line else ''}: {'.'.join(path)}"

    if not isinstance(obj, dict):
        raise BadFile((at(_path) if _path else where) + f" must be a mapping (got the {json_type(obj)} "
                      f"{short(obj)}){tail}")
    for key, spec in schema.items():
        path = (*_path, key)
        optional = isinstance(spec, Opt)
        spec = spec.tp if optional else spec
        value = obj.get(key)
        if value is None:
            if optional:
                continue
            if key not in obj:
                raise BadFile(f"{where} lacks '{'.'.join(path)}'{tail}")
            raise BadFile(f"{at(path)} must not be null{tail}")
        if isinstance(spec, dict):
            check_types(value, spec, where, text=text, advice=advice, _path=path)
        elif not _is(value, spec):
            raise BadFile(f"{at(path)} must be {_kind(spec)} (got the {json_type(value)} {short(value)}){tail}")
