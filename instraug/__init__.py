"""instraug: robust instruction tuning data by LLM instruction augmentation (InstrAug)."""

__version__ = "0.2.0"
