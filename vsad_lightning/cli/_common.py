"""What every console script shares: one readable line for bad input, exit code 2."""

from __future__ import annotations

import errno
import functools
import os
import pickle
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from vsad_lightning.errors import DataError

F = TypeVar("F", bound=Callable[..., int | None])

DEBUG_ENV = "VSAD_DEBUG"
"""``VSAD_DEBUG=1`` lets the traceback through instead of the one-line message."""


def one_line(message: str) -> str:
    """``message`` on one line: a wrapped library message (diffusers, torch) must not break
    the one-line contract of ``report_data_errors``."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _option_value(argv: Sequence[str], option: str) -> str | None:
    """The value of ``--option VALUE`` or ``--option=VALUE`` in ``argv`` (the last one)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    return value


def unsafe_pickle_message(error: pickle.UnpicklingError, argv: Sequence[str]) -> str:
    """The one line for a checkpoint that ``torch.load(..., weights_only=True)`` refused.

    torch's own message spans many lines and suggests ``weights_only=False``, which is exactly
    what must not be done with a file of unknown origin; keep its first line (what was found).
    """
    lines = [ln.strip() for ln in str(error).splitlines()]
    # torch names the refused class or function on a line with "unsupported" and "GLOBAL"
    # (the wording varies between versions); the rest advises weights_only=False.
    detail = next((ln for ln in lines if "unsupported" in ln.lower() and "GLOBAL" in ln), "")
    detail = detail or "torch.load(weights_only=True) refused it"
    path = _option_value(argv, "--ckpt_path")
    what = f"checkpoint {path}" if path else "a checkpoint"
    return (
        f"refusing to load {what}: it holds Python objects other than tensors and plain "
        f"containers, so it was not written by vsad-fit, and loading it fully could run code "
        f"from the file ({detail}); use a checkpoint written by vsad-fit"
    )


STORAGE_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS)
"""``OSError``s that mean "the storage refused the write": a full disk, ``ulimit -f``, a quota,
a read-only file system. Whoever wrote the file (this project or a library: TensorBoard's
event files, Lightning's ``config.yaml``), the user's remedy is the same."""


def storage_error_message(error: OSError) -> str:
    """One line naming the file the storage refused (``could not write FILE (reason)``)."""
    reason = error.strerror or os.strerror(error.errno or 0)
    return f"could not write {error.filename} ({reason})" if error.filename else reason


def report_data_errors(main: F) -> F:
    """Wrap a console-script ``main``: a ``DataError`` prints ``error: <message>`` on stderr and
    exits with code 2, without a traceback unless ``VSAD_DEBUG=1``.

    A checkpoint refused by ``torch.load(..., weights_only=True)`` (``pickle.UnpicklingError``:
    it holds arbitrary objects, e.g. a pickle bomb) is reported the same way, and so is an
    ``OSError`` of a full or read-only storage (``STORAGE_ERRNOS``) raised by a library.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (DataError, pickle.UnpicklingError, OSError) as e:
            if os.environ.get(DEBUG_ENV) == "1":
                raise
            if isinstance(e, OSError) and e.errno not in STORAGE_ERRNOS:
                raise
            if isinstance(e, OSError):
                message = one_line(storage_error_message(e))
            elif isinstance(e, DataError):
                message = one_line(str(e))
            else:
                given = [a for a in (*args, *kwargs.values()) if isinstance(a, list | tuple)]
                argv = given[0] if given else sys.argv[1:]
                message = unsafe_pickle_message(e, argv)
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
