"""Synthetic multi-view samples with exactly known homographies and defects.

The scene (docs/datasets.md#synthetic, the simple rig): a flat textured object lies on a
plane and five cameras look at it, C1 from straight
above and C2..C5 obliquely from four sides, in ring order (the Real-IAD rig). Each view is
rendered as a perspective warp of one *plane image*, so the map from view ``v`` to view ``u``
is exactly ``K_u K_v^-1`` where ``K_v`` maps plane-image pixel centres to view-``v`` pixel
centres (docs/conventions.md#coordinates: pixel ``i`` has centre ``i + 0.5``).

What varies, and why:

- per category: the surface texture (a real photograph from ``skimage.data``) and its tint;
- per sample ("normal" variation): a small shift of the texture and a colour jitter;
- per view and sample (benign, view dependent): a lighting gain, a linear gradient and a
  specular highlight fixed in *camera* coordinates, plus sensor noise, so that a method that
  compares views pixel by pixel without alignment sees differences that are not defects;
- defects (test only) are drawn *on the plane*, so they are geometrically consistent across
  the views that see them: scratches (thin polylines), stains (low-contrast blobs) and missing
  parts (holes showing the background). Their masks are warped into each view; a view that
  sees no defect pixel has no mask (a normal view of an anomalous sample).

Rendering is supersampled: each view is warped at twice its size with bilinear
interpolation, then box-filtered down by two (``cv2.INTER_AREA``), which in pixel-centre
coordinates is the exact scaling ``diag(1/2, 1/2, 1)``, so the homographies stay exact.

Everything is a function of ``(category, seed)``: the same seed writes byte-identical files.

This is the *simple* rig (``rig="simple"``, the default). ``vsad_lightning.data.realistic_rig``
is the realistic one (``rig="realistic"``: tilted, rolled cameras, per-sample placement of the
part with per-sample true homographies, a table around it, moving highlights); both share the
camera maths, the texture loading and the Real-IAD writer of this module.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.data.images import write_jpeg, write_mask_png
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache, PairEstimate
from vsad_lightning.utils.io import atomic_write_json, atomic_write_text

VIEWS = ("C1", "C2", "C3", "C4", "C5")
"""C1 looks straight down; C2..C5 look obliquely from four sides, in ring order."""

DEFECT_CODES = {"scratch": "HS", "stain": "ZW", "hole": "QS"}
"""Defect kind -> the Real-IAD style anomaly class written in the JSON (HS: scratch,
ZW: contamination, QS: missing part)."""

# Category -> (skimage.data loader, RGB tint applied to grey textures). Only files that ship
# inside scikit-image (no download) are used.
_TEXTURES: dict[str, tuple[Callable[[], np.ndarray], tuple[float, float, float]]] = {
    "brick": (skimage.data.brick, (1.0, 0.72, 0.58)),
    "gravel": (skimage.data.gravel, (0.86, 0.9, 1.0)),
    "grass": (skimage.data.grass, (0.7, 1.0, 0.62)),
    "coffee": (skimage.data.coffee, (1.0, 1.0, 1.0)),
    "camera": (skimage.data.camera, (1.0, 0.95, 0.85)),
    "moon": (skimage.data.moon, (0.9, 0.9, 1.0)),
    "astronaut": (skimage.data.astronaut, (1.0, 1.0, 1.0)),
    "rocket": (skimage.data.rocket, (1.0, 1.0, 1.0)),
    "immunohistochemistry": (skimage.data.immunohistochemistry, (1.0, 1.0, 1.0)),
    "chelsea": (skimage.data.chelsea, (1.0, 1.0, 1.0)),
}
CATEGORIES = tuple(_TEXTURES)
"""Every category name ``vsad-synth`` knows (one base texture each)."""
DEFAULT_CATEGORIES = ("brick", "gravel", "coffee")
"""``vsad-synth --categories N`` takes the first N of ``DEFAULT_CATEGORIES + CATEGORIES``."""

TEXTURE_CROP = 0.6
"""Fraction of the photograph's shorter side that covers the object (smaller: coarser
texture, easier to match at low resolution)."""

EDGE_BAND = (0.8, 0.88)
"""Distance from the object's centre of edge defects: beyond what the opposite side camera
sees (about 0.65 with the default ``Rig``), inside the object (1.0)."""

BACKGROUND_RGB = np.array([0.08, 0.09, 0.11], dtype=np.float32)
"""Colour of the plane around the object, also what a hole shows."""


RIGS = ("simple", "realistic")
"""``rig=`` values of ``generate_category`` / ``write_synthetic_dataset`` / ``vsad-synth --rig``."""

RIG_DEFAULTS = {
    "simple": {"image_size": 128, "samples_train": 80, "samples_test": 24},
    "realistic": {"image_size": 256, "samples_train": 40, "samples_test": 44},
}
"""Sizes used when the caller passes ``None`` (``vsad-synth`` without the size flags)."""


def _check_rig(rig: str) -> str:
    if rig not in RIGS:
        raise DataError(f"unknown synthetic rig {rig!r}; expected one of {list(RIGS)}")
    return rig


def rig_categories(rig: str = "simple") -> tuple[str, ...]:
    """Category names of a rig, default ones first (``--categories N`` takes the first N)."""
    if _check_rig(rig) == "realistic":
        from vsad_lightning.data.realistic_rig import REALISTIC_CATEGORIES

        return REALISTIC_CATEGORIES
    return tuple(dict.fromkeys([*DEFAULT_CATEGORIES, *CATEGORIES]))


def resolve_categories(spec: str | int | Sequence[str], rig: str = "simple") -> list[str]:
    """``3`` -> the first three categories of the rig; ``"all"`` -> all of them;
    ``"brick,coffee"`` -> those names."""
    ordered = list(rig_categories(rig))
    if isinstance(spec, str) and spec.strip() == "all":
        return ordered
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        n = int(spec)
        if not 1 <= n <= len(ordered):
            raise DataError(f"--categories {n}: choose between 1 and {len(ordered)} categories")
        return ordered[:n]
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    names = [n for n in names if n]
    if not names:
        raise DataError("no category names given")
    unknown = [n for n in names if n not in ordered]
    if unknown:
        raise DataError(
            f"unknown synthetic categories {unknown} for the {rig} rig; available: {ordered}"
        )
    if len(set(names)) != len(names):
        raise DataError(f"a synthetic category is listed twice: {names}")
    return names


# ----------------------------------------------------------------------------- the camera rig


@dataclass(frozen=True)
class Rig:
    """Five pinhole cameras above a plane (world units: the object spans ``[-1, 1]^2``).

    Attributes:
        plane_extent: the plane image covers ``[-plane_extent, plane_extent]^2``.
        top_half_width: half of the plane width the top camera sees across its image.
        distance: camera-to-target distance.
        side_elevation_deg: elevation of the side cameras above the plane (90 = top).
        side_zoom: focal length of the side cameras relative to the top camera's.
        side_target_shift: a side camera aims at this distance from the centre towards its
            own side, so it sees its own half fully and misses part of the far edge (defects
            there are invisible to it).
        side_azimuths_deg: azimuths of C2..C5.
    """

    plane_extent: float = 1.3
    top_half_width: float = 1.15
    distance: float = 3.0
    side_elevation_deg: float = 65.0
    side_zoom: float = 1.5
    side_target_shift: float = 0.35
    side_azimuths_deg: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)

    def plane_size(self, image_size: int) -> int:
        """Pixels across the plane image: ``image_size`` px per world unit, an even number so
        that the object ``[-1, 1]^2`` covers whole pixels."""
        return 2 * int(np.ceil(self.plane_extent * image_size))

    def plane_half_width(self, image_size: int) -> float:
        """The plane image covers ``[-w, w]^2`` (``w`` = ``plane_extent`` rounded up)."""
        return self.plane_size(image_size) / (2 * image_size)

    def plane_to_view(self, image_size: int) -> np.ndarray:
        """``(V, 3, 3)`` float64 ``K_v``: plane-image pixel centres -> view pixel centres."""
        n = image_size
        P = self.plane_size(n)
        L = self.plane_half_width(n)
        # plane pixel centre (px, py) -> world (X, Y); image rows go towards -Y.
        A = np.array([[2 * L / P, 0, -L], [0, -2 * L / P, L], [0, 0, 1]], dtype=np.float64)
        f_top = (n / 2) * self.distance / self.top_half_width
        out = []
        top = self._camera(np.zeros(3), np.array([0.0, 0.0, self.distance]), f_top, n)
        out.append(top @ A)
        for az in np.deg2rad(self.side_azimuths_deg):
            e = np.deg2rad(self.side_elevation_deg)
            direction = np.array([np.cos(az), np.sin(az), 0.0])
            target = self.side_target_shift * direction
            centre = target + self.distance * np.array(
                [np.cos(e) * np.cos(az), np.cos(e) * np.sin(az), np.sin(e)]
            )
            out.append(self._camera(target, centre, f_top * self.side_zoom, n) @ A)
        K = np.stack(out)
        return K / K[:, 2:3, 2:3]

    @staticmethod
    def _camera(target: np.ndarray, centre: np.ndarray, focal: float, n: int) -> np.ndarray:
        """World plane ``(X, Y, 1)`` -> pixel centres of a camera at ``centre`` aiming at
        ``target`` (x right, y down, principal point at the image centre ``n/2``)."""
        R = look_at(target, centre)
        t = -R @ centre
        intrinsics = np.array([[focal, 0, n / 2], [0, focal, n / 2], [0, 0, 1]])
        return intrinsics @ np.column_stack([R[:, 0], R[:, 1], t])

    def homographies(self, image_size: int) -> np.ndarray:
        """``(V, V, 3, 3)`` float64, ``[v, u] = K_u K_v^-1`` (view v -> view u), ``H[2,2] = 1``."""
        return plane_homographies(self.plane_to_view(image_size))


def look_at(target: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """World -> camera rotation (rows: image right, image down, optical axis) of a camera at
    ``centre`` aiming at ``target``; image up is world +Z projected, or world +Y when looking
    straight down."""
    forward = (target - centre) / np.linalg.norm(target - centre)
    up_hint = np.array([0.0, 0.0, 1.0])
    if abs(forward @ up_hint) > 0.999:  # looking straight down: image up = world +Y
        up_hint = np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, up_hint)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    return np.stack([right, down, forward])


def plane_homographies(K: np.ndarray) -> np.ndarray:
    """``(V, 3, 3)`` maps of one plane into each view -> ``(V, V, 3, 3)`` plane-induced
    homographies ``[v, u] = K_u K_v^-1`` (view v -> view u), normalised to ``H[2,2] = 1``."""
    H = K[None, :] @ np.linalg.inv(K)[:, None]
    return H / H[..., 2:3, 2:3]


def _opencv_matrix(H: np.ndarray) -> np.ndarray:
    """Pixel-centre homography -> OpenCV's (integer centres): ``T^-1 H T``, T = shift +0.5."""
    T = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])
    T_inv = np.array([[1, 0, -0.5], [0, 1, -0.5], [0, 0, 1]])
    return T_inv @ H @ T


def supersampled_matrix(K: np.ndarray) -> np.ndarray:
    """OpenCV matrix that renders with ``K`` (source pixel centres -> view pixel centres) at
    twice the view size (``diag(2, 2, 1) K``), for ``warp_supersampled``."""
    return _opencv_matrix(np.diag([2.0, 2.0, 1.0]) @ K)


def warp_supersampled(
    image: np.ndarray,
    matrix: np.ndarray,
    n: int,
    border: float | tuple = 0.0,
    border_mode: int = cv2.BORDER_CONSTANT,
) -> np.ndarray:
    """Inverse-warp ``image`` with ``matrix`` (``supersampled_matrix``) into a ``2n x 2n``
    canvas (bilinear), then box-filter down by two: exact in pixel-centre coordinates (see
    the module docstring)."""
    big = cv2.warpPerspective(
        image,
        matrix,
        (2 * n, 2 * n),
        flags=cv2.INTER_LINEAR,
        borderMode=border_mode,
        borderValue=border,
    )
    return cv2.resize(big, (n, n), interpolation=cv2.INTER_AREA)


def prepare_texture(image: np.ndarray, tint: Sequence[float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """uint8 photograph -> ``(H, W, 3)`` float32 in [0, 1]: grey images tinted, contrast
    stretched a little (1-99 percentiles to 0.12-0.92) so every texture gives SIFT enough to
    match."""
    tex = image.astype(np.float32) / 255.0
    if tex.ndim == 2:
        tex = tex[:, :, None] * np.asarray(tint, dtype=np.float32)
    tex = tex[:, :, :3]
    lo, hi = np.percentile(tex, [1, 99])
    return np.clip((tex - lo) / max(hi - lo, 1e-3) * 0.8 + 0.12, 0.0, 1.0)


# ------------------------------------------------------------------------------ data classes


@dataclass
class SyntheticSample:
    """One rendered sample.

    Attributes:
        number: the 4-digit sample number of the file names.
        anomaly_class: ``"OK"`` or the Real-IAD style defect code (``DEFECT_CODES``).
        images: view token -> ``(N, N, 3)`` uint8 RGB.
        masks: view token -> ``(N, N)`` bool, only for views that see a defect pixel.
        defects: the defect kinds drawn on the plane.
        homographies: ``(V, V, 3, 3)`` this sample's own true homographies (realistic rig,
            where the part's placement varies per sample); ``None`` when they are the
            category's.
    """

    number: int
    anomaly_class: str
    images: dict[str, np.ndarray]
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    defects: list[str] = field(default_factory=list)
    homographies: np.ndarray | None = None

    @property
    def is_anomalous(self) -> bool:
        return bool(self.masks)


@dataclass
class SyntheticCategory:
    """One category in memory: the samples and the true homographies at ``image_size``
    (for the realistic rig: those of the nominal placement; each sample has its own)."""

    name: str
    image_size: int
    train: list[SyntheticSample]
    test: list[SyntheticSample]
    homographies: np.ndarray
    rig: str = "simple"

    def truth_cache(self) -> HomographyCache:
        """The true homographies in the ``vsad-homography`` JSON format (status ok)."""
        pairs = {}
        for i, src in enumerate(VIEWS):
            for j, dst in enumerate(VIEWS):
                if i != j:
                    pairs[HomographyCache.pair_key(src, dst)] = PairEstimate(
                        H=self.homographies[i, j].tolist(),
                        inliers=0,  # exact, not estimated: no matches behind it
                        inlier_ratio=1.0,
                        reproj_error_px=0.0,
                        status="ok",
                    )
        return HomographyCache(
            category=self.name,
            image_size=(self.image_size, self.image_size),
            views=list(VIEWS),
            pairs=pairs,
        )


# ----------------------------------------------------------------------------- the generator


def place_defect(
    rng: np.random.Generator,
    spread: float,
    edge_band: tuple[float, float],
    edge_spread: float,
    edge_scale: float,
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Where a defect goes, in object coordinates (the object spans ``[-1, 1]^2``).

    Half of the defects go anywhere within ``spread`` of the centre (``along`` is ``None``,
    ``scale`` 1); the other half, ``edge_scale`` times smaller, go along one edge, at a distance
    in ``edge_band`` from the centre and within ``edge_spread`` along the edge (``along``: the
    edge's direction), where some side cameras do not look. Returns ``(centre, scale, along)``.
    """
    if rng.random() < 0.5:
        return rng.uniform(-spread, spread, size=2), 1.0, None
    side = int(rng.integers(4)) * np.pi / 2
    normal = np.array([np.cos(side), np.sin(side)])
    along = np.array([-normal[1], normal[0]])
    centre = rng.uniform(*edge_band) * normal + rng.uniform(-edge_spread, edge_spread) * along
    return centre, edge_scale, along


class SyntheticMultiView:
    """Renders samples of one category.

    Args:
        category: a name from ``CATEGORIES`` (chooses the texture).
        image_size: side of the square views in pixels.
        rig: the camera rig.
    """

    def __init__(self, category: str, image_size: int = 128, rig: Rig | None = None) -> None:
        if category not in _TEXTURES:
            raise DataError(f"unknown synthetic category {category!r}; available: {CATEGORIES}")
        if image_size < 32:
            raise DataError(f"synthetic image size {image_size} is too small (minimum 32)")
        self.category = category
        self.image_size = image_size
        self.rig = rig or Rig()
        self.plane_size = self.rig.plane_size(image_size)
        K = self.rig.plane_to_view(image_size)
        # Render at twice the size, then box-filter down (see the module docstring).
        self._warp_matrices = [supersampled_matrix(k) for k in K]
        self._texture = self._load_texture()
        P = self.plane_size
        self._half_width = self.rig.plane_half_width(image_size)
        coords = (np.arange(P) + 0.5) / image_size - self._half_width
        self._plane_x = coords[None, :].astype(np.float32)  # world X per plane column
        self._plane_y = -coords[:, None].astype(np.float32)  # world Y per plane row
        self._object = self._object_mask()

    def homographies(self) -> np.ndarray:
        """``(V, V, 3, 3)`` float64 true homographies at ``image_size``."""
        return self.rig.homographies(self.image_size)

    def plane_to_view(self) -> np.ndarray:
        """``(V, 3, 3)`` ``K_v``: plane-image pixel centres -> view pixel centres."""
        return self.rig.plane_to_view(self.image_size)

    # -- plane content

    def _load_texture(self) -> np.ndarray:
        loader, tint = _TEXTURES[self.category]
        return prepare_texture(loader(), tint)

    def _object_mask(self) -> np.ndarray:
        """The object on the plane: a rounded square ``[-1, 1]^2`` (corner radius 0.2)."""
        r = 0.2
        dx = np.maximum(np.abs(self._plane_x) - (1 - r), 0)
        dy = np.maximum(np.abs(self._plane_y) - (1 - r), 0)
        return (dx**2 + dy**2) <= r**2

    def _plane_image(self, rng: np.random.Generator) -> np.ndarray:
        """``(P, P, 3)`` float32: the texture (shifted and colour-jittered) on the background."""
        P, n = self.plane_size, self.image_size
        tex = self._texture
        side = int(min(tex.shape[:2]) * TEXTURE_CROP)
        max_shift = (min(tex.shape[:2]) - side) // 2
        # Normal variation: a small texture shift (<= 4 source px) and colour jitter.
        oy, ox = (np.array(tex.shape[:2]) - side) // 2 + rng.integers(-4, 5, size=2).clip(
            -max_shift, max_shift
        )
        crop = tex[oy : oy + side, ox : ox + side]
        obj_px = 2 * n  # the object spans 2 world units at n px per unit
        crop = cv2.resize(crop, (obj_px, obj_px), interpolation=cv2.INTER_AREA)
        gain = rng.uniform(0.96, 1.04, size=3).astype(np.float32)
        crop = np.clip(crop * gain + rng.uniform(-0.02, 0.02), 0, 1)
        plane = np.broadcast_to(BACKGROUND_RGB, (P, P, 3)).copy()
        start = P // 2 - n  # the object [-1, 1] covers plane pixels [P/2 - n, P/2 + n)
        region = plane[start : start + obj_px, start : start + obj_px]
        obj = self._object[start : start + obj_px, start : start + obj_px]
        region[obj] = crop[obj]
        return plane

    # -- defects, drawn on the plane

    def _world_to_plane_px(self, xy: np.ndarray) -> np.ndarray:
        """World ``(..., 2)`` -> plane pixel indices (OpenCV drawing: integer centres)."""
        n, L = self.image_size, self._half_width
        px = (xy[..., 0] + L) * n - 0.5
        py = (L - xy[..., 1]) * n - 0.5
        return np.stack([px, py], axis=-1)

    def _draw_defect(self, plane: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
        """Draw one defect in place; return its ``(P, P)`` bool mask on the plane.

        Half of the defects go anywhere on the object; the other half, smaller, go along one
        edge, in the band the opposite side camera does not see (``EDGE_BAND``), so that NG
        samples have normal views, as in Real-IAD.
        """
        P, n = self.plane_size, self.image_size
        centre, scale, along = place_defect(rng, 0.82, EDGE_BAND, 0.6, 0.55)
        canvas = np.zeros((P, P), dtype=np.uint8)
        shift = 4  # sub-pixel drawing precision for OpenCV (coordinates * 2^shift)
        if kind == "scratch":
            n_points = int(rng.integers(2, 4))
            angle = rng.uniform(0, np.pi) if along is None else np.arctan2(along[1], along[0])
            steps = rng.uniform(0.12, 0.25, size=n_points - 1) * scale
            angles = angle + np.concatenate(
                [[0.0], np.cumsum(rng.uniform(-0.5, 0.5, n_points - 2))]
            )
            deltas = np.stack([np.cos(angles), np.sin(angles)], axis=-1) * steps[:, None]
            points = centre + np.concatenate([[np.zeros(2)], np.cumsum(deltas, axis=0)])
            points = np.clip(points, -0.92, 0.92)
            px = np.round(self._world_to_plane_px(points) * (1 << shift)).astype(np.int32)
            thickness = max(2, int(round(n / 48)))
            cv2.polylines(canvas, [px], False, 255, thickness, cv2.LINE_8, shift)
            mask = (canvas > 0) & self._object
            tone = rng.choice([0.12, 0.95])  # a dark groove or a bright scuff
            plane[mask] = 0.25 * plane[mask] + 0.75 * tone
        elif kind == "stain":
            axes_world = rng.uniform(0.08, 0.17, size=2) * scale
            self._ellipse(canvas, centre, axes_world, rng.uniform(0, 180), shift)
            mask = (canvas > 0) & self._object
            colour = rng.uniform(-1, 1, size=3).astype(np.float32)
            colour = 0.16 * colour / np.abs(colour).max()  # low contrast colour shift
            soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(1.0, n / 64))
            plane += soft[:, :, None] * colour
            np.clip(plane, 0, 1, out=plane)
            mask = (soft > 0.5) & self._object
        elif kind == "hole":
            axes_world = rng.uniform(0.07, 0.14, size=2) * scale
            self._ellipse(canvas, centre, axes_world, rng.uniform(0, 180), shift)
            mask = (canvas > 0) & self._object
            plane[mask] = BACKGROUND_RGB
        else:
            raise ValueError(f"unknown defect kind {kind!r}; expected one of {list(DEFECT_CODES)}")
        return mask

    def _ellipse(self, canvas, centre, axes_world, angle_deg, shift) -> None:
        c = np.round(self._world_to_plane_px(centre) * (1 << shift)).astype(int)
        axes = np.round(axes_world * self.image_size * (1 << shift)).astype(int)
        cv2.ellipse(canvas, tuple(c), tuple(axes), angle_deg, 0, 360, 255, -1, cv2.LINE_8, shift)

    # -- the views

    def warp_plane(self, plane: np.ndarray, view: int, border: float | tuple = 0.0) -> np.ndarray:
        """Render a ``(P, P[, C])`` float32 plane image into view ``view`` (index into VIEWS).

        Inverse warping with ``K_view`` at twice the size, then a 2x2 box filter: exact in
        pixel-centre coordinates (see the module docstring). ``border`` fills what lies
        outside the plane image.
        """
        return warp_supersampled(plane, self._warp_matrices[view], self.image_size, border)

    def _lighting(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``(V, N, N, 1)`` multiplicative gain and ``(V, N, N, 1)`` additive highlight, fixed in
        camera coordinates (benign view-dependent variation)."""
        n, V = self.image_size, len(VIEWS)
        c = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
        gx, gy = c[None, None, :], c[None, :, None]
        gain = rng.uniform(0.85, 1.12, size=(V, 1, 1))
        phi = rng.uniform(0, 2 * np.pi, size=(V, 1, 1))
        slope = rng.uniform(0.0, 0.25, size=(V, 1, 1))
        shading = gain * (1 + slope * (gx * np.cos(phi) + gy * np.sin(phi)))
        # One highlight per camera, at a camera-specific place (jittered per sample).
        base = np.array([[-0.2, -0.22], [0.22, -0.2], [0.2, 0.22], [-0.22, 0.2], [0.0, -0.25]])
        centres = base[:V] + rng.uniform(-0.05, 0.05, size=(V, 2))
        sigma = rng.uniform(0.08, 0.14, size=(V, 1, 1))
        amp = rng.uniform(0.08, 0.22, size=(V, 1, 1))
        d2 = (gx - centres[:, 0, None, None]) ** 2 + (gy - centres[:, 1, None, None]) ** 2
        highlight = amp * np.exp(-d2 / (2 * sigma**2))
        return shading[..., None].astype(np.float32), highlight[..., None].astype(np.float32)

    def render(
        self, rng: np.random.Generator, defects: Sequence[str] = ()
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Render one sample: ``(images, masks)`` keyed by view token.

        ``masks`` only holds views where at least one defect pixel is visible.
        """
        plane = self._plane_image(rng)
        plane_mask = np.zeros(plane.shape[:2], dtype=bool)
        for kind in defects:
            plane_mask |= self._draw_defect(plane, kind, rng)
        shading, highlight = self._lighting(rng)
        noise = rng.normal(0.0, 1.2 / 255, size=(len(VIEWS), self.image_size, self.image_size, 3))
        images, masks = {}, {}
        border = tuple(float(x) for x in BACKGROUND_RGB)
        for v, view in enumerate(VIEWS):
            img = self.warp_plane(plane, v, border) * shading[v] + highlight[v] + noise[v]
            images[view] = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
            if defects:
                m = self.warp_plane(plane_mask.astype(np.float32), v) >= 0.5
                if m.any():
                    masks[view] = m
        return images, masks


def _category_rng(name: str, seed: int) -> np.random.Generator:
    """Independent of the other categories generated alongside (order does not matter)."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def _resolve_sizes(
    rig: str, image_size: int | None, samples_train: int | None, samples_test: int | None
) -> tuple[int, int, int]:
    """``None`` -> the rig's default (``RIG_DEFAULTS``); checks the counts."""
    defaults = RIG_DEFAULTS[_check_rig(rig)]
    image_size = defaults["image_size"] if image_size is None else image_size
    samples_train = defaults["samples_train"] if samples_train is None else samples_train
    samples_test = defaults["samples_test"] if samples_test is None else samples_test
    if samples_train < 1 or samples_test < 0:
        raise DataError(
            f"need >= 1 training sample and >= 0 test samples, got {samples_train}, {samples_test}"
        )
    return image_size, samples_train, samples_test


def anomalous_test_indices(
    rng: np.random.Generator, samples_test: int, anomaly_fraction: float
) -> set[int]:
    """``round(samples_test * anomaly_fraction)`` test indices, spread at random."""
    if not 0.0 <= anomaly_fraction <= 1.0:
        raise DataError(f"anomaly_fraction must be in [0, 1], got {anomaly_fraction}")
    n_bad = int(round(samples_test * anomaly_fraction))
    return set(rng.permutation(samples_test)[:n_bad].tolist())


def render_samples(
    name: str,
    render: Callable[[np.random.Generator, Sequence[str]], tuple],
    rng: np.random.Generator,
    samples_train: int,
    samples_test: int,
    anomaly_fraction: float,
    codes: dict[str, str],
) -> tuple[list[SyntheticSample], list[SyntheticSample]]:
    """The samples of one category, for either rig: ``samples_train`` normals, then
    ``samples_test`` test samples of which ``round(samples_test * anomaly_fraction)``, spread
    at random, carry one or two defects of one kind (``codes``: kind -> anomaly class).

    ``render(rng, defects) -> (images, masks, homographies or None)`` draws one sample. Sample
    numbers run 1..train+test, train first; every random draw comes from ``rng`` in a fixed
    order, so a seed gives the same samples.
    """
    bad = anomalous_test_indices(rng, samples_test, anomaly_fraction)
    kinds = list(codes)
    train = []
    for i in range(samples_train):
        images, _, H = render(rng, ())
        train.append(SyntheticSample(i + 1, "OK", images, homographies=H))
    test = []
    for i in range(samples_test):
        number = samples_train + i + 1
        if i in bad:
            kind = kinds[int(rng.integers(len(kinds)))]
            defects = [kind] * int(rng.integers(1, 3))
            images, masks, H = render(rng, defects)
            if not masks:  # cannot happen: C1 sees the whole object; guard the invariant
                raise RuntimeError(f"{name} sample {number}: the defect is visible in no view")
            test.append(SyntheticSample(number, codes[kind], images, masks, defects, H))
        else:
            images, _, H = render(rng, ())
            test.append(SyntheticSample(number, "OK", images, homographies=H))
    return train, test


def generate_category(
    name: str,
    seed: int = 0,
    *,
    image_size: int | None = None,
    samples_train: int | None = None,
    samples_test: int | None = None,
    anomaly_fraction: float = 0.5,
    rig: Rig | str | None = None,
) -> SyntheticCategory:
    """Render one category in memory.

    ``rig``: ``"simple"`` (default; or a ``Rig`` to change its cameras) or ``"realistic"``
    (``realistic_rig.generate_realistic_category``). Sizes left ``None`` take the rig's
    defaults (``RIG_DEFAULTS``).

    Simple rig: training samples are all normal. ``round(samples_test * anomaly_fraction)``
    test samples carry one or two defects of one kind (scratch, stain or hole; the kind gives
    the anomaly class); the others are normal. Sample numbers run 1..train+test, train first;
    the anomalous test samples are spread at random among the test numbers.
    """
    rig_name = rig if isinstance(rig, str) else "simple"
    image_size, samples_train, samples_test = _resolve_sizes(
        rig_name, image_size, samples_train, samples_test
    )
    if rig_name == "realistic":
        from vsad_lightning.data.realistic_rig import generate_realistic_category

        return generate_realistic_category(
            name,
            seed,
            image_size=image_size,
            samples_train=samples_train,
            samples_test=samples_test,
            anomaly_fraction=anomaly_fraction,
        )
    gen = SyntheticMultiView(name, image_size, None if isinstance(rig, str) else rig)
    rng = _category_rng(name, seed)

    def render(rng: np.random.Generator, defects: Sequence[str]):
        images, masks = gen.render(rng, defects)
        return images, masks, None

    train, test = render_samples(
        name, render, rng, samples_train, samples_test, anomaly_fraction, DEFECT_CODES
    )
    return SyntheticCategory(name, image_size, train, test, gen.homographies())


# ------------------------------------------------------------------- writing Real-IAD layout

TRUTH_DIR = "synthetic_truth"
"""``<root>/synthetic_truth/<category>.json``: the true homographies (HomographyCache JSON);
for the realistic rig also ``<category>_samples.json``, each sample's own (``write_category``)."""

GENERATOR_TAG = "vsad-synth"
_FIRST_CAPTURE = datetime.datetime(2023, 9, 22, 9, 0, 0)


def sample_id(category: str, sample: SyntheticSample) -> str:
    """The sample key the Real-IAD loader builds from the file names: ``<cat>_0031_NG``."""
    return f"{category}_{sample.number:04d}_{'OK' if sample.anomaly_class == 'OK' else 'NG'}"


def _relative_paths(category: str, sample: SyntheticSample, view: str, stamp: str) -> tuple:
    """Real-IAD naming: ``OK/S0001/<cat>_0001_OK_C1_<stamp>.jpg`` and
    ``NG/<code>/S0031/<cat>_0031_NG_C1_<stamp>.jpg`` with the mask ``... .png`` beside it."""
    ok = sample.anomaly_class == "OK"
    folder = f"OK/S{sample.number:04d}" if ok else f"NG/{sample.anomaly_class}/S{sample.number:04d}"
    stem = f"{sample_id(category, sample)}_{view}_{stamp}"
    return f"{folder}/{stem}.jpg", f"{folder}/{stem}.png"


def sample_truth_path(root: str | os.PathLike, category: str) -> Path:
    """``<root>/synthetic_truth/<category>_samples.json`` (realistic rig)."""
    return Path(root) / TRUTH_DIR / f"{category}_samples.json"


def sample_truth_document(data: SyntheticCategory) -> dict:
    """Each sample's true homographies: ``{"image_size": [W, H], "samples": {"<cat>_0001_OK":
    {"C1->C2": {"H": 3x3}, ... every ordered pair}}}``, pixel-centre convention, view ``v``
    pixel coordinates -> view ``u`` for key ``"v->u"``, at the written image size."""
    samples = {}
    for sample in [*data.train, *data.test]:
        if sample.homographies is None:
            raise ValueError(f"{data.name} sample {sample.number} has no per-sample homographies")
        samples[sample_id(data.name, sample)] = {
            HomographyCache.pair_key(src, dst): {"H": sample.homographies[i, j].tolist()}
            for i, src in enumerate(VIEWS)
            for j, dst in enumerate(VIEWS)
            if i != j
        }
    return {"image_size": [data.image_size, data.image_size], "samples": samples}


def write_category(
    data: SyntheticCategory, root: str | os.PathLike, seed: int = 0, *, overwrite: bool = False
) -> Path:
    """Write one category in the exact Real-IAD layout; returns its JSON split file.

    Files: ``realiad_<N>/<category>/...`` (JPEG quality 95 images, 0/255 PNG masks),
    ``realiad_jsons/<category>.json`` (entries shuffled, as in the real lists, whose order is
    arbitrary; ``meta.rig`` names the rig, absent for the simple one) and
    ``synthetic_truth/<category>.json``, plus ``synthetic_truth/<category>_samples.json`` when
    the samples carry their own homographies (``sample_truth_document``; realistic rig).
    Capture timestamps are drawn from the
    seed, so files are byte-identical for the same seed. An existing category folder is only
    replaced with ``overwrite=True`` and only when ``vsad-synth`` wrote it.
    """
    root = Path(root)
    name = data.name
    category_dir = root / f"realiad_{data.image_size}" / name
    json_path = root / "realiad_jsons" / f"{name}.json"
    if category_dir.exists():
        if not overwrite:
            raise DataError(f"{category_dir} already exists; pass --overwrite to replace it")
        try:
            meta = json.loads(json_path.read_text(encoding="utf-8")).get("meta", {})
        except (OSError, ValueError, AttributeError):
            meta = {}
        if meta.get("generator") != GENERATOR_TAG:
            raise DataError(f"{category_dir} was not written by vsad-synth; not replacing it")
        shutil.rmtree(category_dir)
        # A cache estimated from the old images no longer describes the new ones.
        cache_path_for(root, name, data.image_size).unlink(missing_ok=True)
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8")), 1])
    clock = _FIRST_CAPTURE
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for split, samples in (("train", data.train), ("test", data.test)):
        for sample in samples:
            clock += datetime.timedelta(seconds=int(rng.integers(20, 90)))
            for v, view in enumerate(VIEWS):
                stamp = (clock + datetime.timedelta(seconds=v)).strftime("%Y%m%d%H%M%S")
                image_rel, mask_rel = _relative_paths(name, sample, view, stamp)
                write_jpeg(category_dir / image_rel, sample.images[view], quality=95)
                mask = sample.masks.get(view)
                if mask is not None:
                    write_mask_png(category_dir / mask_rel, mask)
                splits[split].append(
                    {
                        "category": name,
                        "anomaly_class": sample.anomaly_class,
                        "image_path": image_rel,
                        "mask_path": mask_rel if mask is not None else None,
                    }
                )
    document = {
        "meta": {
            "prefix": "",
            "normal_class": "OK",
            "generator": GENERATOR_TAG,
            "seed": int(seed),
            "image_size": data.image_size,
            "views": list(VIEWS),
            # The simple rig's files predate the key: leave them byte-identical.
            **({"rig": data.rig} if data.rig != "simple" else {}),
        },
        "train": [splits["train"][i] for i in rng.permutation(len(splits["train"]))],
        "test": [splits["test"][i] for i in rng.permutation(len(splits["test"]))],
    }
    atomic_write_json(json_path, document)
    data.truth_cache().save(root / TRUTH_DIR / f"{name}.json")
    per_sample = sample_truth_path(root, name)
    if any(s.homographies is not None for s in [*data.train, *data.test]):
        per_sample.parent.mkdir(parents=True, exist_ok=True)
        # Compact: 20 matrices per sample; indenting would triple the file.
        text = json.dumps(sample_truth_document(data), separators=(",", ":")) + "\n"
        atomic_write_text(per_sample, text)
    else:  # a simple-rig category replacing a realistic one
        per_sample.unlink(missing_ok=True)
    return json_path


def write_synthetic_dataset(
    root: str | os.PathLike,
    categories: str | int | Sequence[str] = 3,
    seed: int = 0,
    *,
    image_size: int | None = None,
    samples_train: int | None = None,
    samples_test: int | None = None,
    anomaly_fraction: float = 0.5,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    rig: str = "simple",
) -> list[str]:
    """Generate and write several categories (``vsad-synth``); returns their names.

    ``rig``: ``"simple"`` or ``"realistic"``; sizes left ``None`` take the rig's defaults
    (``RIG_DEFAULTS``)."""
    names = resolve_categories(categories, rig)
    image_size, samples_train, samples_test = _resolve_sizes(
        rig, image_size, samples_train, samples_test
    )
    for name in names:
        start = time.perf_counter()
        data = generate_category(
            name,
            seed,
            image_size=image_size,
            samples_train=samples_train,
            samples_test=samples_test,
            anomaly_fraction=anomaly_fraction,
            rig=rig,
        )
        write_category(data, root, seed, overwrite=overwrite)
        if progress is not None:
            n_bad = sum(s.is_anomalous for s in data.test)
            progress(
                f"{name}: {len(data.train)} train, {len(data.test)} test ({n_bad} anomalous) -> "
                f"{Path(root) / f'realiad_{image_size}' / name} "
                f"({time.perf_counter() - start:.1f} s)"
            )
    return names
