"""Unreliable homography pairs leave the neighbour graph: the datamodule's batches carry the
graph's mask minus every unreliable pair (both directions), and MVAM and the consistency loss
L_r, fed from such a batch, do not look across the removed pair.

The category cache is written by hand with translations (at 64 px) chosen so that view C3's
reliable neighbours (C1, C4) only see its left quarter: whatever C3 holds elsewhere can only
reach L_r through the removed pair C2<->C3.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.geometry.projection import neighbour_mask, scale_homography
from vsad_lightning.models.frm import consistency_loss
from vsad_lightning.models.mvam import MVAM

CATEGORY = "brick"
SIZE = 64  # the conftest data's stored size, also the batches' image size here
FEATURES = 16  # feature map side (image / 4)
SHIFT_PX = 48  # C3 <-> C1 and C3 <-> C4: C3's columns 0..15 (image px) only
VIEWS = ["C1", "C2", "C3", "C4", "C5"]

pytestmark = pytest.mark.filterwarnings("ignore:.*removed from the neighbour graph")


def translation(tx: float) -> list[list[float]]:
    return [[1.0, 0.0, tx], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def shift_of(src: str, dst: str) -> float:
    """The hand-made rig: C3 sits far to the left of C1 and C4, the others 2 px apart."""
    if src == "C3" and dst in ("C1", "C4"):
        return SHIFT_PX
    if dst == "C3" and src in ("C1", "C4"):
        return -SHIFT_PX
    index = VIEWS.index
    return 2.0 * (index(dst) - index(src))


@pytest.fixture
def unreliable_root(synthetic_root_cached, copy_dataset, tmp_path) -> Path:
    """The conftest data with a hand-made cache in which C2<->C3 is unreliable."""
    root = copy_dataset(synthetic_root_cached, tmp_path / "data")
    path = cache_path_for(root, CATEGORY, SIZE)
    document = json.loads(path.read_text())
    for key, pair in document["pairs"].items():
        src, dst = key.split("->")
        pair["H"] = translation(shift_of(src, dst))
        pair["status"] = "unreliable" if {src, dst} == {"C2", "C3"} else "ok"
    path.write_text(json.dumps(document))
    return root


@pytest.fixture
def batch(unreliable_root):
    dm = MultiViewDataModule(
        str(unreliable_root), CATEGORY, resolution=SIZE, image_size=SIZE, batch_size=2
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_batches_carry_the_graph_without_the_unreliable_pair(batch):
    graph = neighbour_mask("top_and_ring", 5)
    mask = batch.neighbour_mask
    assert not mask[1, 2] and not mask[2, 1]  # C2 <-> C3 removed, both directions
    expected = graph.clone()
    expected[1, 2] = expected[2, 1] = False
    assert torch.equal(mask, expected)  # every reliable neighbour pair is kept
    assert mask[1, 0] and mask[1, 4] and mask[2, 0] and mask[2, 3]


def feature_homographies(batch) -> torch.Tensor:
    return scale_homography(batch.homographies.double(), (SIZE, SIZE), (FEATURES,) * 2).float()


def test_mvam_does_not_look_across_a_removed_pair(batch):
    g = torch.Generator().manual_seed(0)
    B, V, C = batch.batch_size, batch.num_views, 8
    module = MVAM(C, attention_dim=8, num_heads=2)
    with torch.no_grad():
        module.to_out.weight.copy_(torch.randn(module.to_out.weight.shape, generator=g))
    H = feature_homographies(batch)
    x = torch.randn(B, V, C, FEATURES, FEATURES, generator=g)
    c3_changed, c1_changed = x.clone(), x.clone()
    c3_changed[:, 2] += 3 * torch.randn(B, C, FEATURES, FEATURES, generator=g)
    c1_changed[:, 0] += 3 * torch.randn(B, C, FEATURES, FEATURES, generator=g)
    with torch.no_grad():
        out = module(x, H, batch.neighbour_mask)
        assert torch.equal(module(c3_changed, H, batch.neighbour_mask)[:, 1], out[:, 1])
        assert not torch.allclose(module(c1_changed, H, batch.neighbour_mask)[:, 1], out[:, 1])
        # The whole graph would have let C3 in (the removal is what keeps it out).
        full = neighbour_mask("top_and_ring", V)
        assert not torch.allclose(module(c3_changed, H, full)[:, 1], module(x, H, full)[:, 1])


def test_consistency_loss_does_not_compare_across_a_removed_pair(batch):
    g = torch.Generator().manual_seed(1)
    B, V, C = batch.batch_size, batch.num_views, 6
    H = feature_homographies(batch)
    mask = batch.neighbour_mask
    x = torch.randn(B, V, C, FEATURES, FEATURES, generator=g)
    # C2 would look at C3 everywhere (the unreliable pair's placeholder is the identity); C3's
    # reliable neighbours only reach its columns < 5 (48 px shift = 12 feature columns).
    assert torch.equal(batch.homographies[0, 1, 2], torch.eye(3))
    right = (slice(None), slice(None), slice(None), slice(8, None))
    c3_changed, c1_changed = x.clone(), x.clone()
    c3_changed[:, 2][right] = torch.randn_like(c3_changed[:, 2][right])
    # C2 -> C1 is a reliable pair (2 px shift): C2 looks at C1's right half too.
    c1_changed[:, 0][right] = torch.randn_like(c1_changed[:, 0][right])
    base = consistency_loss(x, H, mask)
    assert base > 0
    assert torch.equal(consistency_loss(c3_changed, H, mask), base)
    assert not torch.allclose(consistency_loss(c1_changed, H, mask), base)
    # The whole graph would have compared C2 with C3 there.
    full = neighbour_mask("top_and_ring", V)
    assert not torch.allclose(consistency_loss(c3_changed, H, full), consistency_loss(x, H, full))
