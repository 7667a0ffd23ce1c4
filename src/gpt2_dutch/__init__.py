"""gpt2-dutch: train GPT-2 language models from scratch on Dutch text, evaluate them and serve them."""

__version__ = "0.1.0"
