"""MultiViewDataModule: batch shapes and dtypes, binary masks after resizing, homographies
rescaled from the truth, splits, the feature loader, cache creation and config errors."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from vsad_lightning.data.batch import MultiViewBatch
from vsad_lightning.data.datamodule import MultiViewDataModule, ResumableShuffleSampler
from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.data.synthetic import TRUTH_DIR, write_synthetic_dataset
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.projection import neighbour_mask, scale_homography


def category_of(root: Path) -> str:
    """The one category of a conftest synthetic root."""
    (json_path,) = (root / "realiad_jsons").glob("*.json")
    return json_path.stem


def truth(root: Path) -> HomographyCache:
    return HomographyCache.load(root / TRUTH_DIR / f"{category_of(root)}.json")


def make(root: Path, **kwargs) -> MultiViewDataModule:
    native = truth(root).image_size[0]  # the synthetic data is square, in realiad_<N>
    # The category's homographies: these tests check them rescaled from the truth exactly;
    # each sample's own estimates are tests/test_sample_homographies.py's.
    options = dict(
        resolution=native,
        image_size=40,
        batch_size=3,
        eval_batch_size=4,
        per_sample_homographies=False,
    )
    options.update(kwargs)
    return MultiViewDataModule(str(root), category_of(root), **options)


def check_batch(batch: MultiViewBatch, size: int, views: list[str], true: HomographyCache):
    B, V = batch.batch_size, len(views)
    assert batch.images.shape == (B, V, 3, size, size) and batch.images.dtype == torch.float32
    assert batch.images.min() >= -1.0 and batch.images.max() <= 1.0
    assert batch.images.min() < -0.5 and batch.images.max() > 0.5  # really normalised
    assert batch.masks.shape == (B, V, 1, size, size) and batch.masks.dtype == torch.float32
    assert set(batch.masks.unique().tolist()) <= {0.0, 1.0}
    assert batch.view_labels.shape == (B, V) and batch.view_labels.dtype == torch.int64
    assert batch.sample_labels.shape == (B,) and batch.sample_labels.dtype == torch.int64
    assert torch.equal(batch.sample_labels, batch.view_labels.amax(dim=1))
    assert batch.homographies.shape == (B, V, V, 3, 3)
    assert batch.homographies.dtype == torch.float32
    expected = scale_homography(true.matrices(views).double(), true.image_size, (size, size))
    expected = expected.float()
    for b in range(B):
        assert torch.allclose(batch.homographies[b], expected, rtol=1e-5, atol=1e-4)
    assert batch.view_names == views and len(batch.sample_ids) == B


def test_fit_and_test_batches(synthetic_root_cached, synthetic_spec):
    root = synthetic_root_cached
    dm = make(root)
    dm.prepare_data()  # the cache exists: loads it, estimates nothing
    dm.setup("fit")
    loader = dm.train_dataloader()
    # A DistributedSampler, so Lightning keeps it under DDP (tests/test_faults.py covers it).
    assert isinstance(loader.sampler, ResumableShuffleSampler)
    batch = next(iter(loader))
    check_batch(batch, 40, synthetic_spec.views, truth(root))
    assert batch.batch_size == 3 and batch.sample_labels.sum() == 0
    assert torch.equal(batch.neighbour_mask, neighbour_mask("top_and_ring", 5))
    assert dm.val_dataloader() == []  # val_fraction 0: Lightning skips validation

    dm.setup("test")
    labels = []
    for batch in dm.test_dataloader():
        check_batch(batch, 40, synthetic_spec.views, truth(root))
        labels += batch.sample_labels.tolist()
        anomalous = batch.view_labels.bool()
        # A view with a (resized) defect pixel is labelled anomalous.
        has_pixels = batch.masks.flatten(2).amax(dim=2) > 0
        assert not (has_pixels & ~anomalous).any()
    assert (
        sum(labels) == synthetic_spec.anomalous_test and len(labels) == synthetic_spec.samples_test
    )


def test_masks_stay_binary_and_aligned_after_resize(synthetic_root_cached):
    dm = make(synthetic_root_cached, image_size=27, neighbour_graph="all")
    dm.setup("test")
    dataset = dm.test_set
    index = dataset.labels.index(1)
    _, raw_masks = dataset.read_raw(index)
    sample = dataset[index]
    checked = 0
    for v, raw in enumerate(raw_masks):
        resized = sample.masks[v, 0]
        assert set(resized.unique().tolist()) <= {0.0, 1.0}
        if raw is None:
            assert resized.sum() == 0
            continue
        # Nearest pixel centre: output pixel i reads input pixel floor((i + 0.5) * 64 / 27),
        # written here independently of the resize code. Exact equality, so a mask that is
        # shifted by one pixel or flipped fails.
        h, w = raw.shape
        rows = np.minimum(((np.arange(27) + 0.5) * h / 27).astype(int), h - 1)
        cols = np.minimum(((np.arange(27) + 0.5) * w / 27).astype(int), w - 1)
        expected = torch.from_numpy(raw[np.ix_(rows, cols)].astype(np.float32))
        assert expected.sum() > 0, "the defect must survive the resize for this check to mean much"
        assert torch.equal(resized, expected), v
        # A one-pixel shift of the mask would not pass the check above.
        assert not torch.equal(expected, expected.roll(1, 0))
        assert not torch.equal(expected, expected.roll(1, 1))
        checked += 1
    assert checked >= 1, "no view of the anomalous sample has a defect mask"


def test_validation_split_and_feature_loader(synthetic_root_cached, synthetic_spec):
    dm = make(synthetic_root_cached, val_fraction=0.25, seed=3)
    dm.setup("fit")
    train_ids = {dm.train_normals.records[i].sample_id for i in dm.train_set.indices}
    val_ids = {dm.train_normals.records[i].sample_id for i in dm.val_set.indices}
    assert len(val_ids) == 2 and len(train_ids) == synthetic_spec.samples_train - 2
    assert not train_ids & val_ids
    again = make(synthetic_root_cached, val_fraction=0.25, seed=3)
    again.setup("fit")
    assert again.val_set.indices == dm.val_set.indices  # deterministic from the seed
    other = make(synthetic_root_cached, val_fraction=0.25, seed=4)
    other.setup("fit")
    assert other.val_set.indices != dm.val_set.indices
    val_batch = next(iter(dm.val_dataloader()))
    assert set(val_batch.sample_ids) == val_ids

    features = dm.train_feature_dataloader()
    assert isinstance(features.sampler, SequentialSampler)
    ids = [i for batch in features for i in batch.sample_ids]
    assert ids == [r.sample_id for r in dm.train_normals.records]  # all of them, in order
    assert len(ids) == synthetic_spec.samples_train


@pytest.fixture(scope="module")
def root_128(tmp_path_factory, synthetic_spec) -> Path:
    """The conftest category at 128 px (8 normals, 2 test samples), without a cache.

    At 64 px the pooled estimate rejects nearly every pair (0 of 20 "ok" with 4 samples), so
    the accuracy check below would check the identity fallback only; at 128 px with the
    default 8 samples every pair is estimated.
    """
    root = tmp_path_factory.mktemp("root_128")
    write_synthetic_dataset(
        root, [synthetic_spec.category], synthetic_spec.seed, image_size=128, samples_train=8,
        samples_test=2,
    )  # fmt: skip
    return root


def test_prepare_data_builds_a_missing_cache(root_128, synthetic_spec):
    root = root_128
    N = 128
    path = cache_path_for(root, synthetic_spec.category, N)
    assert not path.exists()
    dm = make(root, homography_samples=8)
    dm.prepare_data()
    cache = HomographyCache.load(path)
    assert cache.views == synthetic_spec.views and cache.image_size == (N, N)
    dm.setup("fit")
    assert dm.homographies.to_json() == cache.to_json()
    # The estimated pairs agree with the truth: the image centre lands within 1 px of where
    # the true homography puts it (measured: at most MEASURED_CENTRE_PX).
    true = truth(root).matrices()
    estimated = cache.matrices()
    ok = [key for key, pair in cache.pairs.items() if pair.status == "ok"]
    assert len(ok) >= 18, f"only {len(ok)} of {len(cache.pairs)} pairs estimated"
    for key in ok:
        src, dst = (synthetic_spec.views.index(v) for v in key.split("->"))
        centre = torch.tensor([[N / 2, N / 2, 1.0]], dtype=torch.float64)
        a = centre @ estimated[src, dst].double().T
        b = centre @ true[src, dst].double().T
        assert torch.dist(a[:, :2] / a[:, 2:], b[:, :2] / b[:, 2:]) < 1.0, key


def test_view_subset_and_graph_errors(synthetic_root_cached):
    dm = make(synthetic_root_cached, views=["C2", "C3", "C4"], neighbour_graph="top_and_ring")
    with pytest.raises(DataError, match="top_and_ring.*needs the top view C1 first"):
        dm.setup("fit")
    dm = make(synthetic_root_cached, views=["C3", "C2", "C4"], neighbour_graph="ring")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    check_batch(batch, 40, ["C3", "C2", "C4"], truth(synthetic_root_cached))
    assert torch.equal(batch.neighbour_mask, neighbour_mask("ring", 3))
    with pytest.raises(DataError, match="neighbour_graph"):
        make(synthetic_root_cached, neighbour_graph="star")
    with pytest.raises(DataError, match="val_fraction"):
        make(synthetic_root_cached, val_fraction=1.0)


def test_image_size_null_is_the_stored_resolution(synthetic_root_cached, synthetic_spec):
    root = synthetic_root_cached
    native = truth(root).image_size[0]
    dm = make(root, image_size=None)
    assert dm.image_size == native and dm.hparams["image_size"] == native
    assert dm.hparams_initial["image_size"] == native  # what Lightning compares with the model
    dm.setup("fit")
    check_batch(next(iter(dm.train_dataloader())), native, synthetic_spec.views, truth(root))
    with pytest.raises(DataError, match="data.resolution is 'raw', not a size in px"):
        make(root, image_size=None, resolution="raw")
    with pytest.raises(DataError, match="at least 8, got 4"):
        make(root, image_size=None, resolution=4)


def test_anomalous_sample_in_train_is_an_error_naming_it(
    synthetic_root_cached, copy_dataset, tmp_path
):
    root = copy_dataset(synthetic_root_cached, tmp_path / "root")
    category = category_of(root)
    json_path = root / "realiad_jsons" / f"{category}.json"
    doc = json.loads(json_path.read_text())
    ng = [e for e in doc["test"] if e["anomaly_class"] != "OK"]
    number = Path(ng[0]["image_path"]).stem.split("_")[1]
    doc["train"] += [e for e in ng if f"_{number}_" in e["image_path"]]
    # Moved, not copied: an image listed in both splits is refused before this check.
    doc["test"] = [e for e in doc["test"] if f"_{number}_" not in e["image_path"]]
    json_path.write_text(json.dumps(doc))
    dm = make(root)
    with pytest.raises(DataError, match=rf"training split .*{category}_{number}_NG"):
        dm.setup("fit")


def test_predict_folder_has_zero_labels_and_the_category_homographies(
    synthetic_root_cached, synthetic_spec, tmp_path
):
    import shutil

    dm = make(synthetic_root_cached)
    dm.setup("test")
    for record in dm.test_set.records[:3]:
        folder = tmp_path / "incoming" / record.sample_id
        folder.mkdir(parents=True)
        for vf in record.views:
            shutil.copy(vf.image_path, folder / f"{vf.view}.jpg")
    dm = make(synthetic_root_cached, predict_root=str(tmp_path / "incoming"))
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert sum(b.batch_size for b in batches) == 3
    check_batch(batches[0], 40, synthetic_spec.views, truth(synthetic_root_cached))
    assert batches[0].sample_labels.sum() == 0 and batches[0].masks.sum() == 0
    with pytest.raises(DataError, match="predict_root"):
        make(synthetic_root_cached).setup("predict")


def test_lightning_trainer_drives_the_datamodule(synthetic_root_cached):
    """The real Trainer calls prepare_data/setup and iterates the loaders."""

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.seen: list[str] = []

        def training_step(self, batch, batch_idx):
            assert isinstance(batch, MultiViewBatch)
            self.seen += batch.sample_ids
            return (self.weight - batch.images.mean()) ** 2

        def validation_step(self, batch, batch_idx):
            self.log(
                "val_loss", (self.weight - batch.images.mean()) ** 2, batch_size=batch.batch_size
            )

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    # The default per-sample homographies: prepare_data estimates, setup reads.
    dm = make(synthetic_root_cached, val_fraction=0.25, per_sample_homographies=True)
    model = Probe()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, datamodule=dm)
    assert sorted(model.seen) == sorted(
        dm.train_normals.records[i].sample_id for i in dm.train_set.indices
    )
    assert "val_loss" in trainer.callback_metrics
