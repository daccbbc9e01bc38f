"""A realistic five-camera inspection rig (``vsad-synth --rig realistic``).

The simple rig (``vsad_lightning.data.synthetic``) renders one flat plane under five cameras
with exact, fixed homographies. Real photographs differ in ways that rig leaves out; this one
puts them back, so that alignment and scoring can be measured and tuned on them:

- **Perspective.** C1 looks down from above; C2..C5 look from four sides at an elevation of
  55 deg (35 deg from the top camera), each with its own roll (camera rotation about its
  optical axis), focal length and principal point (``RealisticRig``). A side camera aims past
  the centre towards its own side, so its view ends before the far edge of the part.
- **Placement.** The part is a plate of height ``part_height`` lying on a table. Every sample
  places it anew (``Placement``): a shift and an in-plane rotation, which move it without
  changing the homographies its plane induces, plus a tilt of 1.5-2.2 deg and a height change
  of up to +-0.02 half-widths, which do. Each sample's TRUE view-to-view homographies (those
  of the part's plane) therefore differ from the category's nominal ones (the untilted plane
  at ``part_height``) by about 1-3 px at 256 px (median over the part ~1.7 px); both are
  written (``synthetic.write_category``).
- **Background.** The table around the part (a low-contrast photograph) is rendered with the
  table plane's homographies, which differ from the part's; the part's outline, its side walls
  and a soft contact shadow move with the placement. Holes show the table through the part.
- **Light.** Four lights, one opposite each side camera (jittered per sample), give a Lambert
  term and Blinn-Phong specular highlights computed from the light, camera and part geometry,
  so each side camera sees its highlight at its own place on the part, moving with the
  viewpoint and the placement; some nearly saturate. Per sample: exposure and white balance;
  per view: a gain, fixed vignetting and sensor noise.
- **Surfaces.** Busy, high-frequency textures (``REALISTIC_CATEGORIES``): photographs from
  ``skimage.data`` (shipped with scikit-image, no download), a procedural circuit board on a
  photo-derived substrate (``circuit_board_texture``) and a repetitive facade
  (``facade_texture``).
- **Defects** (test only), drawn on the part, so geometrically consistent across views:
  thin scratches (1-2 px at 256 px, ``HS``), faint soft stains (``ZW``), holes showing the
  table (``QS``) and pasted patches of a foreign texture (``YW``, foreign object).

Visibility rule (which views have a mask): a view has a mask exactly when at least one of its
pixels is at least half covered by the defect (the defect's part-plane mask, warped with the
same supersampling as the images, thresholded at 0.5). C1 sees the whole part, so every
anomalous sample has a C1 mask. About half of the defects are placed along one edge, in the
band ``EDGE_BAND`` (0.8-0.9 of the part's half-width from its centre) that the side camera
opposite that edge does not see: with the nominal placement its field of view ends at 0.71-0.78
towards that edge. The side views also end at 0.8-0.96 towards their lateral edges (rolled
frames), so an adjacent side camera misses some edge defects too. Such NG samples have normal
views, as in Real-IAD.

Everything is a function of ``(category, seed)``: the same seed writes byte-identical files.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import skimage.data

from vsad_lightning.data.synthetic import (
    _TEXTURES,
    VIEWS,
    SyntheticCategory,
    _category_rng,
    look_at,
    place_defect,
    plane_homographies,
    prepare_texture,
    render_samples,
    supersampled_matrix,
    warp_supersampled,
)
from vsad_lightning.errors import DataError

REALISTIC_DEFECT_CODES = {"scratch": "HS", "stain": "ZW", "hole": "QS", "patch": "YW"}
"""Defect kind -> anomaly class in the JSON: HS scratch, ZW contamination (stain), QS missing
part (hole), YW foreign object (a pasted patch of another texture)."""

EDGE_BAND = (0.8, 0.9)
"""Distance (in part half-widths) from the part's centre of edge defects: beyond what the
opposite side camera sees, inside the part (1.0)."""

# ------------------------------------------------------------------------------ the textures


def circuit_board_texture(size: int = 512) -> np.ndarray:
    """A busy circuit-board-like surface, ``(size, size, 3)`` uint8 RGB.

    Procedural (OpenCV drawing, fixed seed): a solder-mask green substrate whose grain is a
    real photograph (``skimage.data.gravel``), copper traces in 45 deg steps, pads, vias, chips
    with pin rows and silkscreen labels. Not a photograph of a board: it stands in for one.
    """
    rng = np.random.default_rng(20230922)
    grain = cv2.resize(skimage.data.gravel(), (size, size), interpolation=cv2.INTER_AREA)
    grain = grain.astype(np.float32) / 255.0
    board = (0.75 + 0.5 * (grain - grain.mean()))[:, :, None] * np.float32([0.12, 0.36, 0.17])
    board = np.clip(board * 255, 0, 255).astype(np.uint8)
    s = size / 512
    copper = (150, 140, 60)
    for _ in range(90):  # traces: 2-4 segments in multiples of 45 deg
        p = rng.uniform(0, size, size=2)
        points = [p.copy()]
        for _ in range(int(rng.integers(2, 5))):
            angle = int(rng.integers(8)) * np.pi / 4
            p = p + rng.uniform(20, 90) * s * np.array([np.cos(angle), np.sin(angle)])
            points.append(p.copy())
        pts = np.round(np.array(points)).astype(np.int32)
        width = max(1, int(round(rng.uniform(1.5, 4.5) * s)))
        cv2.polylines(board, [pts], False, copper, width, cv2.LINE_AA)
        for end in (pts[0], pts[-1]):  # a pad or a via at each end
            if rng.random() < 0.5:
                cv2.circle(board, tuple(int(v) for v in end), int(5 * s), (200, 190, 120), -1)
                cv2.circle(board, tuple(int(v) for v in end), max(1, int(2 * s)), (20, 25, 20), -1)
            else:
                half = int(4 * s)
                x, y = (int(v) for v in end)
                cv2.rectangle(
                    board, (x - half, y - half), (x + half, y + half), (215, 205, 150), -1
                )
    for _ in range(9):  # chips with pins and a label
        w, h = (int(v) for v in rng.uniform(40, 110, size=2) * s)
        x, y = (int(v) for v in rng.uniform(0, size - max(w, h), size=2))
        pitch = max(3, int(8 * s))
        for px in range(x + pitch // 2, x + w - 1, pitch):
            cv2.rectangle(
                board,
                (px, y - int(6 * s)),
                (px + pitch // 3, y + h + int(6 * s)),
                (190, 190, 185),
                -1,
            )
        cv2.rectangle(board, (x, y), (x + w, y + h), (22, 22, 26), -1)
        cv2.circle(board, (x + int(6 * s), y + int(6 * s)), max(1, int(3 * s)), (60, 60, 65), -1)
        label = f"U{int(rng.integers(1, 40))}"
        cv2.putText(
            board,
            label,
            (x + int(8 * s), y + h - int(8 * s)),
            cv2.FONT_HERSHEY_PLAIN,
            0.9 * s,
            (225, 225, 215),
            1,
            cv2.LINE_AA,
        )
    for _ in range(25):  # silkscreen component outlines and labels
        x, y = (int(v) for v in rng.uniform(0, size - 40 * s, size=2))
        w, h = (int(v) for v in rng.uniform(10, 30, size=2) * s)
        cv2.rectangle(board, (x, y), (x + w, y + h), (230, 230, 220), 1, cv2.LINE_AA)
        cv2.putText(
            board,
            f"R{int(rng.integers(1, 99))}",
            (x, y - 2),
            cv2.FONT_HERSHEY_PLAIN,
            0.7 * s,
            (230, 230, 220),
            1,
            cv2.LINE_AA,
        )
    return board


def facade_texture(size: int = 512, tiles: int = 6) -> np.ndarray:
    """A repetitive building-facade-like surface, ``(size, size, 3)`` uint8 RGB.

    A wall (``skimage.data.brick``, tinted sandstone) with a ``tiles x tiles`` grid of windows,
    each cut from the same real photograph (the lattice tower against the dusk sky of
    ``skimage.data.rocket``) with small per-tile variation (crop offset, brightness, blind
    height; fixed seed). Repetition makes feature matching ambiguous, as on real facades.
    """
    rng = np.random.default_rng(19700101)
    wall = cv2.resize(skimage.data.brick(), (size, size), interpolation=cv2.INTER_AREA)
    wall = wall.astype(np.float32)[:, :, None] / 255.0 * np.float32([0.95, 0.82, 0.64])
    out = np.clip(0.25 + 0.7 * wall, 0, 1)
    photo = skimage.data.rocket().astype(np.float32) / 255.0
    cell = size / tiles
    win_w, win_h = int(cell * 0.56), int(cell * 0.68)
    for row in range(tiles):
        for col in range(tiles):
            dy, dx = rng.integers(-5, 6, size=2)
            crop = photo[120 + dy : 240 + dy, 555 + dx : 635 + dx]
            glass = cv2.resize(crop, (win_w, win_h), interpolation=cv2.INTER_AREA)
            glass = glass * rng.uniform(0.85, 1.15) + 0.05
            blind = int(win_h * rng.uniform(0.0, 0.45))
            glass[:blind] = glass[:blind] * 0.3 + np.float32([0.62, 0.6, 0.55]) * 0.7
            x0 = int(col * cell + (cell - win_w) / 2)
            y0 = int(row * cell + (cell - win_h) / 2)
            frame = 3
            out[y0 - frame : y0 + win_h + frame, x0 - frame : x0 + win_w + frame] = 0.88
            out[y0 : y0 + win_h, x0 : x0 + win_w] = np.clip(glass, 0, 1)
            out[y0 + win_h + frame : y0 + win_h + 2 * frame + 2, x0 - 6 : x0 + win_w + 6] = 0.7
    return np.clip(out * 255, 0, 255).astype(np.uint8)


# Category -> (loader of a uint8 image, tint for grey images, fraction of the shorter side
# that covers the part). Smaller fractions zoom in: coarser texture at 256 px.
_REALISTIC_TEXTURES: dict[str, tuple[Callable[[], np.ndarray], tuple[float, ...], float]] = {
    "brick": (*_TEXTURES["brick"], 0.7),
    "gravel": (*_TEXTURES["gravel"], 0.7),
    "coffee": (*_TEXTURES["coffee"], 0.8),
    "fur": (skimage.data.chelsea, (1.0, 1.0, 1.0), 0.8),
    "painting": (skimage.data.astronaut, (1.0, 1.0, 1.0), 0.8),
    "tissue": (skimage.data.immunohistochemistry, (1.0, 1.0, 1.0), 0.6),
    "board": (circuit_board_texture, (1.0, 1.0, 1.0), 0.9),
    "facade": (facade_texture, (1.0, 1.0, 1.0), 0.9),
}
REALISTIC_CATEGORIES = tuple(_REALISTIC_TEXTURES)
"""Categories of the realistic rig (``--categories 3`` takes brick, gravel, coffee)."""

# Foreign patches (``YW``) are cut from these, never from the category's own texture.
_FOREIGN_SOURCES = ("coins", "rocket", "hubble_deep_field", "text", "retina")


@functools.lru_cache(maxsize=len(_FOREIGN_SOURCES))
def _foreign_texture(name: str) -> np.ndarray:
    """A foreign photograph, prepared once (some are large: retina is 1411 px)."""
    image = prepare_texture(getattr(skimage.data, name)())
    image.flags.writeable = False
    return image


SHADING_STEP = 4
"""Lighting is evaluated every SHADING_STEP px and interpolated (it varies smoothly)."""

_TABLE_RGB = np.float32([0.36, 0.37, 0.40])
"""Mean colour of the table; its texture (``skimage.data.grass``) has +-0.05 contrast."""


# ----------------------------------------------------------------------------- the camera rig


@dataclass(frozen=True)
class Placement:
    """Where one sample's part lies. World units: the part spans ``[-1, 1]^2`` in its own
    coordinates ``(u, v)``; the table is the plane ``z = 0``.

    Attributes:
        shift: ``(x, y)`` of the part's centre on the table.
        rotation_deg: in-plane rotation about the vertical axis.
        tilt_deg: rotation of the part's plane about the horizontal axis at ``tilt_axis_deg``
            (through the part's centre).
        tilt_axis_deg: direction of that axis in the table plane.
        height: ``z`` of the part's top face at its centre.
    """

    shift: tuple[float, float] = (0.0, 0.0)
    rotation_deg: float = 0.0
    tilt_deg: float = 0.0
    tilt_axis_deg: float = 0.0
    height: float = 0.1

    def pose(self) -> tuple[np.ndarray, np.ndarray]:
        """``(R, t)``: world point of part coordinates ``(u, v)`` is ``R [u, v, 0] + t``."""
        a = np.deg2rad(self.rotation_deg)
        Rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        b = np.deg2rad(self.tilt_axis_deg)
        axis = np.array([np.cos(b), np.sin(b), 0.0])
        tilt, _ = cv2.Rodrigues(axis * np.deg2rad(self.tilt_deg))
        return tilt @ Rz, np.array([self.shift[0], self.shift[1], self.height])

    def plane_matrix(self) -> np.ndarray:
        """``(4, 3)``: part coordinates ``(u, v, 1)`` -> homogeneous world points."""
        R, t = self.pose()
        return np.array([[*R[:, 0], 0.0], [*R[:, 1], 0.0], [*t, 1.0]]).T


TABLE_PLANE = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1]])
"""``(4, 3)``: table coordinates ``(X, Y, 1)`` -> homogeneous world points (``z = 0``)."""


@dataclass(frozen=True)
class RealisticRig:
    """Five pinhole cameras (C1 top, C2..C5 sides in ring order) above the table.

    Attributes:
        top_height: C1's height above the part's nominal top face.
        top_half_width: half of the part-plane width C1 sees across its image (before roll).
        side_distance: distance of the side cameras to their aim point.
        side_elevation_deg: elevation of C2..C5 (90 = top); 55 is 35 deg from C1's axis.
        side_azimuths_deg: azimuths of C2..C5 (not exactly 90 deg apart, as when mounted by
            hand).
        side_target_shift: a side camera aims this far from the centre towards its own side,
            so it misses the far edge of the part (``EDGE_BAND``).
        zoom: focal length of C1..C5 relative to C1's nominal one.
        roll_deg: rotation of C1..C5 about their optical axes.
        principal_offset: principal point of C1..C5 minus the image centre, in image widths.
        part_height: nominal height of the part's top face (``Placement.height``).
    """

    top_height: float = 3.2
    top_half_width: float = 1.3
    side_distance: float = 3.0
    side_elevation_deg: float = 55.0
    side_azimuths_deg: tuple[float, ...] = (1.5, 92.0, 178.0, 271.0)
    side_target_shift: float = 0.5
    zoom: tuple[float, ...] = (1.0, 1.5, 1.55, 1.47, 1.52)
    roll_deg: tuple[float, ...] = (2.5, -7.0, 12.0, -4.0, 15.0)
    principal_offset: tuple[tuple[float, float], ...] = (
        (0.008, -0.006),
        (-0.012, 0.010),
        (0.015, 0.004),
        (-0.006, -0.014),
        (0.010, 0.012),
    )
    part_height: float = 0.1

    def centres_and_targets(self) -> tuple[np.ndarray, np.ndarray]:
        """``(V, 3)`` camera centres and ``(V, 3)`` aim points (world)."""
        h = self.part_height
        centres = [np.array([0.0, 0.0, h + self.top_height])]
        targets = [np.array([0.0, 0.0, h])]
        e = np.deg2rad(self.side_elevation_deg)
        for az in np.deg2rad(self.side_azimuths_deg):
            direction = np.array([np.cos(az), np.sin(az), 0.0])
            target = self.side_target_shift * direction + np.array([0.0, 0.0, h])
            offset = np.array([np.cos(e) * np.cos(az), np.cos(e) * np.sin(az), np.sin(e)])
            centres.append(target + self.side_distance * offset)
            targets.append(target)
        return np.stack(centres), np.stack(targets)

    def projections(self, image_size: int) -> np.ndarray:
        """``(V, 3, 4)`` float64: homogeneous world points -> view pixel centres."""
        n = image_size
        f_top = (n / 2) * self.top_height / self.top_half_width
        out = []
        for v, (centre, target) in enumerate(zip(*self.centres_and_targets(), strict=True)):
            R = look_at(target, centre)
            r = np.deg2rad(self.roll_deg[v])
            roll = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
            f = f_top * self.zoom[v]
            cx, cy = n / 2 + n * np.asarray(self.principal_offset[v])
            intrinsics = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]])
            out.append(intrinsics @ roll @ np.column_stack([R, -R @ centre]))
        return np.stack(out)

    def plane_to_view(self, image_size: int, plane: np.ndarray) -> np.ndarray:
        """``(V, 3, 3)``: plane coordinates (``plane``: a ``(4, 3)`` plane matrix such as
        ``Placement.plane_matrix()`` or ``TABLE_PLANE``) -> view pixel centres."""
        return self.projections(image_size) @ plane

    def homographies(self, image_size: int, placement: Placement | None = None) -> np.ndarray:
        """``(V, V, 3, 3)`` induced by the part's plane at ``placement`` (default: nominal)."""
        placement = placement or Placement(height=self.part_height)
        return plane_homographies(self.plane_to_view(image_size, placement.plane_matrix()))


# ----------------------------------------------------------------------------- the generator


def _rounded_square(xy_u: np.ndarray, xy_v: np.ndarray, radius: float = 0.2) -> np.ndarray:
    """The part's outline: a rounded square ``[-1, 1]^2`` (corner radius 0.2)."""
    du = np.maximum(np.abs(xy_u) - (1 - radius), 0)
    dv = np.maximum(np.abs(xy_v) - (1 - radius), 0)
    return (du**2 + dv**2) <= radius**2


def _outline_points(radius: float = 0.2, per_corner: int = 10) -> np.ndarray:
    """``(M, 2)`` part coordinates along the rounded square's boundary (convex, in order)."""
    points = []
    for cu, cv, start in ((1, 1, 0), (-1, 1, 90), (-1, -1, 180), (1, -1, 270)):
        a = np.deg2rad(start + np.linspace(0, 90, per_corner))
        centre = np.array([cu, cv]) * (1 - radius)
        points.append(centre + radius * np.stack([np.cos(a), np.sin(a)], axis=1))
    return np.concatenate(points)


def _project(P: np.ndarray, world: np.ndarray) -> np.ndarray:
    q = np.c_[world, np.ones(len(world))] @ P.T
    return q[:, :2] / q[:, 2:]


class RealisticMultiView:
    """Renders samples of one category under ``RealisticRig``.

    Args:
        category: a name from ``REALISTIC_CATEGORIES``.
        image_size: side of the square views in pixels.
        rig: the cameras.
        texture: replaces the category's photograph (``(H, W, 3)`` float32 in [0, 1],
            covering the part exactly); used by tests that draw marks on the part.
    """

    def __init__(
        self,
        category: str,
        image_size: int = 256,
        rig: RealisticRig | None = None,
        texture: np.ndarray | None = None,
    ) -> None:
        if category not in _REALISTIC_TEXTURES:
            raise DataError(
                f"unknown realistic-rig category {category!r}; available: {REALISTIC_CATEGORIES}"
            )
        if image_size < 64:
            raise DataError(f"realistic-rig image size {image_size} is too small (minimum 64)")
        self.category = category
        self.image_size = n = image_size
        self.rig = rig or RealisticRig()
        self.texture_size = T = 2 * n  # n texels per world unit over the part [-1, 1]
        loader, tint, crop = _REALISTIC_TEXTURES[category]
        self._texture, self._jitter = self._base_texture(
            prepare_texture(loader(), tint) if texture is None else texture,
            1.0 if texture is not None else crop,
        )
        # Part coordinates of the texel centres; the texture's rows go towards -v.
        c = (np.arange(T) + 0.5) * 2 / T - 1
        self._u, self._v = c[None, :], -c[:, None]
        self._part_alpha = _rounded_square(self._u, self._v).astype(np.float32)
        self._tex_to_part = np.array([[2 / T, 0, -1], [0, -2 / T, 1], [0, 0, 1]])
        # The table: +-3 world units at n/2 texels per unit, mirrored beyond.
        self.table_extent = 3.0
        Tt = int(round(2 * self.table_extent * n / 2))
        L = self.table_extent
        self._tex_to_table = np.array([[2 * L / Tt, 0, -L], [0, -2 * L / Tt, L], [0, 0, 1]])
        grass = cv2.resize(skimage.data.grass(), (Tt, Tt), interpolation=cv2.INTER_LINEAR)
        grass = grass.astype(np.float32) / 255.0
        grain = (grass - grass.mean()) / max(float(grass.std()), 1e-3)
        self._table = _TABLE_RGB * (1 + 0.05 * np.clip(grain, -2.5, 2.5))[:, :, None]
        self._table_size = Tt
        self._table_plane_to_view = self.rig.plane_to_view(n, TABLE_PLANE)
        self._table_to_view = self._table_plane_to_view @ self._tex_to_table
        self._table_warps = [supersampled_matrix(k) for k in self._table_to_view]
        self._outline = _outline_points()
        self._centres, _ = self.rig.centres_and_targets()
        self._projections = self.rig.projections(n)
        self._mean_colour = self._texture.reshape(-1, 3).mean(0).astype(np.float32)
        # Fixed per camera: vignetting (cos^4-like falloff towards the corners).
        g = (np.arange(n) + 0.5) / n - 0.5
        r2 = (g[None, :] ** 2 + g[:, None] ** 2) / 0.5
        self._vignette = (1 - 0.18 * r2).astype(np.float32)[:, :, None]
        # Lighting is smooth: it is evaluated on a grid of SHADING_STEP px cells, then
        # interpolated (pixel centres of the coarse cells, in full-size pixel coordinates).
        m = n // SHADING_STEP
        c = (np.arange(m) + 0.5) * SHADING_STEP
        pix = np.stack(np.meshgrid(c, c), -1).reshape(-1, 2)
        self._shading_grid = m
        self._pixels = np.c_[pix, np.ones(len(pix))]

    # -- placement and geometry

    def nominal_placement(self) -> Placement:
        return Placement(height=self.rig.part_height)

    def draw_placement(self, rng: np.random.Generator) -> Placement:
        """A hand placement: shift up to 0.07, rotation up to 4 deg, tilt 1.5-2.2 deg about a
        random axis, height +-0.02 (the last two change the part's homographies)."""
        radius = 0.07 * np.sqrt(rng.random())
        phi = rng.uniform(0, 2 * np.pi)
        return Placement(
            shift=(float(radius * np.cos(phi)), float(radius * np.sin(phi))),
            rotation_deg=float(rng.uniform(-4, 4)),
            tilt_deg=float(rng.uniform(1.5, 2.2)),
            tilt_axis_deg=float(rng.uniform(0, 360)),
            height=float(self.rig.part_height + rng.uniform(-0.02, 0.02)),
        )

    def part_to_view(self, placement: Placement) -> np.ndarray:
        """``(V, 3, 3)``: part-texture texel centres -> view pixel centres."""
        return self.rig.plane_to_view(self.image_size, placement.plane_matrix()) @ self._tex_to_part

    def homographies(self, placement: Placement | None = None) -> np.ndarray:
        """``(V, V, 3, 3)`` true homographies of the part's plane (default: nominal)."""
        return self.rig.homographies(self.image_size, placement or self.nominal_placement())

    # -- part content

    def _base_texture(self, source: np.ndarray, crop: float) -> tuple[np.ndarray, int]:
        """The central square ``crop`` of ``source`` resized to ``T`` texels, plus a margin of
        ``J`` texels on every side (cut from the photograph around the crop) for the
        per-instance jitter: ``(T + 2J, T + 2J, 3)`` float32 and ``J``."""
        T = self.texture_size
        jitter = T // 128 if crop < 1.0 else 0
        side = min(source.shape[:2]) * crop
        src_side = min(int(round(side * (T + 2 * jitter) / T)), min(source.shape[:2]))
        oy, ox = (np.array(source.shape[:2]) - src_side) // 2
        region = source[oy : oy + src_side, ox : ox + src_side]
        size = T + 2 * jitter
        interp = cv2.INTER_AREA if src_side > size else cv2.INTER_LINEAR
        return cv2.resize(region, (size, size), interpolation=interp).astype(np.float32), jitter

    def _part_texture(self, rng: np.random.Generator) -> np.ndarray:
        """``(T, T, 3)`` float32: the category's surface, with a per-instance jitter of the
        crop (up to ``T/128`` texels, about 1 source pixel) and of the colour (+-3 %)."""
        T, J = self.texture_size, self._jitter
        oy, ox = J + rng.integers(-J, J + 1, size=2)
        tex = self._texture[oy : oy + T, ox : ox + T]
        return np.clip(tex * rng.uniform(0.97, 1.03, size=3).astype(np.float32), 0, 1)

    def _to_texel(self, uv: np.ndarray) -> np.ndarray:
        """Part coordinates ``(..., 2)`` -> texel indices (OpenCV drawing: integer centres)."""
        T = self.texture_size
        return np.stack([(uv[..., 0] + 1) * T / 2 - 0.5, (1 - uv[..., 1]) * T / 2 - 0.5], -1)

    def _draw_defect(
        self, tex: np.ndarray, alpha: np.ndarray, kind: str, rng: np.random.Generator
    ) -> np.ndarray:
        """Draw one defect on the part texture in place; return its ``(T, T)`` bool mask.

        Half go anywhere on the part; the other half, smaller, go along one edge in
        ``EDGE_BAND`` (see the module docstring's visibility rule)."""
        T, n = self.texture_size, self.image_size
        centre, scale, along = place_defect(rng, 0.75, EDGE_BAND, 0.65, 0.6)
        canvas = np.zeros((T, T), dtype=np.uint8)
        shift = 4  # sub-pixel drawing precision (coordinates * 2^shift)
        inside = self._part_alpha > 0
        if kind == "scratch":
            n_points = int(rng.integers(2, 5))
            angle = rng.uniform(0, np.pi) if along is None else np.arctan2(along[1], along[0])
            steps = rng.uniform(0.1, 0.22, size=n_points - 1) * scale
            turns = np.concatenate([[0.0], np.cumsum(rng.uniform(-0.4, 0.4, n_points - 2))])
            deltas = np.stack([np.cos(angle + turns), np.sin(angle + turns)], -1) * steps[:, None]
            points = centre + np.concatenate([[np.zeros(2)], np.cumsum(deltas, axis=0)])
            points = np.clip(points, -0.93, 0.93)
            px = np.round(self._to_texel(points) * (1 << shift)).astype(np.int32)
            # 1-2 view pixels wide at 256 px: a C1 pixel spans about 2.6 texels at any size
            # (both scale with n), a side-view pixel about 1.7 (measured mask width, area /
            # skeleton length: median 1.3 px in C1, 1.8 px in the side views); 2 texels at
            # least, so that a scratch stays a connected line at small sizes.
            thickness = max(2, int(round(rng.uniform(1.6, 2.6) * n / 256)))
            cv2.polylines(canvas, [px], False, 255, thickness, cv2.LINE_8, shift)
            mask = (canvas > 0) & inside
            tone = rng.choice([0.1, 0.92])  # a dark groove or a bright scuff
            a = rng.uniform(0.5, 0.7)
            tex[mask] = (1 - a) * tex[mask] + a * tone
        elif kind == "stain":
            axes = rng.uniform(0.08, 0.16, size=2) * scale
            self._ellipse(canvas, centre, axes, rng.uniform(0, 180), shift)
            colour = rng.uniform(-1, 1, size=3).astype(np.float32)
            colour = rng.uniform(0.08, 0.13) * colour / np.abs(colour).max()  # faint
            soft = cv2.GaussianBlur((canvas > 0).astype(np.float32), (0, 0), n / 48)
            tex += soft[:, :, None] * colour
            np.clip(tex, 0, 1, out=tex)
            mask = (soft > 0.5) & inside
        elif kind == "hole":
            axes = rng.uniform(0.05, 0.11, size=2) * scale
            self._ellipse(canvas, centre, axes, rng.uniform(0, 180), shift)
            mask = (canvas > 0) & inside
            alpha[mask] = 0.0
        elif kind == "patch":
            # An irregular blob filled with a foreign photograph, brightness matched to the
            # part around it so that it is not trivially brighter or darker.
            k = 9
            radii = rng.uniform(0.06, 0.12) * scale * rng.uniform(0.7, 1.25, size=k)
            a = np.sort(rng.uniform(0, 2 * np.pi, size=k))
            blob = centre + radii[:, None] * np.stack([np.cos(a), np.sin(a)], -1)
            px = np.round(self._to_texel(blob) * (1 << shift)).astype(np.int32)
            cv2.fillPoly(canvas, [px], 255, cv2.LINE_8, shift)
            mask = (canvas > 0) & inside
            name = _FOREIGN_SOURCES[int(rng.integers(len(_FOREIGN_SOURCES)))]
            foreign = _foreign_texture(name)
            fh, fw = foreign.shape[:2]
            side = int(min(fh, fw) * rng.uniform(0.2, 0.4))
            y0, x0 = rng.integers(0, fh - side), rng.integers(0, fw - side)
            patch = cv2.resize(foreign[y0 : y0 + side, x0 : x0 + side], (T, T))
            if mask.any():
                patch = patch - patch[mask].mean(0) + tex[mask].mean(0) * rng.uniform(0.85, 1.15)
                tex[mask] = np.clip(patch[mask], 0, 1)
        else:
            raise ValueError(
                f"unknown defect kind {kind!r}; expected one of {list(REALISTIC_DEFECT_CODES)}"
            )
        return mask

    def _ellipse(self, canvas, centre, axes_uv, angle_deg, shift) -> None:
        c = np.round(self._to_texel(np.asarray(centre)) * (1 << shift)).astype(int)
        axes = np.round(np.asarray(axes_uv) * self.texture_size / 2 * (1 << shift)).astype(int)
        cv2.ellipse(canvas, tuple(c), tuple(axes), angle_deg, 0, 360, 255, -1, cv2.LINE_8, shift)

    # -- the views

    def _lights(self, rng: np.random.Generator) -> np.ndarray:
        """``(4, 3)`` light positions: one opposite each side camera, elevation ~45 deg,
        jittered per sample."""
        out = []
        for az in self.rig.side_azimuths_deg:
            a = np.deg2rad(az + 180 + rng.uniform(-8, 8))
            e = np.deg2rad(45 + rng.uniform(-5, 5))
            d = 3.5 + rng.uniform(-0.2, 0.2)
            out.append(d * np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)]))
        return np.stack(out)

    def _shading(
        self,
        plane_to_view: np.ndarray,
        plane: np.ndarray,
        view: int,
        lights: np.ndarray,
        shininess: float,
        strength: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(N, N, 1)`` Lambert and Blinn-Phong specular terms of a plane seen by ``view``:
        the centre of every shading cell is cast back onto the plane (``plane_to_view^-1``) to
        get its world point, whose normal, light and view directions give the terms."""
        n, m = self.image_size, self._shading_grid
        q = self._pixels @ np.linalg.inv(plane_to_view).T
        q = q / q[:, 2:]
        world = q @ plane.T
        world = world[:, :3] / world[:, 3:]
        normal = np.cross(plane[:3, 0], plane[:3, 1])
        normal /= np.linalg.norm(normal)
        to_camera = self._centres[view] - world
        to_camera /= np.linalg.norm(to_camera, axis=1, keepdims=True)
        diffuse = np.zeros(len(world))
        specular = np.zeros(len(world))
        for light, amp in zip(lights, strength, strict=True):
            to_light = light - world
            dist = np.linalg.norm(to_light, axis=1, keepdims=True)
            to_light /= dist
            diffuse += np.maximum(to_light @ normal, 0) * (3.5 / dist[:, 0]) ** 2
            half = to_light + to_camera
            half /= np.linalg.norm(half, axis=1, keepdims=True)
            specular += amp * np.maximum(half @ normal, 0) ** shininess
        terms = np.stack([diffuse / 4, specular], -1).reshape(m, m, 2).astype(np.float32)
        terms = cv2.resize(terms, (n, n), interpolation=cv2.INTER_LINEAR)
        return terms[:, :, :1], terms[:, :, 1:]

    def render(
        self,
        rng: np.random.Generator,
        defects: Sequence[str] = (),
        placement: Placement | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """Render one sample: ``(images, masks, homographies)``.

        ``masks`` only holds views that see a defect pixel (the module docstring's rule);
        ``homographies`` is ``(V, V, 3, 3)``, this sample's true ones. ``placement``: default
        a random hand placement (``draw_placement``).
        """
        n, V = self.image_size, len(VIEWS)
        placement = placement or self.draw_placement(rng)
        tex = self._part_texture(rng)
        alpha = self._part_alpha.copy()
        defect_mask = np.zeros(alpha.shape, dtype=bool)
        for kind in defects:
            defect_mask |= self._draw_defect(tex, alpha, kind, rng)
        plane = placement.plane_matrix()
        part_to_view = self.part_to_view(placement)
        R, t = placement.pose()
        top_ring = (np.c_[self._outline, np.zeros(len(self._outline))] @ R.T) + t
        bottom_ring = top_ring * np.array([1.0, 1.0, 0.0])

        table = self._table_with_shadow(bottom_ring)
        lights = self._lights(rng)
        shininess = float(rng.uniform(100, 300))
        strength = rng.uniform(0.15, 0.7, size=len(lights))
        exposure = rng.uniform(0.85, 1.15) * rng.uniform(0.93, 1.07, size=3)  # white balance
        view_gain = rng.uniform(0.95, 1.05, size=V)
        wall_shade = rng.uniform(0.35, 0.6, size=V)
        images, masks = {}, {}
        part_plane_to_view = self._projections @ plane
        rgba = np.concatenate([tex, alpha[:, :, None]], axis=2)  # one warp for both
        for v, view in enumerate(VIEWS):
            warp = supersampled_matrix(part_to_view[v])
            warped = warp_supersampled(rgba, warp, n)
            part, part_alpha = warped[:, :, :3], warped[:, :, 3:]
            ground = warp_supersampled(
                table, self._table_warps[v], n, border_mode=cv2.BORDER_REFLECT
            )
            # The walls show around the top face, not through its holes (there: the table).
            outline = part_alpha
            if "hole" in defects:
                outline = warp_supersampled(self._part_alpha, warp, n)[:, :, None]
            walls = self._walls(v, top_ring, bottom_ring)[:, :, None] * (1 - outline)
            diffuse, specular = self._shading(
                part_plane_to_view[v], plane, v, lights, shininess, strength
            )
            t_diffuse, t_specular = self._shading(
                self._table_plane_to_view[v],
                TABLE_PLANE,
                v,
                lights,
                8.0,
                0.06 * strength,
            )
            # Ambient plus Lambert, then the highlight (added: it is the light's colour).
            img = ground * (0.55 + 0.6 * t_diffuse) + t_specular
            img = img * (1 - walls) + walls * (self._mean_colour * np.float32(wall_shade[v]))
            lit_part = part * (0.45 + 0.7 * diffuse) + specular
            img = img * (1 - part_alpha) + part_alpha * lit_part
            img = img * self._vignette * (exposure * view_gain[v]).astype(np.float32)
            # Sensor noise: read noise plus shot noise growing with the signal.
            noise = rng.standard_normal(img.shape, dtype=np.float32)
            img = img + noise * ((1.0 + 3.0 * np.sqrt(np.clip(img, 0, 1))) / 255)
            images[view] = np.clip(np.round(img * 255), 0, 255).astype(np.uint8)
            if defects:
                m = warp_supersampled(defect_mask.astype(np.float32), warp, n) >= 0.5
                if m.any():
                    masks[view] = m
        return images, masks, self.homographies(placement)

    def _walls(self, view: int, top_ring: np.ndarray, bottom_ring: np.ndarray) -> np.ndarray:
        """``(N, N)`` float32 coverage of the part's side walls: the convex hull of its top and
        bottom outlines in the view, drawn at twice the size and box-filtered like the rest."""
        n = self.image_size
        P = self._projections[view]
        ring = np.concatenate([_project(P, top_ring), _project(P, bottom_ring)])
        hull = cv2.convexHull(np.round(2 * ring * 16 - 8).astype(np.int32))  # 2x, 4 bit shift
        canvas = np.zeros((2 * n, 2 * n), np.float32)
        cv2.fillConvexPoly(canvas, hull, 1.0, cv2.LINE_8, 4)
        return cv2.resize(canvas, (n, n), interpolation=cv2.INTER_AREA)

    def _table_with_shadow(self, footprint: np.ndarray) -> np.ndarray:
        """The table texture darkened by a soft contact shadow around the part's footprint."""
        Tt, L = self._table_size, self.table_extent
        px = (footprint[:, 0] + L) * Tt / (2 * L) - 0.5
        py = (L - footprint[:, 1]) * Tt / (2 * L) - 0.5
        # The shadow is soft: draw and blur it at a quarter of the table's resolution.
        q = Tt // 4
        canvas = np.zeros((q, q), np.float32)
        pts = np.round((np.stack([px, py], -1) + 0.5) / 4 * 16 - 8).astype(np.int32)
        cv2.fillConvexPoly(canvas, pts, 1.0, cv2.LINE_8, 4)
        shadow = cv2.GaussianBlur(canvas, (0, 0), q / (2 * L) * 0.08)
        shadow = cv2.resize(shadow, (Tt, Tt), interpolation=cv2.INTER_LINEAR)
        return self._table * (1 - 0.55 * shadow)[:, :, None]  # float32


def generate_realistic_category(
    name: str,
    seed: int = 0,
    *,
    image_size: int = 256,
    samples_train: int = 40,
    samples_test: int = 44,
    anomaly_fraction: float = 0.5,
    rig: RealisticRig | None = None,
) -> SyntheticCategory:
    """Render one category of the realistic rig in memory.

    Same bookkeeping as the simple rig (``synthetic.generate_category``): training samples
    are normal; ``round(samples_test * anomaly_fraction)`` test samples, spread at random,
    carry one or two defects of one kind (``REALISTIC_DEFECT_CODES``). Every sample carries
    its own true homographies; the category's are those of the nominal placement.
    """
    if samples_train < 1 or samples_test < 0:
        raise DataError(
            f"need >= 1 training sample and >= 0 test samples, got {samples_train}, {samples_test}"
        )
    gen = RealisticMultiView(name, image_size, rig)
    train, test = render_samples(
        name,
        gen.render,
        _category_rng(name, seed),
        samples_train,
        samples_test,
        anomaly_fraction,
        REALISTIC_DEFECT_CODES,
    )
    return SyntheticCategory(name, image_size, train, test, gen.homographies(), rig="realistic")
