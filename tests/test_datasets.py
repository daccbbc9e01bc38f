"""Real-IAD, MANTA and folder datasets: grouping by sample key and view token, view subsets,
resizing, homographies, and a clear DataError for every kind of bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.data.folder import MultiViewFolderDataset
from vsad_lightning.data.images import read_image_rgb, read_mask, write_jpeg, write_mask_png
from vsad_lightning.data.manta import MantaDataset
from vsad_lightning.data.realiad import RealIADDataset, parse_stem
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache, PairEstimate
from vsad_lightning.geometry.projection import scale_homography

VIEWS = ["C1", "C2", "C3", "C4", "C5"]
W, H = 40, 30  # non-square on purpose: (W, H) must never be swapped


def colour_of(number: int, view_index: int) -> np.ndarray:
    """A distinct flat RGB colour per (sample number, view), robust to JPEG."""
    return np.array([20 + 30 * (number % 7), 30 + 40 * view_index, 200 - 25 * (number % 5)])


def flat_image(number: int, view_index: int, size=(W, H)) -> np.ndarray:
    return np.broadcast_to(colour_of(number, view_index), (size[1], size[0], 3)).astype(np.uint8)


def pair_matrix(i: int, j: int) -> list[list[float]]:
    """A distinct, invertible, clearly identifiable H per ordered pair."""
    return [[1.0 + 0.01 * i, 0.02 * j, 3.0 * i - j], [0.01 * j, 1.0, 2.0 * j], [0.0, 1e-4 * i, 1.0]]


def write_cache(path: Path, category: str, size=(W, H), views=VIEWS) -> HomographyCache:
    pairs = {
        HomographyCache.pair_key(s, d): PairEstimate(pair_matrix(i, j), 100, 0.9, 0.3)
        for i, s in enumerate(views)
        for j, d in enumerate(views)
        if s != d
    }
    cache = HomographyCache(category, size, list(views), pairs)
    cache.save(path)
    return cache


def realiad_name(category: str, number: int, cls: str, view: str, t: int) -> str:
    return f"{category}_{number:04d}_{cls}_{view}_2023092209{t // 60 % 60:02d}{t % 60:02d}"


def build_realiad(root: Path, category: str = "audiojack", shuffle_seed: int = 0) -> dict:
    """A small Real-IAD root in the exact layout, JSON order shuffled.

    train: OK samples 1, 2, 3. test: OK sample 10; NG sample 12 (class AK) with masks on C1
    and C3 only; NG sample 13 (class QS, file names with the extra class token) with a mask on
    C5 only. Returns what the tests check against.
    """
    cat_dir = root / "realiad_256" / category
    entries = {"train": [], "test": []}
    masks = {}
    t = 0
    plan = [("train", n, "OK", {}) for n in (1, 2, 3)] + [
        ("test", 10, "OK", {}),
        ("test", 12, "AK", {"C1": (2, 3, 12, 10), "C3": (20, 5, 30, 25)}),
        ("test", 13, "QS", {"C5": (0, 0, 8, 8)}),
    ]
    for split, number, cls, mask_boxes in plan:
        for v, view in enumerate(VIEWS):
            t += 1
            if cls == "OK":
                stem = realiad_name(category, number, "OK", view, t)
                folder = f"OK/S{number:04d}"
            else:
                token = "NG" if number == 12 else f"NG_{cls}"
                stem = realiad_name(category, number, token, view, t)
                folder = f"NG/{cls}/S{number:04d}"
            write_jpeg(cat_dir / folder / f"{stem}.jpg", flat_image(number, v))
            mask_rel = None
            if view in mask_boxes:
                x0, y0, x1, y1 = mask_boxes[view]
                mask = np.zeros((H, W), dtype=bool)
                mask[y0:y1, x0:x1] = True
                mask_rel = f"{folder}/{stem}.png"
                write_mask_png(cat_dir / mask_rel, mask)
                masks[(number, view)] = mask
            entries[split].append(
                {
                    "category": category,
                    "anomaly_class": cls,
                    "image_path": f"{folder}/{stem}.jpg",
                    "mask_path": mask_rel,
                }
            )
    rng = random.Random(shuffle_seed)
    for split in entries:
        rng.shuffle(entries[split])
    json_path = root / "realiad_jsons" / f"{category}.json"
    json_path.parent.mkdir(parents=True)
    json_path.write_text(json.dumps({"meta": {"normal_class": "OK"}, **entries}))
    cache = write_cache(cache_path_for(root, category, 256), category)
    return {"json": json_path, "entries": entries, "masks": masks, "cache": cache, "dir": cat_dir}


def edit_json(info: dict, fn) -> None:
    doc = json.loads(info["json"].read_text())
    fn(doc)
    info["json"].write_text(json.dumps(doc))


@pytest.fixture
def realiad(tmp_path) -> tuple[Path, dict]:
    return tmp_path, build_realiad(tmp_path)


def assert_view_colour(image: torch.Tensor, number: int, view_index: int) -> None:
    """``image``: (3, H, W) in [-1, 1] must be the flat colour of (number, view)."""
    rgb = (image + 1) * 127.5
    expected = torch.tensor(colour_of(number, view_index), dtype=torch.float32)
    assert torch.allclose(rgb.mean(dim=(1, 2)), expected, atol=3.0), (number, view_index)


# ----------------------------------------------------------------------------- file names


@pytest.mark.parametrize(
    "stem, expected",
    [
        ("audiojack_0001_OK_C1_20230922093227", ("audiojack_0001_OK", "C1")),
        ("audiojack_0012_NG_C3_20231021140106", ("audiojack_0012_NG", "C3")),
        ("toy_brick_0007_NG_C5_20231021140106", ("toy_brick_0007_NG", "C5")),
        ("transistor1_0100_NG_HS_C2_20231021140106", ("transistor1_0100_NG_HS", "C2")),
        ("pcb_0003_OK_C4", ("pcb_0003_OK", "C4")),
        ("audiojack_0001_OK_20230922093227", None),
        ("image_001", None),
    ],
)
def test_parse_stem(stem, expected):
    assert parse_stem(stem) == expected


# -------------------------------------------------------------------------------- Real-IAD


def test_realiad_groups_by_sample_key_and_view_not_position(realiad):
    root, info = realiad
    train = RealIADDataset(root, "audiojack", "train", 256)
    assert [r.sample_id for r in train.records] == [f"audiojack_000{n}_OK" for n in (1, 2, 3)]
    assert train.view_names == VIEWS
    for index, number in enumerate((1, 2, 3)):
        sample = train[index]
        assert sample.images.shape == (5, 3, H, W)
        for v in range(5):
            assert_view_colour(sample.images[v], number, v)
            assert f"_{VIEWS[v]}_" in Path(sample.image_paths[v]).name
        assert sample.view_labels.tolist() == [0, 0, 0, 0, 0] and sample.sample_label == 0
        assert sample.category == "audiojack"

    # A different shuffle of the JSON gives the same samples.
    root2 = root / "again"
    root2.mkdir()
    build_realiad(root2, shuffle_seed=7)
    again = RealIADDataset(root2, "audiojack", "train", 256)
    assert torch.equal(again[1].images, train[1].images)


def test_realiad_ng_sample_with_some_views_without_mask(realiad):
    root, info = realiad
    test = RealIADDataset(root, "audiojack", "test", 256)
    ids = [r.sample_id for r in test.records]
    assert ids == ["audiojack_0010_OK", "audiojack_0012_NG", "audiojack_0013_NG_QS"]
    ng = test[ids.index("audiojack_0012_NG")]
    assert ng.view_labels.tolist() == [1, 0, 1, 0, 0]
    assert ng.view_labels.dtype == torch.int64 and ng.sample_label.item() == 1
    assert torch.equal(ng.masks[0, 0].bool(), torch.from_numpy(info["masks"][(12, "C1")]))
    assert torch.equal(ng.masks[2, 0].bool(), torch.from_numpy(info["masks"][(12, "C3")]))
    assert ng.masks[[1, 3, 4]].sum() == 0
    for v in range(5):
        assert_view_colour(ng.images[v], 12, v)
    qs = test[ids.index("audiojack_0013_NG_QS")]
    assert qs.view_labels.tolist() == [0, 0, 0, 0, 1]
    ok = test[0]
    assert ok.sample_label.item() == 0 and ok.masks.sum() == 0
    assert test.labels == [0, 1, 1]


def test_realiad_view_subset_order_and_homographies(realiad):
    root, info = realiad
    test = RealIADDataset(root, "audiojack", "test", 256, views=["C3", "C1"])
    sample = test[1]  # audiojack_0012_NG
    assert sample.view_names == ["C3", "C1"]
    assert_view_colour(sample.images[0], 12, 2)
    assert_view_colour(sample.images[1], 12, 0)
    assert sample.view_labels.tolist() == [1, 1]
    Hs = sample.homographies
    assert Hs.shape == (2, 2, 3, 3) and Hs.dtype == torch.float32
    assert torch.allclose(Hs[0, 1], torch.tensor(pair_matrix(2, 0)))  # C3 -> C1
    assert torch.allclose(Hs[1, 0], torch.tensor(pair_matrix(0, 2)))  # C1 -> C3
    assert torch.equal(Hs[0, 0], torch.eye(3))


def test_realiad_resize_keeps_masks_binary_and_rescales_homographies(realiad):
    root, info = realiad
    test = RealIADDataset(root, "audiojack", "test", 256, image_size=(24, 17))
    sample = test[1]
    assert sample.images.shape == (5, 3, 17, 24) and sample.masks.shape == (5, 1, 17, 24)
    assert set(sample.masks.unique().tolist()) == {0.0, 1.0}
    assert sample.images.min() >= -1 and sample.images.max() <= 1
    expected = scale_homography(info["cache"].matrices(VIEWS).double(), (W, H), (24, 17))
    assert torch.allclose(sample.homographies.double(), expected, atol=1e-5)
    # The C1 mask box [2, 12) x [3, 10) scales with the image.
    ys, xs = torch.nonzero(sample.masks[0, 0], as_tuple=True)
    assert abs(xs.float().mean().item() + 0.5 - 7.0 * 24 / W) < 1.0
    assert abs(ys.float().mean().item() + 0.5 - 6.5 * 17 / H) < 1.0


def test_realiad_resolution_raw_and_nested_json_folder(tmp_path):
    info = build_realiad(tmp_path)
    (tmp_path / "realiad_256").rename(tmp_path / "realiad_raw")
    nested = tmp_path / "realiad_jsons" / "realiad_jsons"
    nested.mkdir()
    info["json"].rename(nested / "audiojack.json")
    dataset = RealIADDataset(tmp_path, "audiojack", "train", "raw", homographies=info["cache"])
    assert len(dataset) == 3


def test_realiad_missing_view_names_sample_and_view(realiad):
    root, info = realiad

    def drop(doc):
        doc["test"] = [e for e in doc["test"] if "_0012_NG_C4_" not in e["image_path"]]

    edit_json(info, drop)
    with pytest.raises(DataError, match=r"audiojack_0012_NG.*C4"):
        RealIADDataset(root, "audiojack", "test", 256)
    # Selecting views without C4 is fine.
    assert len(RealIADDataset(root, "audiojack", "test", 256, views=["C1", "C5"])) == 3


def test_realiad_entry_missing_key_names_the_entry(realiad):
    root, info = realiad
    edit_json(info, lambda doc: doc["train"][4].pop("mask_path"))
    with pytest.raises(DataError, match=r"audiojack\.json train\[4\].*mask_path"):
        RealIADDataset(root, "audiojack", "train", 256)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("image_path", 17, r"train\[2\].*'image_path' must be a non-empty string"),
        ("anomaly_class", None, r"train\[2\].*'anomaly_class'"),
        ("mask_path", ["a.png"], r"train\[2\].*'mask_path' must be a string or null"),
        ("category", "zipper", r"train\[2\].*category 'zipper'"),
        ("image_path", "OK/S0001/picture_one.jpg", r"train\[2\].*does not match"),
    ],
)
def test_realiad_entry_wrong_types(realiad, field, value, message):
    root, info = realiad

    def corrupt(doc):
        doc["train"][2][field] = value

    edit_json(info, corrupt)
    with pytest.raises(DataError, match=message):
        RealIADDataset(root, "audiojack", "train", 256)


def test_realiad_duplicated_view(realiad):
    root, info = realiad
    edit_json(info, lambda doc: doc["train"].append(dict(doc["train"][0])))
    with pytest.raises(DataError, match=r"lists view C\d twice"):
        RealIADDataset(root, "audiojack", "train", 256)


def test_realiad_mask_listed_for_ok_sample(realiad):
    root, info = realiad

    def add_mask(doc):
        doc["train"][0]["mask_path"] = "OK/S0001/whatever.png"

    edit_json(info, add_mask)
    with pytest.raises(DataError, match=r"train\[0\].*is 'OK' but lists a mask"):
        RealIADDataset(root, "audiojack", "train", 256)


def test_realiad_unknown_and_empty_category(realiad):
    root, _ = realiad
    with pytest.raises(DataError, match=r"unknown Real-IAD category 'zipper'.*audiojack"):
        RealIADDataset(root, "zipper", "train", 256)
    with pytest.raises(DataError, match="category is empty"):
        RealIADDataset(root, "", "train", 256)
    with pytest.raises(
        DataError, match=r"realiad_512.*resolution folders present: \['realiad_256'"
    ):
        RealIADDataset(root, "audiojack", "train", 512)


def test_realiad_empty_split_and_missing_file(realiad):
    root, info = realiad
    edit_json(info, lambda doc: doc.update(test=[]))
    with pytest.raises(DataError, match="'test' list of category 'audiojack' is empty"):
        RealIADDataset(root, "audiojack", "test", 256)
    victim = info["dir"] / info["entries"]["train"][0]["image_path"]
    victim.unlink()
    with pytest.raises(DataError, match=r"missing files .*" + victim.name):
        RealIADDataset(root, "audiojack", "train", 256)


def test_realiad_corrupt_and_truncated_images_name_the_file(realiad):
    root, info = realiad
    dataset = RealIADDataset(root, "audiojack", "train", 256)
    c2 = dataset.records[1].views[1].image_path
    c2.write_bytes(b"this is not a JPEG at all")
    with pytest.raises(DataError, match=rf"{c2.name} cannot be decoded"):
        dataset[1]
    c4 = dataset.records[2].views[3].image_path
    c4.write_bytes(c4.read_bytes()[: len(c4.read_bytes()) // 2])
    with pytest.raises(DataError, match=rf"{c4.name} is a truncated JPEG"):
        dataset[2]
    assert dataset[0].images.shape == (5, 3, H, W)  # the others still load


def test_realiad_view_size_and_mask_size_mismatch(realiad):
    root, info = realiad
    test = RealIADDataset(root, "audiojack", "test", 256)
    ng = test.records[1]
    write_jpeg(ng.views[4].image_path, flat_image(12, 4, size=(W + 2, H)))
    with pytest.raises(DataError, match=r"view C5 .*42x30 px, but view C1 .*40x30 px"):
        test[1]
    write_jpeg(ng.views[4].image_path, flat_image(12, 4))
    write_mask_png(ng.views[0].mask_path, np.zeros((H, W - 1), dtype=bool))
    with pytest.raises(DataError, match=r"mask .* view C1 is 39x30 px, but its image .* 40x30"):
        test[1]


def test_realiad_without_cache_says_run_vsad_homography(realiad):
    root, _ = realiad
    cache_path_for(root, "audiojack", 256).unlink()
    with pytest.raises(DataError, match="vsad-homography"):
        RealIADDataset(root, "audiojack", "train", 256)


def test_cache_with_other_aspect_ratio_is_rejected(realiad):
    root, _ = realiad
    cache = write_cache(root / "square.json", "audiojack", size=(64, 64))
    dataset = RealIADDataset(root, "audiojack", "train", 256, homographies=cache)
    with pytest.raises(DataError, match="another aspect ratio"):
        dataset[0]


# ----------------------------------------------------------------------------------- MANTA


def build_manta(root: Path, width_per_view: int = 12, height: int = 10) -> Path:
    cls_dir = root / "food" / "nuts"
    for split, folder, names in (
        ("train", "good", ["001", "002"]),
        ("test", "good", ["003"]),
        ("test", "crack", ["004"]),
    ):
        for name in names:
            strip = np.concatenate(
                [flat_image(int(name), v, (width_per_view, height)) for v in range(5)], axis=1
            )
            path = cls_dir / split / folder / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), strip[:, :, ::-1])
            if folder != "good":
                mask = np.zeros((height, 5 * width_per_view), dtype=bool)
                mask[2:5, 2 * width_per_view + 1 : 2 * width_per_view + 4] = True  # view C3 only
                write_mask_png(cls_dir / "ground_truth" / folder / f"{name}_mask.png", mask)
    write_cache(cache_path_for(root, "food/nuts", "manta"), "food/nuts", (width_per_view, height))
    return root


def test_manta_strips_split_into_views(tmp_path):
    root = build_manta(tmp_path)
    train = MantaDataset(root, "food/nuts", "train")
    assert len(train) == 2 and train.view_names == VIEWS
    sample = train[1]
    assert sample.images.shape == (5, 3, 10, 12)
    for v in range(5):
        assert_view_colour(sample.images[v], 2, v)
    test = MantaDataset(root, "food/nuts", "test", views=["C3", "C4"])
    crack = test[[r.sample_id for r in test.records].index("crack/004")]
    assert crack.view_labels.tolist() == [1, 0] and crack.sample_label.item() == 1
    assert crack.masks[0].sum() == 9 and crack.masks[1].sum() == 0


def test_manta_errors(tmp_path):
    root = build_manta(tmp_path)
    bad = root / "food" / "nuts" / "train" / "good" / "005.png"
    cv2.imwrite(str(bad), np.zeros((10, 61, 3), np.uint8))
    with pytest.raises(DataError, match=r"005\.png is 61 px wide, not divisible into 5"):
        MantaDataset(root, "food/nuts", "train")
    bad.unlink()
    (root / "food" / "nuts" / "ground_truth" / "crack" / "004_mask.png").unlink()
    with pytest.raises(DataError, match=r"004\.png has no mask strip"):
        MantaDataset(root, "food/nuts", "test")
    with pytest.raises(DataError, match=r"unknown MANTA category 'food/pears'.*food/nuts"):
        MantaDataset(root, "food/pears", "train")


# ---------------------------------------------------------------------------------- folder


def build_folder(root: Path, views=("C1", "C2", "C10")) -> Path:
    for split, samples in (("train", ["a", "b"]), ("test", ["c"])):
        for number, sample in enumerate(samples):
            for v, view in enumerate(views):
                path = root / split / sample / f"{view}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), flat_image(number, v)[:, :, ::-1])
    mask = np.zeros((H, W), dtype=bool)
    mask[5:9, 5:9] = True
    write_mask_png(root / "test" / "c" / "masks" / "C2.png", mask)
    write_cache(cache_path_for(root, "rig", "folder"), "rig", views=list(views))
    return root


def test_folder_dataset_layout_labels_and_natural_view_order(tmp_path):
    root = build_folder(tmp_path)
    train = MultiViewFolderDataset(root, "train", category="rig")
    assert train.view_names == ["C1", "C2", "C10"]
    assert [r.sample_id for r in train.records] == ["a", "b"]
    assert_view_colour(train[1].images[2], 1, 2)
    test = MultiViewFolderDataset(root, "test", category="rig")
    assert test[0].view_labels.tolist() == [0, 1, 0] and test[0].sample_label.item() == 1
    unlabelled = MultiViewFolderDataset(root / "train", None, category="rig",
                                        homographies=train.homographies)  # fmt: skip
    assert unlabelled[0].sample_label.item() == 0


def test_folder_dataset_errors(tmp_path):
    root = build_folder(tmp_path)
    (root / "train" / "b" / "C10.png").unlink()
    with pytest.raises(DataError, match=r"sample 'b' .* has no view \['C10'\]"):
        MultiViewFolderDataset(root, "train", category="rig")
    cv2.imwrite(str(root / "train" / "b" / "C10.png"), np.zeros((H, W, 3), np.uint8))
    cv2.imwrite(str(root / "train" / "b" / "C10.jpg"), np.zeros((H, W, 3), np.uint8))
    with pytest.raises(DataError, match="two files for view 'C10'"):
        MultiViewFolderDataset(root, "train", category="rig")


@pytest.mark.parametrize("kind", ["manta", "folder"])
def test_other_layouts_through_the_datamodule(kind, tmp_path):
    if kind == "manta":
        root, category, views = build_manta(tmp_path), "food/nuts", ["C1", "C2", "C3", "C4", "C5"]
    else:
        root, category, views = build_folder(tmp_path), "rig", ["C1", "C2", "C10"]
    dm = MultiViewDataModule(str(root), category, dataset=kind, image_size=16, batch_size=2)
    dm.prepare_data()  # the cache the fixture wrote is loaded, not rebuilt
    dm.setup("fit")
    dm.setup("test")
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (2, len(views), 3, 16, 16) and batch.view_names == views
    assert batch.sample_labels.sum() == 0
    labels = torch.cat([b.view_labels for b in dm.test_dataloader()])
    # MANTA: the crack's mask strip only covers C3; folder: sample c has a mask on C2.
    assert labels.sum() == 1 and labels[:, 2 if kind == "manta" else 1].sum() == 1


# ---------------------------------------------------------------------------- image reading


def test_read_image_converts_to_rgb_uint8(tmp_path):
    bgr = np.zeros((4, 5, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    cv2.imwrite(str(tmp_path / "red.png"), bgr)
    assert read_image_rgb(tmp_path / "red.png")[0, 0].tolist() == [255, 0, 0]
    bgra = np.dstack([bgr, np.full((4, 5), 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "red_alpha.png"), bgra)
    assert read_image_rgb(tmp_path / "red_alpha.png").shape == (4, 5, 3)
    grey16 = np.full((4, 5), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "grey16.png"), grey16)
    assert read_image_rgb(tmp_path / "grey16.png")[0, 0].tolist() == [255, 255, 255]
    mask = np.array([[0, 1, 128], [255, 0, 3]], np.uint8)
    cv2.imwrite(str(tmp_path / "mask.png"), mask)
    # Half of full scale is the threshold (JPEG ringing of 1..127 is not a defect).
    assert read_mask(tmp_path / "mask.png").tolist() == [[False, False, True], [True, False, False]]
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png is empty"):
        read_image_rgb(tmp_path / "empty.png")
