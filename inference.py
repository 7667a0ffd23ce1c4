"""Seed-compatible entry point: `python inference.py ...` is `gpt2-dutch generate ...` (same flags)."""

import sys

from gpt2_dutch.__main__ import run

if __name__ == "__main__":
    sys.exit(run("generate", sys.argv[1:], prog="inference.py"))
