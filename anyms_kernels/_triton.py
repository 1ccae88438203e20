"""Optional-triton shim: the rest of the package asks here whether Triton can run.

Importing this module never touches a GPU. Triton is optional (the PyTorch
backend needs none); when it is missing, ``HAS_TRITON`` is False and
``triton_unavailable_reason()`` says why.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

MIN_TRITON_VERSION = (3, 0)

try:  # pragma: no cover - depends on the environment
    import triton
    import triton.language as tl

    _IMPORT_ERROR: Optional[str] = None
except Exception as exc:  # ImportError, or a broken install raising something else
    triton = None
    tl = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"


def parse_version(text: str) -> Tuple[int, ...]:
    """'3.6.0+git1a2b' -> (3, 6, 0): versions compare as numbers, never as strings."""
    parts = []
    for piece in text.split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts)


TRITON_VERSION: Tuple[int, ...] = parse_version(triton.__version__) if triton is not None else ()
HAS_TRITON = triton is not None and TRITON_VERSION >= MIN_TRITON_VERSION


# Triton's own reading of a boolean variable (its C++ getenv_bool): these words, any case, are on;
# everything else ("2", " 1", "") is off. Mirrored for triton releases that do not export it.
_TRUE_WORDS = ("1", "true", "on", "yes", "y")


def interpreter_requested() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter, read as Triton reads it (when a kernel is
    defined): a value Triton takes as off (e.g. "2") compiles the kernel, so it must read off here too."""
    try:
        from triton._C.libtriton import getenv_bool
    except Exception:  # no triton, or a release without it
        return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUE_WORDS
    return bool(getenv_bool("TRITON_INTERPRET", False))


def triton_unavailable_reason() -> Optional[str]:
    if triton is None:
        return f"triton is not installed or failed to import ({_IMPORT_ERROR}); `pip install triton`"
    if not HAS_TRITON:
        need = ".".join(map(str, MIN_TRITON_VERSION))
        return f"triton {triton.__version__} is too old; anyms_kernels needs triton >= {need}"
    return None
