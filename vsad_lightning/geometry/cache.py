"""The per-category homography cache: a small JSON file (the ``vsad-homography`` contract).

Format::

    {"category": str, "image_size": [W, H], "views": ["C1", ...],
     "pairs": {"C1->C2": {"H": [[...], [...], [...]], "inliers": int, "inlier_ratio": float,
                          "reproj_error_px": float, "status": "ok" | "unreliable"}, ...}}

``H`` maps pixel-centre coordinates of the source view to the target view at ``image_size``.
Every ordered pair of distinct views is present. The file is written atomically, and read
with ``json`` only (nothing is unpickled).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from vsad_lightning.errors import DataError
from vsad_lightning.utils.io import atomic_write_json, read_json

CACHE_DIR_NAME = "vsad_cache"
"""The only folder this project ever writes inside a dataset root."""

CACHE_DIR_ENV = "VSAD_CACHE_DIR"
"""Put the caches in this folder instead of ``<root>/vsad_cache/`` (a read-only dataset, a
dataset shared by users who may not write into it). ``--data.cache_dir`` does the same for
one run. Use one folder per dataset root: file names hold the category and resolution only."""


def cache_dir_for(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of a dataset's caches: ``cache_dir``, else ``$VSAD_CACHE_DIR``, else
    ``<root>/vsad_cache``."""
    chosen = cache_dir or os.environ.get(CACHE_DIR_ENV) or None
    return Path(chosen) if chosen else Path(root) / CACHE_DIR_NAME


PAIR_STATUSES = ("ok", "unreliable")


def default_cache_path(
    root: str | os.PathLike,
    category: str,
    resolution: int | str,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """``<cache folder>/homographies_<category>_<resolution>.json``; the folder is
    ``cache_dir_for(root, cache_dir)`` (``<root>/vsad_cache`` by default)."""
    return cache_dir_for(root, cache_dir) / f"homographies_{category}_{resolution}.json"


def _in_front(H: list[list[float]], image_size) -> list[list[float]] | None:
    """``H`` or ``-H``: the one whose third coordinate ``w`` is positive at the source image's
    centre.

    ``H`` and ``-H`` are the same homography, but the projection keeps a point only where
    ``w > 0`` (in front of the camera, ``geometry.projection``), so a cache whose ``H[2][2]``
    is negative (another tool's convention, or a hand edit) would make every cross-view
    position invalid, and MVAM's candidates and L_r would silently see nothing. A pair that
    sends the centre to infinity (``w = 0``) cannot be two views of one object: ``None``.
    """
    cx, cy = image_size[0] / 2, image_size[1] / 2  # pixel-centre coordinates
    w = H[2][0] * cx + H[2][1] * cy + H[2][2]
    if not w:
        return None
    return H if w > 0 else [[-x for x in row] for row in H]


@dataclass
class PairEstimate:
    """One ordered pair's homography and the evidence behind it."""

    H: list[list[float]]
    inliers: int
    inlier_ratio: float
    reproj_error_px: float
    status: str = "ok"

    def to_json(self) -> dict:
        return {
            "H": [[float(x) for x in row] for row in self.H],
            "inliers": int(self.inliers),
            "inlier_ratio": float(self.inlier_ratio),
            "reproj_error_px": float(self.reproj_error_px),
            "status": self.status,
        }


@dataclass
class HomographyCache:
    """All ordered pairs of one category's views."""

    category: str
    image_size: tuple[int, int]
    views: list[str]
    pairs: dict[str, PairEstimate] = field(default_factory=dict)
    source: str = field(default="", compare=False)
    """The file it was read from (for messages); empty for a cache built in memory."""

    def check_category(self, category: str | None) -> None:
        """A ``DataError`` when this is another category's cache (``category`` ``None``: any)."""
        if category is not None and self.category != category:
            where = self.source or "(given in memory)"
            raise DataError(
                f"homography cache {where} is the cache of category {self.category!r}, but "
                f"category {category!r} was asked for; delete it or point the run at the "
                "right cache"
            )

    @staticmethod
    def pair_key(src: str, dst: str) -> str:
        return f"{src}->{dst}"

    def unreliable_pairs(self) -> list[str]:
        return [k for k, p in self.pairs.items() if p.status != "ok"]

    def matrices(self, views: list[str] | None = None) -> Tensor:
        """``(V, V, 3, 3)`` float32 for ``views`` (default: all), identity on the diagonal.

        Unreliable pairs contribute the identity, whatever H the file holds for them: a
        placeholder only, since a run removes them from the neighbour graph
        (``MultiViewDataModule.neighbour_graph_mask``) and nothing looks across them.
        """
        views = list(self.views) if views is None else list(views)
        missing = [v for v in views if v not in self.views]
        if missing:
            raise DataError(
                f"homography cache for category {self.category!r} has views {self.views}, "
                f"but views {missing} were requested"
            )
        V = len(views)
        out = torch.eye(3, dtype=torch.float64).repeat(V, V, 1, 1)
        for i, src in enumerate(views):
            for j, dst in enumerate(views):
                if i == j:
                    continue
                pair = self.pairs[self.pair_key(src, dst)]
                if pair.status == "ok":
                    out[i, j] = torch.tensor(pair.H, dtype=torch.float64)
        return out.to(torch.float32)

    def to_json(self) -> dict:
        return {
            "category": self.category,
            "image_size": [int(self.image_size[0]), int(self.image_size[1])],
            "views": list(self.views),
            "pairs": {k: p.to_json() for k, p in self.pairs.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically; a folder that cannot be written (a read-only dataset) is one
        ``DataError`` that says how to put the cache elsewhere."""
        if Path(path).is_dir():
            raise DataError(f"homography cache {path} is a folder; expected a JSON file")
        try:
            atomic_write_json(path, self.to_json(), "homography cache")
        except DataError as e:
            raise DataError(
                f"{e}; to keep the caches elsewhere set --data.cache_dir DIR "
                f"(vsad-fit/test/predict) or the environment variable {CACHE_DIR_ENV}=DIR"
            ) from e

    @classmethod
    def from_json(
        cls, obj: dict, source: str = "<memory>", category: str | None = None
    ) -> HomographyCache:
        """Validate and parse; every problem is a ``DataError`` naming ``source``. With
        ``category``, the file must say it is that category's cache (a cache copied or renamed
        from another category would silently give wrong geometry)."""

        def fail(what: str) -> DataError:
            return DataError(f"homography cache {source}: {what}")

        if not isinstance(obj, dict):
            raise fail("expected a JSON object at the top level")
        for key in ("category", "image_size", "views", "pairs"):
            if key not in obj:
                raise fail(f"missing key {key!r}")
        if not isinstance(obj["category"], str):
            raise fail(f"'category' must be a string, got {obj['category']!r}")
        size = obj["image_size"]
        if not (
            isinstance(size, list)
            and len(size) == 2
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
        ):
            raise fail(f"'image_size' must be [W, H] positive integers, got {size!r}")
        if not isinstance(obj["pairs"], dict):
            raise fail(
                f"'pairs' must be an object mapping 'SRC->DST' to a pair, got "
                f"{type(obj['pairs']).__name__}"
            )
        views = obj["views"]
        if not (isinstance(views, list) and views and all(isinstance(v, str) for v in views)):
            raise fail(f"'views' must be a non-empty list of view tokens, got {views!r}")
        if len(set(views)) != len(views):
            raise fail(f"'views' lists a view twice: {views}")
        pairs: dict[str, PairEstimate] = {}
        for src in views:
            for dst in views:
                if src == dst:
                    continue
                key = cls.pair_key(src, dst)
                raw = obj["pairs"].get(key)
                if raw is None:
                    raise fail(f"pair {key!r} is missing (every ordered pair must be present)")
                if not isinstance(raw, dict):
                    raise fail(f"pair {key!r} must be an object, got {type(raw).__name__}")
                try:
                    H = [[float(x) for x in row] for row in raw["H"]]
                    pair = PairEstimate(
                        H=H,
                        inliers=int(raw["inliers"]),
                        inlier_ratio=float(raw["inlier_ratio"]),
                        reproj_error_px=float(raw["reproj_error_px"]),
                        status=str(raw["status"]),
                    )
                except (KeyError, TypeError, ValueError) as e:
                    raise fail(f"pair {key!r} is malformed ({e!r})") from e
                if len(H) != 3 or any(len(row) != 3 for row in H):
                    raise fail(f"pair {key!r}: 'H' must be 3x3")
                if pair.status not in PAIR_STATUSES:
                    raise fail(f"pair {key!r}: status {pair.status!r} not in {PAIR_STATUSES}")
                if pair.status == "ok":
                    if not all(math.isfinite(x) for row in H for x in row):
                        raise fail(f"pair {key!r}: 'H' contains NaN or inf")
                    det = torch.linalg.det(torch.tensor(H, dtype=torch.float64)).item()
                    if not math.isfinite(det) or abs(det) < 1e-12:
                        raise fail(f"pair {key!r}: 'H' is singular (det={det:.3g})")
                    pair.H = _in_front(H, size)
                    if pair.H is None:
                        raise fail(
                            f"pair {key!r}: 'H' sends the centre of the source view to infinity "
                            f"(H={H}); two views of one object cannot be related by it"
                        )
                pairs[key] = pair
        cache = cls(
            category=str(obj["category"]),
            image_size=(size[0], size[1]),
            views=list(views),
            pairs=pairs,
            source=source,
        )
        cache.check_category(category)
        return cache

    @classmethod
    def load(cls, path: str | os.PathLike, category: str | None = None) -> HomographyCache:
        """Read and validate ``path`` (see ``from_json``; ``category``: the one expected)."""
        return cls.from_json(
            read_json(path, "homography cache"), source=str(path), category=category
        )
