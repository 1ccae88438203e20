"""Memory sizes as users write them (``8GB``, ``12GiB``, ``7.5GiB``): the parser behind
``--max-memory`` and the record's ``model.max_memory``. Model-free and torch-free, so that the
command line and the record check read sizes without the planner (:mod:`anyms.budget`)."""
from __future__ import annotations

import re
from decimal import Decimal

__all__ = ["parse_size", "size_argument", "SIZE_UNITS", "SIZE_FORMS", "LARGEST_BUDGET"]

# Decimal (kB = 1000 bytes) and binary (KiB = 1024 bytes) units; the case is part of the unit.
SIZE_UNITS = {"B": 1, "kB": 1000, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3, "TB": 1000 ** 4,
              "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3, "TiB": 1024 ** 4}
SIZE_FORMS = "a number and a unit, e.g. 8GB, 12GiB, 8000MB, 7.5GiB (units: " + ", ".join(SIZE_UNITS) + ")"
# More than any device has: a budget above it is a typo.
LARGEST_BUDGET = 1024 ** 5
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([A-Za-z]+)")


def parse_size(text, name: str = "--max-memory") -> int:
    """``text`` (``"8GB"``, ``"12GiB"``, ``"7.5GiB"``) in bytes (rounded down). Anything else, a
    size of 0 bytes or one above 1 PiB is a ValueError naming ``name``."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None or match.group(2) not in SIZE_UNITS:
        raise ValueError(f"{name}: {text!r} is not a size: give {SIZE_FORMS}")
    size = int(Decimal(match.group(1)) * SIZE_UNITS[match.group(2)])
    if size < 1:
        raise ValueError(f"{name}: {text!r} is less than one byte")
    if size > LARGEST_BUDGET:
        raise ValueError(f"{name}: {text!r} is above 1 PiB, more than any device has")
    return size


def size_argument(text: str) -> str:
    """argparse's ``type=`` for --max-memory: the text as given (what the image's record keeps), checked."""
    import argparse

    try:
        parse_size(text, "")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).lstrip(": ")) from None
    return text
