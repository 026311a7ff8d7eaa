"""bittune: fine-tune language models cheaply and shrink them without losing quality.

Importing this package is cheap on purpose: torch, transformers and every optional backend are imported by the
modules that use them, not here.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
