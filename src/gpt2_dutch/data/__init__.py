"""Text and tokens: reading raw text, the tokenizer, the processed chunk dataset."""
