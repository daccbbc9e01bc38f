"""Small I/O helpers shared by every package.

Every file this project writes (results, caches, pictures, checkpoints) goes through
``atomic_write_bytes``: readers see the old file or the new one, never half of one, and a
failed write (full disk, ``ulimit -f``, a read-only folder) is one ``DataError`` line naming
the path, with nothing half-written left behind. Files get the permissions an ordinary
``open()`` would give them (``0666`` minus the user's umask), so results and the homography
caches are readable by colleagues on a shared cluster exactly when the user's umask says so.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from vsad_lightning.errors import DataError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it, so set it back)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, what: str = "") -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    The bytes go to a temporary file in the same folder (so the final step is a rename on one
    file system, never a copy), are flushed to disk, get mode ``0666 & ~umask`` (``mkstemp``
    creates ``0600``), then are renamed over the target (``os.replace`` is atomic on POSIX).
    Any ``OSError`` (``ENOSPC``, ``EFBIG`` under ``ulimit -f``, ``EACCES``, ``EROFS``) removes
    the temporary file and becomes a ``DataError`` naming ``path`` (and ``what`` it is).
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        reason = e.strerror or str(e)
        raise DataError(f"could not write {label} ({reason})") from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str, what: str = "") -> None:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), what)


def atomic_write_json(path: str | os.PathLike, obj: Any, what: str = "") -> None:
    """``atomic_write_text`` of ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", what)


def write_image(path: str | os.PathLike, image_bgr: np.ndarray) -> None:
    """Write a picture (``(H, W)`` grey or ``(H, W, 3)`` BGR uint8, as ``cv2.imwrite`` takes
    it) in the format of ``path``'s ending, atomically.

    ``cv2.imwrite`` only returns ``False`` when it cannot write (a full disk, a missing folder),
    which is easy to ignore; here encoding and writing both fail with a ``DataError`` naming
    the file.
    """
    import cv2  # local: keep this module importable without OpenCV's start-up cost

    path = Path(path)
    ok, buffer = cv2.imencode(path.suffix or ".png", np.ascontiguousarray(image_bgr))
    if not ok:
        raise DataError(f"could not encode picture {path} (shape {tuple(image_bgr.shape)})")
    atomic_write_bytes(path, buffer.tobytes(), "picture")


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON document at ``path``; a missing, unreadable or unparsable file (not UTF-8, a
    folder, binary) is one ``DataError`` line naming ``what`` (e.g. ``"homography cache"``)
    and the path."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{what} {path} does not exist") from e
    except IsADirectoryError as e:
        raise DataError(f"{what} {path} is a folder; expected a JSON file") from e
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason}); expected a UTF-8 "
            "JSON file (re-save it as UTF-8)"
        ) from e
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {path} is not valid JSON ({e})") from e
    except OSError as e:
        raise DataError(f"{what} {path} cannot be read ({e.strerror or e})") from e
