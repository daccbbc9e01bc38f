"""Registration to the reference pose (``MultiViewDataModule(register_views=True)``,
docs/method.md#registration): a sample displaced by a known sub-pixel motion registers back,
maps come back to the original frame where ``R_v^-1`` says, registered cross-view homographies
agree with the realistic rig's per-sample truth, off changes nothing, and the cache is reused
and rebuilt when the reference changes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.data.dataset import SampleRecord, ViewFile, read_sample_views
from vsad_lightning.data.realiad import index_realiad
from vsad_lightning.data.registration import (
    ensure_registration,
    reference_record,
    registration_matrices,
)
from vsad_lightning.data.synthetic import sample_truth_path, write_synthetic_dataset
from vsad_lightning.data.transforms import views_to_tensors
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.projection import (
    neighbour_mask,
    pixel_centre_grid,
    project_points,
    scale_homography,
    to_opencv_convention,
)
from vsad_lightning.geometry.registration import maps_to_original
from vsad_lightning.system.module import AnomalyPrediction, to_original_frames

CATEGORY = "board"
NATIVE = 128
SIZE = 64

pytestmark = pytest.mark.filterwarnings("ignore:.*removed from the neighbour graph")


@pytest.fixture(scope="module")
def rig(tmp_path_factory) -> Path:
    """The realistic rig's busy category at 128 px, 3 training and 2 test samples."""
    root = tmp_path_factory.mktemp("rig")
    write_synthetic_dataset(
        root, [CATEGORY], image_size=NATIVE, samples_train=3, samples_test=2, rig="realistic"
    )
    return root


def transfer_error(H: np.ndarray, G: np.ndarray, size: int, margin: int) -> float:
    """Largest distance between ``H p`` and ``G p`` over a grid inside the image."""
    xs = np.linspace(margin, size - margin, 9)
    points = torch.tensor([(x, y) for x in xs for y in xs], dtype=torch.float64)
    a, _ = project_points(torch.as_tensor(H, dtype=torch.float64), points)
    b, _ = project_points(torch.as_tensor(G, dtype=torch.float64), points)
    return float((a - b).norm(dim=-1).max())


def moved(angle_deg: float, shift: tuple[float, float], size: int) -> np.ndarray:
    """A rotation by ``angle_deg`` about the image centre followed by ``shift`` (pixel-centre)."""
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    centre = size / 2
    to_centre = np.array([[1, 0, -centre], [0, 1, -centre], [0, 0, 1.0]])
    rotate = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    back = np.array([[1, 0, centre + shift[0]], [0, 1, centre + shift[1]], [0, 0, 1.0]])
    return back @ rotate @ to_centre


def test_a_displaced_copy_of_the_reference_registers_back(rig, tmp_path):
    train, views = index_realiad(rig, CATEGORY, "train", NATIVE, None)
    reference = reference_record(train, CATEGORY)
    assert reference.sample_id == min(r.sample_id for r in train)
    images, _ = read_sample_views(reference)
    motions = [moved(0.4 * (v - 2), (0.6 - 0.3 * v, 0.35 * v - 0.5), NATIVE) for v in range(5)]
    files = []
    for view, image, A in zip(views, images, motions, strict=True):
        # The part moved by A: the sample shows at A p what the reference shows at p.
        warped = cv2.warpPerspective(
            image,
            to_opencv_convention(A),
            (NATIVE, NATIVE),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        path = tmp_path / f"moved_{view}.png"
        cv2.imwrite(str(path), cv2.cvtColor(warped, cv2.COLOR_RGB2BGR))
        files.append(ViewFile(view, path))
    record = SampleRecord("moved_0001_OK", CATEGORY, "OK", tuple(files))
    found = ensure_registration(
        [record], reference, tmp_path / "reg.json", split="test", write=True, progress=None
    )
    R = registration_matrices(found, record.sample_id, views)
    for v, A in enumerate(motions):
        assert found.samples[record.sample_id].status[f"{views[v]}->{views[v]}@ref"] == "refined"
        assert transfer_error(R[v], np.linalg.inv(A), NATIVE, 16) < 0.3, views[v]
    # The reference itself is never estimated: the identity.
    assert (
        ensure_registration([reference], reference, tmp_path / "r.json", split="x", write=True)
        is None
    )
    assert np.array_equal(registration_matrices(found, reference.sample_id, views)[0], np.eye(3))


def test_maps_come_back_where_the_inverse_registration_puts_them():
    H = W = 48
    R = torch.tensor(moved(3.0, (2.3, -1.7), H), dtype=torch.float32)
    peak = torch.tensor([30.25, 17.5])  # in the registered frame
    centres = pixel_centre_grid(W, H)
    blob = torch.exp(-((centres - peak) ** 2).sum(-1) / (2 * 2.0**2)).view(1, 1, 1, H, W)
    registration = torch.stack([torch.eye(3), R]).unsqueeze(0)  # view 0 unregistered
    out = maps_to_original(blob.repeat(1, 2, 1, 1, 1), registration)
    expected, _ = project_points(torch.linalg.inv(R.double()), peak.double().view(1, 2))
    for v, where in enumerate((peak.double(), expected[0])):
        weights = out[0, v, 0].flatten().double()
        weights = torch.where(weights > 0.5 * weights.max(), weights, torch.zeros_like(weights))
        centroid = (weights[:, None] * centres.double()).sum(0) / weights.sum()
        assert (centroid - where).norm() < 0.1, v
    masks = maps_to_original((blob > 0.5).repeat(1, 2, 1, 1, 1), registration)
    assert masks.dtype == torch.bool and masks[0, 1, 0].sum() > 0
    # Identity registration (off): the prediction object comes back untouched.
    prediction = AnomalyPrediction(blob, torch.zeros(1, 1), torch.zeros(1))
    assert to_original_frames(prediction, torch.eye(3).expand(1, 1, 3, 3)) is prediction
    moved_prediction = to_original_frames(prediction, R.view(1, 1, 3, 3))
    assert moved_prediction.normalised_maps is moved_prediction.anomaly_maps


def test_registered_homographies_follow_the_per_sample_truth(rig, capsys):
    dm = MultiViewDataModule(
        str(rig), CATEGORY, resolution=NATIVE, image_size=SIZE, register_views=True
    )
    dm.setup("test")
    assert "registration (test): 2/2 samples" in capsys.readouterr().out
    truth = json.loads(sample_truth_path(rig, CATEGORY).read_text())
    views = dm.view_names
    pairs = neighbour_mask("top_and_ring", len(views)).nonzero().tolist()
    points = torch.tensor([(x, y) for x in (20.0, 32.0, 44.0) for y in (20.0, 32.0, 44.0)])
    checked = 0
    for batch in dm.test_dataloader():
        for b, sample in enumerate(batch.sample_ids):
            R = batch.registration[b].double()
            assert not torch.allclose(R, torch.eye(3, dtype=torch.float64).expand_as(R))
            for v, u in pairs:
                key = f"{views[v]}->{views[u]}"
                true = torch.tensor(truth["samples"][sample][key]["H"], dtype=torch.float64)
                true = scale_homography(true, tuple(truth["image_size"]), (SIZE, SIZE))
                registered, _ = project_points(R[v], points.double())
                carried, _ = project_points(batch.homographies[b, v, u].double(), registered)
                expected, _ = project_points(R[u] @ true, points.double())
                assert (carried - expected).norm(dim=-1).max() < 0.5, (sample, key)
                checked += 1
    assert checked == 2 * len(pairs)


def test_off_changes_nothing_and_the_cache_is_reused_then_rebuilt(rig, capsys):
    off = MultiViewDataModule(str(rig), CATEGORY, resolution=NATIVE, image_size=SIZE)
    off.setup("test")
    on = MultiViewDataModule(
        str(rig), CATEGORY, resolution=NATIVE, image_size=SIZE, register_views=True
    )
    on.setup("test")  # the file of the previous test (or written now)
    capsys.readouterr()
    batch_off = next(iter(off.test_dataloader()))
    batch_on = next(iter(on.test_dataloader()))
    images, masks = read_sample_views(off.test_set.records[0])
    raw_images, raw_masks = views_to_tensors(images, masks, (SIZE, SIZE))
    assert torch.equal(batch_off.images[0], raw_images)
    assert torch.equal(batch_off.registration, torch.eye(3).expand(2, 5, 3, 3))
    assert off.homography_report()["registration"] is None
    # On: the images move, the masks stay in the original frames.
    assert not torch.equal(batch_on.images[0], raw_images)
    assert torch.equal(batch_on.masks[0], raw_masks)
    assert torch.equal(batch_on.view_labels, batch_off.view_labels)

    again = MultiViewDataModule(
        str(rig), CATEGORY, resolution=NATIVE, image_size=SIZE, register_views=True
    )
    again.setup("test")
    assert "registration (" not in capsys.readouterr().out  # reused
    report = again.homography_report()["registration"]
    path = Path(report["splits"]["test"]["file"])
    assert report["reference"] == f"{CATEGORY}_0001_OK" and path.is_file()

    # Another reference pose: the file's fingerprint no longer matches, every sample again.
    train, views = index_realiad(rig, CATEGORY, "train", NATIVE, None)
    test, _ = index_realiad(rig, CATEGORY, "test", NATIVE, None)
    other = ensure_registration(test, train[1], path, split="test", write=True)
    assert "registration (test): 2/2 samples" in capsys.readouterr().out
    before = registration_matrices(again.registration["test"], test[0].sample_id, views)
    after = registration_matrices(other, test[0].sample_id, views)
    assert not np.allclose(before, after)


def test_a_hand_placement_beyond_the_gate_registers_through_the_anchor(rig, tmp_path):
    """A move of the part as large as two hand placements apart (a 6 deg turn and a shift of
    6 px at 128 px: up to ~10 px at the part's corners, twice the estimator's 5 px gate at this
    size) registers every view through the placement prior, and an identity prior does not."""
    dm = MultiViewDataModule(str(rig), CATEGORY, resolution=NATIVE, image_size=SIZE)
    dm.prepare_data()
    category = HomographyCache.load(dm.cache_path)
    train, views = index_realiad(rig, CATEGORY, "train", NATIVE, None)
    reference = reference_record(train, CATEGORY)
    images, _ = read_sample_views(reference)
    truth = json.loads(sample_truth_path(rig, CATEGORY).read_text())["samples"]
    true = {
        v: np.asarray(truth[reference.sample_id][f"C1->{v}"]["H"]) if v != "C1" else np.eye(3)
        for v in views
    }
    A1 = moved(6.0, (4.5, -4.0), NATIVE)
    # The part moved in its own plane: each view sees that move through the TRUE homographies
    # of the reference's placement (the category cache the prior uses differs by a pixel or two).
    motions = [true[v] @ A1 @ np.linalg.inv(true[v]) for v in views]
    files = []
    for view, image, A in zip(views, images, motions, strict=True):
        warped = cv2.warpPerspective(
            image, to_opencv_convention(A), (NATIVE, NATIVE), flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )  # fmt: skip
        path = tmp_path / f"placed_{view}.png"
        cv2.imwrite(str(path), cv2.cvtColor(warped, cv2.COLOR_RGB2BGR))
        files.append(ViewFile(view, path))
    record = SampleRecord("placed_0001_OK", CATEGORY, "OK", tuple(files))

    def errors(found) -> list[float]:
        R = registration_matrices(found, record.sample_id, views)
        # Inside the part in every view: the central half of the image.
        return [
            transfer_error(R[v], np.linalg.inv(A), NATIVE, NATIVE // 4)
            for v, A in enumerate(motions)
        ]

    placed = ensure_registration(
        [record], reference, tmp_path / "placed.json", split="test", write=True,
        category=category, progress=None,
    )  # fmt: skip
    status = placed.samples[record.sample_id].status
    assert all(status[f"{v}->{v}@ref"] == "refined" for v in views), status
    assert max(errors(placed)) < 0.3, errors(placed)
    identity = ensure_registration(
        [record], reference, tmp_path / "identity.json", split="test", write=True, progress=None
    )
    assert max(errors(identity)) > 2.0, errors(identity)


def test_without_an_anchor_view_the_prior_is_the_identity(rig):
    """A category cache in which no view has a reliable pair to every other view gives no
    anchor: the placement prior falls back to the identity instead of failing."""
    from dataclasses import replace

    from vsad_lightning.data.registration import PlacementPrior, anchor_view, identity_prior

    dm = MultiViewDataModule(str(rig), CATEGORY, resolution=NATIVE, image_size=SIZE)
    dm.prepare_data()
    category = HomographyCache.load(dm.cache_path)
    train, views = index_realiad(rig, CATEGORY, "train", NATIVE, None)
    assert anchor_view(category, views) == "C1"
    broken = replace(
        category,
        pairs={
            k: replace(p, status="unreliable") if k in ("C1->C3", "C2->C4", "C3->C1") else p
            for k, p in category.pairs.items()
        },
    )
    assert anchor_view(broken, views) == "C4"  # the first view that reaches every other
    no_anchor = replace(
        category, pairs={k: replace(p, status="unreliable") for k, p in category.pairs.items()}
    )
    assert anchor_view(no_anchor, views) is None
    reference = reference_record(train, CATEGORY)
    images, _ = read_sample_views(reference)
    named = dict(zip(views, images, strict=True))
    base = identity_prior(reference, (NATIVE, NATIVE), no_anchor)
    prior = PlacementPrior(named, no_anchor, base)
    assert prior.matrices(named) is None and prior(reference, named) is base
