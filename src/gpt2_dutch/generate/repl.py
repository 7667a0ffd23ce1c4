"""The `generate --interactive` REPL: prompts in, streamed Dutch text out, settings changed with /commands.

    gpt2-dutch generate --model-path M --interactive

On a terminal it has line editing and history (readline); Ctrl-C stops the current generation and returns to
the prompt; Ctrl-D exits. With piped stdin it reads one prompt or command per line and exits 0 at end of input.
A line that is not UTF-8 is skipped with one line on stderr; so are a truncated prompt and a capped budget
(see generate.PromptPlan), and a generation that fails for a reason the user can fix (out of memory).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, TextIO

HELP = """commands:
  /temp X     sampling temperature          /topk N   top-k (0: off)      /topp X   nucleus top-p
  /max N      max new tokens                /rep X    repetition penalty  /greedy   toggle greedy decoding
  /seed N     reseed sampling               /settings show settings       /help     this text
  /quit       exit (or Ctrl-D); Ctrl-C stops a generation"""

_SETTINGS = {"/temp": ("temperature", float), "/topk": ("top_k", int), "/topp": ("top_p", float),
             "/max": ("max_new_tokens", int), "/rep": ("repetition_penalty", float), "/seed": ("seed", int)}


def apply_command(cfg: Any, line: str) -> str | None:
    """Apply a /command to `cfg`; return the reply to print, or None for /quit."""
    parts = line.split()
    cmd, args = parts[0].lower(), parts[1:]
    if cmd in ("/quit", "/exit", "/q"):
        return None
    if cmd == "/help":
        return HELP
    if cmd == "/greedy":
        cfg.greedy = not cfg.greedy
        return f"greedy decoding {'on' if cfg.greedy else 'off'}"
    if cmd == "/settings":
        return settings_line(cfg)
    if cmd in _SETTINGS:
        name, kind = _SETTINGS[cmd]
        if len(args) != 1:
            return f"usage: {cmd} VALUE"
        try:
            value = kind(args[0])
        except ValueError:
            return f"{cmd}: '{args[0]}' is not a{'n integer' if kind is int else ' number'}"
        old = getattr(cfg, name)
        setattr(cfg, name, value)
        try:
            cfg.__post_init__()  # the same checks as on the command line
        except Exception as e:  # noqa: BLE001 - a UsageError: keep the old value
            setattr(cfg, name, old)
            return f"{cmd}: {e}"
        return f"{name} = {value}"
    return f"unknown command {cmd}; /help lists them"


def settings_line(cfg: Any) -> str:
    mode = "greedy" if cfg.greedy else f"temperature {cfg.temperature}, top-k {cfg.top_k}, top-p {cfg.top_p}"
    return f"{mode}, max {cfg.max_new_tokens} new tokens, repetition penalty {cfg.repetition_penalty}"


def repl(model: Any, tokenizer: Any, cfg: Any, stdin: TextIO, stdout: TextIO, stderr: TextIO | None = None) -> int:
    from transformers import TextStreamer

    from gpt2_dutch.core.errors import UsageError
    from gpt2_dutch.generate.sampling import generate_texts, plan_prompts, print_notices
    from gpt2_dutch.model.loading import context_length

    stderr = stderr or sys.stderr
    tty = stdin.isatty()
    if tty:
        _enable_readline()
        print(f"gpt2-dutch interactive: {settings_line(cfg)}. /help for commands, Ctrl-D to quit.", file=stdout)
    cfg.num_return_sequences = 1
    context = context_length(model)
    lineno = 0
    while True:
        lineno += 1
        try:
            line = input("> ") if tty else _read_line(stdin)
            line.encode("utf-8")  # a surrogate-escaped byte (a C locale's stdin) is no text either
        except EOFError:
            if tty:
                print(file=stdout)
            return 0
        except KeyboardInterrupt:
            print("^C", file=stdout)
            continue
        except (UnicodeDecodeError, UnicodeEncodeError) as e:
            where = "that line" if tty else f"input line {lineno}"
            print(f"gpt2-dutch generate: {where} is not valid UTF-8 ({_bad_byte(e)}); skipped", file=stderr,
                  flush=True)
            continue
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            reply = apply_command(cfg, line.strip())
            if reply is None:
                return 0
            print(reply, file=stdout, flush=True)
            continue
        try:
            plans = plan_prompts(tokenizer, [line], context, cfg.max_new_tokens)
        except UsageError as e:
            print(f"gpt2-dutch generate: {e}", file=stderr, flush=True)
            continue
        print_notices(plans, context, stderr, single=True)
        print(line, end="", file=stdout, flush=True)
        try:
            generate_texts(model, tokenizer, [line], cfg, _Streamer(tokenizer, stdout, TextStreamer), plans=plans)
        except KeyboardInterrupt:
            print(" [stopped]", file=stdout, flush=True)
            continue
        except UsageError as e:  # out of memory, overflowing sampling settings: the next prompt may work
            print(file=stdout, flush=True)
            print(f"gpt2-dutch generate: {e}", file=stderr, flush=True)
            continue
        print(file=stdout, flush=True)


def _read_line(stdin: TextIO) -> str:
    """One line of piped input, decoded here so that bytes that are not UTF-8 spoil that line only.

    Raises EOFError at the end of input and UnicodeDecodeError for a line that is not UTF-8.
    """
    buffer = getattr(stdin, "buffer", None)
    raw: str | bytes = buffer.readline() if buffer is not None else stdin.readline()
    if not raw:
        raise EOFError
    return raw.decode("utf-8") if isinstance(raw, bytes) else raw


def _bad_byte(e: UnicodeDecodeError | UnicodeEncodeError) -> str:
    if isinstance(e, UnicodeDecodeError):
        return f"byte 0x{e.object[e.start]:02x} at position {e.start + 1}"
    # surrogateescape maps a byte b that is not UTF-8 to the code point U+DC00 + b
    code = ord(e.object[e.start])
    return f"byte 0x{code - 0xDC00:02x} at position {e.start + 1}" if 0xDC80 <= code <= 0xDCFF else \
        f"a lone surrogate at position {e.start + 1}"


def _Streamer(tokenizer: Any, stdout: TextIO, base: type) -> Any:  # noqa: N802 - a class factory
    class Streamer(base):  # type: ignore[misc, valid-type]
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stdout.write(text)
            stdout.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _enable_readline() -> None:
    try:
        import atexit
        import readline
    except ImportError:  # not on every platform; input() still works without editing
        return
    history = Path(os.environ.get("GPT2_DUTCH_HISTORY", Path.home() / ".gpt2_dutch_history"))
    with contextlib.suppress(OSError):
        readline.read_history_file(history)
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline, history))


def _save_history(readline: Any, history: Path) -> None:
    with contextlib.suppress(OSError):
        readline.write_history_file(history)
