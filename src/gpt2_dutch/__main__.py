"""`gpt2-dutch <command>`: maps each subcommand to its stage's config class and entry function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
from typing import Any

from gpt2_dutch import __version__
from gpt2_dutch.core.errors import Stopped, UsageError, is_disk_full
from gpt2_dutch.core.options import add_arguments, config_values, from_namespace, read_config_file

# name -> (module, config class, entry function, one-line help). Building a parser imports each module for its
# config class, so a module must import torch & co. only inside its functions: `--help` stays light
# (tests/unit/test_main.py checks it); the entry function loads what it needs when the command runs.
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "preprocess": ("preprocess", "PreprocessConfig", "preprocess", "Dutch text -> tokenizer -> token chunks"),
    "train": ("train", "TrainConfig", "train", "train GPT-2 from scratch on a processed dataset"),
    "generate": ("generate", "GenerateConfig", "generate", "generate text: prompts, batch, --interactive, --benchmark"),
    "evaluate": ("evaluate", "EvaluateConfig", "evaluate", "loss, perplexity, bits per byte of a model"),
    "bench": ("bench", "BenchConfig", "bench", "our speed vs the standard recipes, side by side, with device limits"),
    "serve": ("serve", "ServeConfig", "serve", "an OpenAI-compatible API with continuous batching, and a playground"),
    "demo": ("demo", "DemoConfig", "demo", "the whole pipeline on the built-in Dutch sample in minutes"),
    "push": ("push", "PushConfig", "push", "publish a model (weights, tokenizer, card) on the Hugging Face Hub"),
}


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (`prog: error: ...`) and exit status 2, without the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


CONFIG_HELP = ("read settings from a JSON or YAML file: keys are the flags' names with underscores "
               "(dataset_path: ...); flags given here override the file. A run's run_config.json replays that run "
               "as a new one")


def _stage(command: str) -> tuple[types.ModuleType, type]:
    module, cls_name, _fn, _help = COMMANDS[command]
    mod = importlib.import_module(f"gpt2_dutch.{module}")
    return mod, getattr(mod, cls_name)


def _add_command_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    add_arguments(parser, cls)


def build_parser(prog: str = "gpt2-dutch") -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--version", action="version", version=f"gpt2-dutch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (*_, help_text) in COMMANDS.items():
        mod, cls = _stage(name)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_command_arguments(p, cls)
    return parser


def command_parser(command: str, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of one command (what `gpt2-dutch COMMAND ...` and the seed's scripts parse with)."""
    mod, cls = _stage(command)
    parser = OneLineArgumentParser(prog=prog or f"gpt2-dutch {command}", description=mod.__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_command_arguments(parser, cls)
    return parser


def command_config(command: str, args: argparse.Namespace, prog: str = "gpt2-dutch") -> Any:
    """The command's config dataclass: the flags given, over the settings of --config FILE, over the defaults."""
    _mod, cls = _stage(command)
    base = config_values(cls, read_config_file(args.config), f"--config {args.config}", prog) if args.config \
        else None
    return from_namespace(cls, args, base)


def run(command: str, argv: list[str], prog: str | None = None) -> int:
    """Run one stage from command-line arguments (and --config FILE); user errors become one line and exit
    status 2."""
    parser = command_parser(command, prog)
    args = parser.parse_args(argv)

    def stage() -> Any:
        cfg = command_config(command, args, parser.prog)  # file errors and config checks: one line, inside _call
        mod, _cls = _stage(command)
        return getattr(mod, COMMANDS[command][2])(cfg)

    return _call(parser.prog, stage)


def _call(prog: str, fn) -> int:  # type: ignore[no-untyped-def]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    try:
        fn()
    except Stopped as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return e.exit_code
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if not is_disk_full(e):
            raise
        # A stage that missed its own `disk_faults` guard still ends in one line; its temp files are its own.
        print(f"{prog}: error: no space left on the device ({e.filename or e.strerror}); free some space and "
              "run the same command again", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def undecodable_argument(argv: list[str]) -> str | None:
    """The first argument holding bytes that are not UTF-8 (Python keeps them as lone surrogates), if any."""
    for arg in argv:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return arg.encode("utf-8", "backslashreplace").decode("ascii", "replace")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bad = undecodable_argument(argv)
    if bad is not None:
        print(f"gpt2-dutch: error: the argument '{bad}' is not valid UTF-8; pass paths and text as UTF-8 "
              "(rename the file or set a UTF-8 locale)", file=sys.stderr)
        return 2
    if argv and argv[0] in COMMANDS:
        return run(argv[0], argv[1:])
    build_parser().parse_args(argv)  # prints help / usage errors for anything else
    return 2


if __name__ == "__main__":
    sys.exit(main())
