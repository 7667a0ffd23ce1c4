"""Seed-compatible entry point: `python training.py ...` is `gpt2-dutch train ...` (same flags)."""

import sys

from gpt2_dutch.__main__ import run

if __name__ == "__main__":
    sys.exit(run("train", sys.argv[1:], prog="training.py"))
