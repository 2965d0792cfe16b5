"""fatezero-cli: zero-shot text-driven video editing, the FateZero way."""

__version__ = "0.1.0"
