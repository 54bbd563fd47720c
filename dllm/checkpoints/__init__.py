"""Checkpoint formats: Meta, Hugging Face and GGUF bases, conversion between them, adapter files."""
