"""Energy-Based Transformers for the Hugging Face ecosystem."""

from .configuration_ebt import EBTConfig

__all__ = ["EBTConfig"]
