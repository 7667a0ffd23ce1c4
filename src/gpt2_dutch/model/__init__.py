"""The GPT-2 model: size presets and their FLOP count, loading a trained one, CPU kernels for decoding."""
