"""The console of the ``anyms`` command: one-line messages, warnings above the progress bars."""
from __future__ import annotations

import sys

__all__ = ["one_line", "emit", "info", "status", "warn"]


def one_line(message) -> str:
    """``message`` on one line (library errors may hold newlines)."""
    import re

    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


def emit(line: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)          # above a progress bar, if one is running
    except ImportError:
        print(line, file=sys.stderr)


def info(message: str) -> None:
    print(message, flush=True)


def status(message: str) -> None:
    """Progress (model loaded, ...): stderr, beside the progress bars."""
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    emit(f"anyms generate: warning: {one_line(message)}")
