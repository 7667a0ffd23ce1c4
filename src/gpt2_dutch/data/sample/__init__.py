"""The built-in Dutch sample: original text written for this project, shipped with the package."""

from pathlib import Path


def builtin_sample_path() -> Path:
    """Path of the sample's .jsonl file (one {"text", "register"} object per document)."""
    return Path(__file__).with_name("dutch_sample.jsonl")
