"""Hugging Face checkpoints in and out, and the tokenizer."""
