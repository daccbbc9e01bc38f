"""What every console script shares: one readable line for bad input, exit code 2."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from vsad_lightning.errors import DataError

F = TypeVar("F", bound=Callable[..., int | None])


def report_data_errors(main: F) -> F:
    """Wrap a console-script ``main``: a ``DataError`` prints ``error: <message>`` on stderr and
    exits with code 2, without a traceback unless ``VSAD_DEBUG=1``."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except DataError as e:
            if os.environ.get("VSAD_DEBUG") == "1":
                raise
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
