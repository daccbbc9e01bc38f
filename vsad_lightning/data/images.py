"""Reading and writing image and mask files with OpenCV, with errors that name the file.

Images come back as ``(H, W, 3)`` uint8 RGB whatever is on disk (grey, BGR, BGRA, 16 bit);
masks come back as ``(H, W)`` bool, ``True`` where the file is ``> 0`` in any channel.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from vsad_lightning.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
"""File endings recognised as images (compared case-insensitively)."""

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND"
_TAIL_BYTES = 16


def _decode(path: str | os.PathLike, what: str) -> np.ndarray:
    """Decode ``path`` with ``cv2.IMREAD_UNCHANGED``; unreadable or truncated files are errors.

    The bytes are read by Python (so non-ASCII paths work) and decoded by OpenCV. OpenCV only
    warns on a JPEG that ends early and returns a half-grey picture, so a JPEG must also end
    with its end-of-image marker.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{what} {path} does not exist") from e
    except OSError as e:
        raise DataError(f"{what} {path} cannot be read ({e.strerror})") from e
    if not data:
        raise DataError(f"{what} {path} is empty (0 bytes)")
    if data.startswith(_JPEG_START) and _JPEG_END not in data[-16:]:
        raise DataError(f"{what} {path} is a truncated JPEG (no end-of-image marker)")
    array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None or array.size == 0:
        raise DataError(f"{what} {path} cannot be decoded by OpenCV (corrupt or not an image)")
    return array


def probe_image(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """``(W, H)`` of an image file read from its header, without decoding the pixels.

    The eager file check (``data.check_files: header``) calls this for every image and mask
    before training, so it must cost a few hundred bytes per file, not a decode. It applies
    the checks of ``_decode`` that need no decoding: the file exists and is not empty, a JPEG
    ends with its end-of-image marker, a PNG with its ``IEND`` chunk. Pillow reads the header;
    when Pillow cannot identify a file OpenCV may still decode, the file is decoded once, so
    this never rejects a file that training would read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(len(_PNG_START))
            f.seek(max(0, size - _TAIL_BYTES))
            tail = f.read()
    except FileNotFoundError as e:
        raise DataError(f"{what} {path} does not exist") from e
    except OSError as e:
        raise DataError(f"{what} {path} cannot be read ({e.strerror})") from e
    if size == 0:
        raise DataError(f"{what} {path} is empty (0 bytes)")
    if head.startswith(_JPEG_START) and _JPEG_END not in tail:
        raise DataError(f"{what} {path} is a truncated JPEG (no end-of-image marker)")
    if head.startswith(_PNG_START) and _PNG_END not in tail:
        raise DataError(f"{what} {path} is a truncated PNG (no IEND chunk)")
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        array = _decode(path, what)  # a DataError when OpenCV cannot read it either
        return array.shape[1], array.shape[0]


def _to_uint8(array: np.ndarray, path: Path, what: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        # 16-bit files keep the full range: 65535 -> 255.
        return np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
    raise DataError(f"{what} {path} has pixel type {array.dtype}; expected 8 or 16 bit")


def read_image_rgb(path: str | os.PathLike, what: str = "image") -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB. Grey is repeated, alpha dropped, BGR turned into RGB."""
    path = Path(path)
    array = _to_uint8(_decode(path, what), path, what)
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        return np.ascontiguousarray(array[:, :, 2::-1])
    raise DataError(f"{what} {path} has shape {array.shape}; expected grey, BGR or BGRA")


def read_mask(path: str | os.PathLike, what: str = "mask") -> np.ndarray:
    """``(H, W)`` bool: ``True`` where any channel of the file is ``> 0`` (binarised)."""
    path = Path(path)
    array = _decode(path, what)
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.ndim != 2:
        raise DataError(f"{what} {path} has shape {array.shape}; expected a 2-D mask")
    return array > 0


def write_jpeg(path: str | os.PathLike, image_rgb: np.ndarray, quality: int = 95) -> None:
    """Write ``(H, W, 3)`` uint8 RGB as a JPEG (deterministic for the same pixels)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(
        ".jpg", np.ascontiguousarray(image_rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise OSError(f"OpenCV could not encode {path} as JPEG")
    path.write_bytes(buf.tobytes())


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a uint8 array (``(H, W)`` grey, or ``(H, W, 3)`` RGB) as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 3:
        image = image[:, :, ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise OSError(f"OpenCV could not encode {path} as PNG")
    path.write_bytes(buf.tobytes())


def write_mask_png(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a bool mask as a 0/255 grey PNG."""
    write_png(path, np.where(mask, 255, 0).astype(np.uint8))
