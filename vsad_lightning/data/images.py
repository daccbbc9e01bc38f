"""Reading and writing image and mask files with OpenCV, with errors that name the file.

Conversions (every view of every dataset goes through ``read_image_rgb`` and ``read_mask``):

- Images come back as ``(H, W, 3)`` uint8 RGB whatever is on disk: grey (1 channel) is
  repeated into R, G and B; an alpha channel (RGBA/BGRA) is dropped without blending, so the
  colour under a transparent pixel is used as stored; 16-bit files are scaled to 8 bit
  (65535 -> 255, ``round(v / 257)``); CMYK JPEGs are converted to RGB by OpenCV's decoder.
- Masks come back as ``(H, W)`` bool. A pixel is a defect when its value (the largest over
  the channels) is at least half the file's full scale: ``>= 128`` for 8 bit, ``>= 32768``
  for 16 bit (``MASK_THRESHOLD``). A mask saved through JPEG has ringing of small non-zero
  values around its edges; half scale keeps the drawn defect and drops that noise. A mask
  whose largest value is 1 (a 0/1 label image) is read as 0/1.
- EXIF orientation is *not* applied: OpenCV reads the pixels as stored, and the homography
  cache and the masks are in that frame too. A view whose file carries an EXIF orientation
  other than 1 gets one warning (``exif_orientation``), since a viewer shows it rotated.
- Size: a file whose header claims more than ``max_image_pixels()`` pixels (default 100
  megapixels; environment variable ``VSAD_MAX_IMAGE_PIXELS`` overrides it) is refused from
  its header, before any decoding: a 2.6 MB PNG can claim 30000 x 30000 px and cost
  gigabytes to decode.
"""

from __future__ import annotations

import io
import os
import warnings
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

MAX_PIXELS_ENV = "VSAD_MAX_IMAGE_PIXELS"
"""Environment variable overriding the largest image, in pixels (``W * H``), a file may claim."""

DEFAULT_MAX_PIXELS = 100_000_000
"""100 megapixels: above any camera of the supported datasets (Real-IAD's raw views are a few
megapixels), far below what a crafted header can claim."""

MASK_THRESHOLD = 0.5
"""A mask pixel is a defect at or above this fraction of the file's full scale."""

EXIF_ORIENTATION_TAG = 0x0112

# Pillow only reads headers here (the pixels are decoded by OpenCV); its own bomb check would
# raise before ours can name the option.
Image.MAX_IMAGE_PIXELS = None


def max_image_pixels() -> int:
    """The largest ``W * H`` an image file may claim (``VSAD_MAX_IMAGE_PIXELS``, default 100 MP)."""
    value = os.environ.get(MAX_PIXELS_ENV)
    if value is None or value == "":
        return DEFAULT_MAX_PIXELS
    try:
        pixels = int(value)
    except ValueError:
        raise DataError(
            f"{MAX_PIXELS_ENV}={value!r} is not an integer (the largest image, in pixels)"
        ) from None
    if pixels < 1:
        raise DataError(f"{MAX_PIXELS_ENV} must be >= 1, got {pixels}")
    return pixels


def check_pixel_count(size: tuple[int, int], path: Path, what: str) -> None:
    """Refuse a ``(W, H)`` above ``max_image_pixels()`` or with a zero side, naming the file."""
    width, height = size
    if width < 1 or height < 1:
        raise DataError(f"{what} {path} claims a size of {width}x{height} px; expected >= 1x1")
    limit = max_image_pixels()
    if width * height > limit:
        raise DataError(
            f"{what} {path} claims {width}x{height} px ({width * height / 1e6:.0f} megapixels), "
            f"more than the limit of {limit / 1e6:g} megapixels; set {MAX_PIXELS_ENV} to a "
            "larger pixel count if the image is genuine"
        )


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of an opened file (1, the default, when there is none)."""
    try:
        return int(image.getexif().get(EXIF_ORIENTATION_TAG, 1) or 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block is no reason to refuse pixels
        return 1


_WARNED_EXIF: set[Path] = set()


def _warn_exif(path: Path, orientation: int, what: str) -> None:
    if orientation == 1 or path in _WARNED_EXIF:
        return
    first = not _WARNED_EXIF
    _WARNED_EXIF.add(path)
    if first:  # once per process: a rotated camera has it on every file
        warnings.warn(
            f"{what} {path} has EXIF orientation {orientation}: it is used as stored, not "
            "rotated (masks and homographies are in the stored frame); other files with an "
            "orientation tag are not listed",
            UserWarning,
            stacklevel=3,
        )


def _header(data: bytes | None, path: Path) -> tuple[tuple[int, int], int] | None:
    """``((W, H), EXIF orientation)`` from the header (Pillow, no pixel decoding), or ``None``
    when Pillow cannot identify the file."""
    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            return image.size, exif_orientation(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return None


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
    header = _header(data, path)
    if header is not None:  # before decoding: the size a header claims costs nothing to check
        check_pixel_count(header[0], path, what)
        _warn_exif(path, header[1], what)
    try:
        array = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:  # OpenCV's own pixel limit, an unsupported variant
        message = " ".join(str(e).split())[:200]
        raise DataError(f"{what} {path} cannot be decoded by OpenCV ({message})") from e
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
    header = _header(None, path)
    if header is None:
        array = _decode(path, what)  # a DataError when OpenCV cannot read it either
        return array.shape[1], array.shape[0]
    check_pixel_count(header[0], path, what)
    _warn_exif(path, header[1], what)
    return header[0]


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
    """``(H, W)`` bool: ``True`` where the largest channel is at least ``MASK_THRESHOLD`` of
    the file's full scale (128 of 255, 32768 of 65535); a 0/1 file is read as 0/1 (see the
    module docstring)."""
    path = Path(path)
    array = _decode(path, what)
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.ndim != 2:
        raise DataError(f"{what} {path} has shape {array.shape}; expected a 2-D mask")
    if array.dtype not in (np.uint8, np.uint16):
        raise DataError(f"{what} {path} has pixel type {array.dtype}; expected 8 or 16 bit")
    if array.size and int(array.max()) <= 1:
        return array > 0  # a 0/1 label image
    full_scale = np.iinfo(array.dtype).max
    return array >= int(np.ceil(MASK_THRESHOLD * full_scale))


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
