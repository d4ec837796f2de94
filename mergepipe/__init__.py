"""mergepipe: merge LLM checkpoint families under an explicit I/O budget."""

__version__ = "0.1.0"
