"""Per-sample homographies in the data pipeline (``MultiViewDataModule(per_sample_homographies)``):
a sample's own H reaches its batches (rescaled), other samples and pairs keep the category's,
the per-split cache file is estimated once (only for the reduced graph's pairs) and reused, and
under a Trainer only ``prepare_data`` writes it."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn

from vsad_lightning.cli.homography import main as homography_main
from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.data.sample_homographies import sample_cache_path
from vsad_lightning.data.synthetic import TRUTH_DIR
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.per_sample import SampleHomographyFile
from vsad_lightning.geometry.projection import neighbour_mask, scale_homography

CATEGORY = "brick"
NATIVE = 64  # the conftest data's stored size
SIZE = 40  # the batches' size: every H is rescaled
ESTIMATING = "per-sample homographies ("

pytestmark = pytest.mark.filterwarnings("ignore:.*removed from the neighbour graph")


@pytest.fixture
def root(synthetic_root_cached, copy_dataset, tmp_path) -> Path:
    """A copy with the category cache only (other tests' setups add per-sample files)."""
    root = copy_dataset(synthetic_root_cached, tmp_path / "data")
    for path in cache_path_for(root, CATEGORY, NATIVE).parent.glob("*_samples_*.json"):
        path.unlink()
    return root


def make(root: Path, **kwargs) -> MultiViewDataModule:
    options = dict(resolution=NATIVE, image_size=SIZE, batch_size=2, eval_batch_size=3)
    return MultiViewDataModule(str(root), CATEGORY, **{**options, **kwargs})


def category_matrices(root: Path, views: list[str]) -> torch.Tensor:
    true = HomographyCache.load(root / TRUTH_DIR / f"{CATEGORY}.json")
    return scale_homography(true.matrices(views).double(), true.image_size, (SIZE, SIZE)).float()


def train_path(root: Path) -> Path:
    return sample_cache_path(cache_path_for(root, CATEGORY, NATIVE), "train")


def batches_by_sample(dm: MultiViewDataModule) -> dict[str, torch.Tensor]:
    return {
        sample: batch.homographies[b]
        for batch in dm.train_feature_dataloader()
        for b, sample in enumerate(batch.sample_ids)
    }


def test_a_samples_own_homography_reaches_its_batches(root, synthetic_spec, capsys):
    views = synthetic_spec.views
    off = make(root, per_sample_homographies=False)
    off.setup("fit")
    ids = [r.sample_id for r in off.train_normals.records]
    category = category_matrices(root, views)
    assert all(torch.allclose(H, category, atol=1e-4) for H in batches_by_sample(off).values())
    assert not train_path(root).exists()  # flag off: nothing estimated or written

    # A hand-written file in the documented format: the category's H for every sample and
    # neighbour pair, except the first sample's C1->C2, shifted by 3 px.
    true = HomographyCache.load(root / TRUTH_DIR / f"{CATEGORY}.json")
    graph = neighbour_mask("top_and_ring", len(views))
    pairs = [(views[i], views[j]) for i, j in graph.nonzero().tolist()]
    shift = np.array([[1.0, 0.0, 3.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    own = shift @ np.array(true.pairs["C1->C2"].H)
    samples = {
        sample: {f"{s}->{d}": {"H": true.pairs[f"{s}->{d}"].H, "status": "prior"} for s, d in pairs}
        for sample in ids
    }
    samples[ids[0]]["C1->C2"] = {"H": own.tolist(), "status": "refined"}
    document = {"image_size": [NATIVE, NATIVE], "samples": samples}
    train_path(root).write_text(json.dumps(document))
    written = train_path(root).read_bytes()

    dm = make(root)  # per_sample_homographies=True is the default
    dm.setup("fit")
    assert ESTIMATING + "train)" not in capsys.readouterr().out  # read, not estimated
    assert train_path(root).read_bytes() == written
    found = batches_by_sample(dm)
    expected = scale_homography(torch.from_numpy(own), (NATIVE, NATIVE), (SIZE, SIZE)).float()
    assert torch.allclose(found[ids[0]][0, 1], expected, atol=1e-5)
    assert not torch.allclose(found[ids[0]][0, 1], category[0, 1], atol=0.5)
    others = torch.ones(len(views), len(views), dtype=torch.bool)
    others[0, 1] = False
    assert torch.allclose(found[ids[0]][others], category[others], atol=1e-4)
    for sample in ids[1:]:
        assert torch.allclose(found[sample], category, atol=1e-4)
    counts = dm.homography_report()["per_sample"]["train"]["status"]
    assert counts == {"prior": len(ids) * len(pairs) - 1, "refined": 1}


def test_estimated_once_for_the_reduced_graph_and_reused(root, synthetic_spec, capsys):
    dm = make(root)
    dm.setup("fit")  # no Trainer: setup estimates what is missing itself
    out = capsys.readouterr().out
    total = synthetic_spec.samples_train
    assert f"{ESTIMATING}train): {total}/{total} samples" in out and "s per sample" in out
    assert f"{ESTIMATING}test): " in out
    cache = SampleHomographyFile.load(train_path(root))
    assert cache.image_size == (NATIVE, NATIVE) and len(cache.samples) == total
    assert all(len(sample.H) == 16 for sample in cache.samples.values())  # top_and_ring, 5 views
    stamp = train_path(root).stat().st_mtime_ns

    make(root).setup("fit")  # a second setup reuses both files
    assert ESTIMATING not in capsys.readouterr().out
    assert train_path(root).stat().st_mtime_ns == stamp

    # Another category cache (C2<->C3 now unreliable): re-estimated, without that pair.
    path = cache_path_for(root, CATEGORY, NATIVE)
    document = json.loads(path.read_text())
    document["pairs"]["C2->C3"]["status"] = "unreliable"
    path.write_text(json.dumps(document))
    make(root).setup("fit")
    assert f"{ESTIMATING}train): {total}/{total}" in capsys.readouterr().out
    cache = SampleHomographyFile.load(train_path(root))
    assert all(len(s.H) == 14 and "C3->C2" not in s.H for s in cache.samples.values())


def test_under_a_trainer_only_prepare_data_writes(root):
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    trainer.state.fn = TrainerFn.FITTING
    reader = make(root)
    reader.trainer = trainer
    with pytest.raises(DataError, match=r"lacks 8 of the 8 samples of the train split.*prepare"):
        reader.setup("fit")  # a DDP process's setup: never estimates
    assert not train_path(root).exists()

    writer = make(root)
    writer.trainer = trainer
    writer.prepare_data()  # once per node: estimates and writes
    stamp = train_path(root).stat().st_mtime_ns
    other = make(root)
    other.trainer = trainer
    other.setup("fit")  # every process: reads
    assert train_path(root).stat().st_mtime_ns == stamp
    assert other.test_set._sample_matrices and other.train_normals._sample_matrices


@pytest.mark.parametrize(
    "document, message",
    [
        ({"samples": {}}, "missing key 'image_size'"),
        ({"image_size": [64], "samples": {}}, "image_size"),
        ({"image_size": [64, 64], "samples": {"s": {"C1->C2": {"H": [[1, 0], [0, 1]]}}}}, "'s'"),
        (
            {
                "image_size": [64, 64],
                "samples": {"s": {"C1->C2": {"H": [[0] * 3] * 3, "status": "x"}}},
            },
            "singular",
        ),
    ],
)
def test_a_bad_per_sample_file_is_one_clear_error(tmp_path, document, message):
    path = tmp_path / "samples.json"
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=message) as info:
        SampleHomographyFile.load(path)
    assert str(path) in str(info.value)


def test_the_cli_writes_the_file_the_datamodule_reuses(root, synthetic_spec, capsys):
    """``vsad-homography --per-sample`` without ``--out`` writes the split's default file with
    the fingerprints, and a later setup reads it instead of estimating again."""
    args = ["--root", str(root), "--category", CATEGORY, "--resolution", str(NATIVE)]
    assert homography_main([*args, "--per-sample", "--split", "train"]) == 0
    assert f"wrote {train_path(root)}" in capsys.readouterr().out
    written = SampleHomographyFile.load(train_path(root))
    assert written.prior is not None and len(written.sources) == synthetic_spec.samples_train
    stamp = train_path(root).stat().st_mtime_ns

    dm = make(root)
    dm.setup("fit")
    out = capsys.readouterr().out
    assert ESTIMATING + "train)" not in out and ESTIMATING + "test)" in out
    assert train_path(root).stat().st_mtime_ns == stamp
    assert dm.homography_report()["per_sample"]["train"]["file"] == str(train_path(root))
