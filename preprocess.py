"""Seed-compatible entry point: `python preprocess.py ...` is `gpt2-dutch preprocess ...` (same flags)."""

import sys

from gpt2_dutch.__main__ import run

if __name__ == "__main__":
    sys.exit(run("preprocess", sys.argv[1:], prog="preprocess.py"))
