"""The errors of the ``anyms`` command, and the exit status each one means."""
from __future__ import annotations

__all__ = ["UsageError", "LoadError", "GenerationError"]


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit status 2."""


class LoadError(Exception):
    """A model, adapter or image encoder that cannot be loaded: exit status 1."""


class GenerationError(Exception):
    """A generation that failed on a good input (out of memory, a full disk): exit status 1."""
