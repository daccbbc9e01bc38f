"""Errors a user can meet and act on.

``DataError`` is for bad input (files, samples, views, caches, configs). The console scripts
turn it into one readable line and exit code 2; ``VSAD_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input: the message names the file, sample or view and says what was expected."""
