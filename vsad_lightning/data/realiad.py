"""Real-IAD: five views per sample, split lists in JSON (docs/datasets.md#real-iad).

Layout::

    <root>/realiad_jsons/<category>.json          (or realiad_jsons/realiad_jsons/<category>.json)
    <root>/realiad_<res>/<category>/<image_path>  res: 256, 512, 1024, raw, or any integer

The JSON is ``{"meta": {...}, "train": [...], "test": [...]}``; each entry is
``{"category": str, "anomaly_class": str, "image_path": str, "mask_path": str | null}`` with
paths relative to the category folder. ``anomaly_class == "OK"`` marks a normal sample.

Views are grouped by the sample key and the view token parsed from the file *stem* with
``REALIAD_STEM`` -- never by position in the list, whose order is arbitrary. For
``audiojack_0012_NG_C3_20231021140106`` the key is ``audiojack_0012_NG`` and the view ``C3``;
extra class tokens before the view (``audiojack_0012_NG_AK_C3_...``) stay in the key, and the
timestamp is optional. A view is anomalous when its entry has a mask.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from vsad_lightning.data.dataset import (
    NORMAL_CLASS,
    MultiViewDataset,
    SampleRecord,
    ViewFile,
    cache_path_for,
    natural_key,
    resolve_homographies,
    select_views,
)
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.utils.io import read_json

REALIAD_STEM = re.compile(
    r"^(?P<sample>.+?_\d{4,}_[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*?)"  # <category>_<digits>_<class>...
    r"_(?P<view>C\d+)"  # the camera token
    r"(?:_(?P<timestamp>\d+))?$"  # the capture time, optional
)
"""File stem -> ``sample`` key and ``view`` token (see the module docstring)."""

ENTRY_KEYS = ("category", "anomaly_class", "image_path", "mask_path")


def _entry_error(where: str, what: str) -> DataError:
    return DataError(f"{where}: {what}")


SPLITS = ("train", "test")


def parse_stem(stem: str) -> tuple[str, str] | None:
    """``audiojack_0001_OK_C1_20230922093227`` -> ``("audiojack_0001_OK", "C1")``."""
    match = REALIAD_STEM.match(stem)
    return (match["sample"], match["view"]) if match else None


def realiad_json_path(root: str | os.PathLike, category: str) -> Path:
    """The split file of a category; a missing or empty category is a ``DataError`` that lists
    the categories there are."""
    root = Path(root)
    if not category:
        raise DataError("the Real-IAD category is empty; pass e.g. category='audiojack'")
    folders = [root / "realiad_jsons", root / "realiad_jsons" / "realiad_jsons"]
    for folder in folders:
        if (folder / f"{category}.json").is_file():
            return folder / f"{category}.json"
    available = sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.json")})
    if not available:
        raise DataError(
            f"{root} is not a Real-IAD root: no {folders[0]}/<category>.json split files"
        )
    raise DataError(
        f"unknown Real-IAD category {category!r}: no {folders[0]}/{category}.json; "
        f"available: {available}"
    )


def realiad_category_dir(root: str | os.PathLike, category: str, resolution: int | str) -> Path:
    """``<root>/realiad_<resolution>/<category>``, which must exist."""
    root = Path(root)
    resolution = str(resolution)
    if not (resolution == "raw" or resolution.isdigit()):
        raise DataError(f"Real-IAD resolution must be an integer or 'raw', got {resolution!r}")
    folder = root / f"realiad_{resolution}" / category
    if not folder.is_dir():
        present = sorted(p.name for p in root.glob("realiad_*") if p.name != "realiad_jsons")
        raise DataError(
            f"no image folder {folder} for category {category!r} at resolution {resolution}; "
            f"resolution folders present: {present}"
        )
    return folder


def index_realiad(
    root: str | os.PathLike,
    category: str,
    split: str,
    resolution: int | str = 256,
    views: Sequence[str] | None = None,
) -> tuple[list[SampleRecord], list[str]]:
    """Parse, group and check one split: ``(records sorted by sample key, view order)``.

    Raises ``DataError`` naming the JSON entry, file, sample or view for: a JSON that is not
    the documented format, an entry with missing keys or wrong types, a file name the pattern
    does not match, a duplicated view, a sample missing a selected view, a sample whose views
    disagree on the class, a mask on an ``OK`` sample, and files that do not exist.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    json_path = realiad_json_path(root, category)
    category_dir = realiad_category_dir(root, category, resolution)
    document = read_json(json_path, "Real-IAD split file")
    if not isinstance(document, dict) or not isinstance(document.get(split), list):
        raise DataError(
            f"{json_path}: expected an object with a {split!r} list "
            '({"meta": ..., "train": [...], "test": [...]})'
        )
    entries = document[split]
    if not entries:
        raise DataError(f"{json_path}: the {split!r} list of category {category!r} is empty")
    _check_splits_disjoint(document, split, json_path)

    # sample key -> view token -> (entry index, ViewFile, anomaly_class)
    groups: dict[str, dict[str, tuple[int, ViewFile, str]]] = {}
    for i, entry in enumerate(entries):
        where = f"{json_path} {split}[{i}]"  # names the JSON entry in every message
        if not isinstance(entry, dict):
            raise _entry_error(where, f"expected an object, got {entry!r}")
        missing = [k for k in ENTRY_KEYS if k not in entry]
        if missing:
            raise _entry_error(where, f"missing keys {missing} in {entry}")
        for key in ("category", "anomaly_class", "image_path"):
            if not isinstance(entry[key], str) or not entry[key]:
                raise _entry_error(where, f"{key!r} must be a non-empty string, got {entry[key]!r}")
        if entry["mask_path"] is not None and not isinstance(entry["mask_path"], str):
            raise _entry_error(
                where,
                f"'mask_path' must be a string or null, got {entry['mask_path']!r}",
            )
        if entry["category"] != category:
            raise _entry_error(where, f"category {entry['category']!r} in the file of {category!r}")
        image_path = category_dir / entry["image_path"]
        parsed = parse_stem(Path(entry["image_path"]).stem)
        if parsed is None:
            raise _entry_error(
                where,
                f"file name {Path(entry['image_path']).name!r} does not "
                "match <category>_<4 digits>_<class>_C<k>[_<timestamp>]",
            )
        sample, view = parsed
        mask_path = category_dir / entry["mask_path"] if entry["mask_path"] else None
        anomaly_class = entry["anomaly_class"]
        if anomaly_class == NORMAL_CLASS and mask_path is not None:
            raise _entry_error(
                where,
                f"sample {sample!r} view {view} is 'OK' but lists a mask {entry['mask_path']!r}",
            )
        source = f"{json_path.name} {split}[{i}]"
        view_file = ViewFile(view, image_path, mask_path, None, source)
        by_view = groups.setdefault(sample, {})
        if view in by_view:
            first = by_view[view][0]
            raise _entry_error(
                where,
                f"sample {sample!r} lists view {view} twice (also "
                f"{split}[{first}]: {entries[first]['image_path']!r})",
            )
        by_view[view] = (i, view_file, anomaly_class)

    found = {v for by_view in groups.values() for v in by_view}
    where = f"Real-IAD category {category!r} {split}"
    view_order = select_views(found, views, where)
    records = []
    for sample in sorted(groups, key=natural_key):
        by_view = groups[sample]
        missing_views = [v for v in view_order if v not in by_view]
        if missing_views:
            have = {v: by_view[v][1].image_path.name for v in sorted(by_view, key=natural_key)}
            raise DataError(
                f"{json_path} {split}: sample {sample!r} has no view {missing_views} "
                f"(it has {have})"
            )
        classes = {by_view[v][2] for v in view_order}
        if len(classes) > 1:
            raise DataError(
                f"{json_path} {split}: the views of sample {sample!r} disagree on "
                f"'anomaly_class': {sorted(classes)}"
            )
        view_files = tuple(by_view[v][1] for v in view_order)
        absent = [
            str(p)
            for vf in view_files
            for p in (vf.image_path, vf.mask_path)
            if p is not None and not p.is_file()
        ]
        if absent:
            raise DataError(f"sample {sample!r} ({json_path.name} {split}): missing files {absent}")
        records.append(SampleRecord(sample, category, classes.pop(), view_files))
    return records, view_order


def _image_key(entry: object) -> str | None:
    if not isinstance(entry, dict) or not isinstance(entry.get("image_path"), str):
        return None  # malformed entries are reported by the split's own parsing
    return os.path.normpath(entry["image_path"])


def _check_splits_disjoint(document: dict, split: str, json_path: Path) -> None:
    """Refuse an image listed in both ``train`` and ``test``: a test sample in the training
    split puts test features into the memory bank and inflates every metric. The message
    names both JSON entries."""
    other = "test" if split == "train" else "train"
    other_entries = document.get(other)
    if not isinstance(other_entries, list):
        return
    seen = {key: i for i, e in enumerate(other_entries) if (key := _image_key(e)) is not None}
    for i, entry in enumerate(document[split]):
        key = _image_key(entry)
        if key is not None and key in seen:
            parsed = parse_stem(Path(key).stem)
            sample = f"sample {parsed[0]!r} " if parsed else ""
            first, second = sorted([(split, i), (other, seen[key])])
            raise DataError(
                f"{json_path}: {sample}is in both splits: {first[0]}[{first[1]}] and "
                f"{second[0]}[{second[1]}] list {entry['image_path']!r}; a training sample "
                "must not be a test sample (the metrics would count it as seen)"
            )


class RealIADDataset(MultiViewDataset):
    """Real-IAD samples (layout and grouping rules in the module docstring).

    Args:
        root: the folder holding ``realiad_jsons/`` and ``realiad_<res>/``.
        category: e.g. ``"audiojack"``.
        split: ``"train"`` or ``"test"``.
        resolution: which ``realiad_<res>`` folder to read (an integer or ``"raw"``).
        views: the views to use, in this order (default: every view found, ``C1..C5``).
        image_size: output size (int or ``(W, H)``); ``None`` keeps the stored size.
        homographies: a ``HomographyCache`` or the path of its JSON; ``None`` reads
            ``<root>/vsad_cache/homographies_<category>_<resolution>.json``. A missing cache
            is a ``DataError`` that says to run ``vsad-homography``: nothing is invented.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        category: str,
        split: str = "train",
        resolution: int | str = 256,
        views: Sequence[str] | None = None,
        image_size: int | tuple[int, int] | None = None,
        homographies: HomographyCache | str | os.PathLike | None = None,
    ) -> None:
        records, view_order = index_realiad(root, category, split, resolution, views)
        cache = resolve_homographies(
            homographies, cache_path_for(root, category, resolution), category
        )
        super().__init__(
            records,
            category=category,
            view_names=view_order,
            homographies=cache,
            image_size=image_size,
        )
        self.root = Path(root)
        self.split = split
        self.resolution = resolution
