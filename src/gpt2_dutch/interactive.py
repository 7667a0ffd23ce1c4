"""The `generate --interactive` REPL: prompts in, streamed Dutch text out, settings changed with /commands.

On a terminal it has line editing and history (readline); Ctrl-C stops the current generation and returns to
the prompt; Ctrl-D exits. With piped stdin it reads one prompt or command per line and exits 0 at end of input.
"""

from __future__ import annotations

import contextlib
import os
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


def repl(model: Any, tokenizer: Any, cfg: Any, stdin: TextIO, stdout: TextIO) -> int:
    from transformers import TextStreamer

    from .generate import generate_texts

    tty = stdin.isatty()
    if tty:
        _enable_readline()
        print(f"gpt2-dutch interactive: {settings_line(cfg)}. /help for commands, Ctrl-D to quit.", file=stdout)
    cfg.num_return_sequences = 1
    while True:
        try:
            line = input("> ") if tty else stdin.readline()
        except EOFError:
            print(file=stdout)
            return 0
        except KeyboardInterrupt:
            print("^C", file=stdout)
            continue
        if not tty and line == "":
            return 0  # end of piped input
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            reply = apply_command(cfg, line.strip())
            if reply is None:
                return 0
            print(reply, file=stdout, flush=True)
            continue
        print(line, end="", file=stdout, flush=True)
        try:
            generate_texts(model, tokenizer, [line], cfg, _Streamer(tokenizer, stdout, TextStreamer))
        except KeyboardInterrupt:
            print(" [stopped]", file=stdout, flush=True)
            continue
        print(file=stdout, flush=True)


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
