"""cachelora: train and verify domain LoRA adapters for semantic-cache embedding models."""

__version__ = "0.1.0"
