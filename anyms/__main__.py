"""``python -m anyms ...``, the same as the ``anyms`` command."""
import sys

from .cli import main

sys.exit(main())
