"""Anomaly metrics: binned pixel metrics against exact references, exact view/sample metrics,
bounded memory, DDP reduction, and the metric files."""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from skimage.measure import label as skimage_label

from vsad_lightning.errors import DataError
from vsad_lightning.metrics import (
    AnomalyMetrics,
    ScoreBinning,
    collect_metrics,
    exact_auroc,
    exact_average_precision,
    format_metrics_table,
    label_regions,
    write_metrics,
)

SMALL_BINS = 2**12  # for tests that do not measure binning error
BINNING_CLAIM = 1e-4  # README: binned pixel metrics are within this of the exact values


# --------------------------------------------------------------------------- references
# Written independently of vsad_lightning.metrics.curves: exact curves over every distinct score.


def reference_roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact AUROC: ROC point at every distinct score (high to low), trapezoid area."""
    thresholds = np.unique(scores)[::-1]
    positives, negatives = scores[labels == 1], scores[labels == 0]
    pos_sorted, neg_sorted = np.sort(positives), np.sort(negatives)
    # Count of scores >= t, for every threshold t.
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, thresholds, side="left")
    fp = len(neg_sorted) - np.searchsorted(neg_sorted, thresholds, side="left")
    tpr = np.r_[0.0, tp / len(positives)]
    fpr = np.r_[0.0, fp / len(negatives)]
    return float(np.sum((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2))


def reference_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's AP: sum over distinct thresholds of (recall step) x precision."""
    thresholds = np.unique(scores)[::-1]
    pos_sorted = np.sort(scores[labels == 1])
    all_sorted = np.sort(scores)
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, thresholds, side="left")
    predicted = len(all_sorted) - np.searchsorted(all_sorted, thresholds, side="left")
    recall = tp / len(pos_sorted)
    precision = tp / predicted
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def reference_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Exact AUPRO in the MVTec AD way, with scikit-image's labelling (8-connectivity).

    maps, masks: (num_views, H, W). At every distinct score t (high to low): FPR = normal pixels
    >= t / all normal pixels; PRO = mean over regions of (region pixels >= t) / region size.
    """
    fp_change = np.zeros(maps.shape)  # 1 on normal pixels
    pro_change = np.zeros(maps.shape)  # 1/|region| on region pixels
    num_regions = 0
    for view in range(maps.shape[0]):
        regions = skimage_label(masks[view], connectivity=2)
        fp_change[view][regions == 0] = 1.0
        for region_id in range(1, regions.max() + 1):
            in_region = regions == region_id
            pro_change[view][in_region] = 1.0 / in_region.sum()
        num_regions += regions.max()
    order = np.argsort(-maps.ravel(), kind="stable")
    sorted_scores = maps.ravel()[order]
    fpr = np.cumsum(fp_change.ravel()[order]) / fp_change.sum()
    pro = np.cumsum(pro_change.ravel()[order]) / num_regions
    last_of_tie = np.r_[np.diff(sorted_scores) != 0, True]
    fpr = np.r_[0.0, fpr[last_of_tie]]
    pro = np.r_[0.0, pro[last_of_tie]]
    # Area up to max_fpr, cutting the segment that crosses it.
    area = 0.0
    for i in range(1, len(fpr)):
        x0, x1, y0, y1 = fpr[i - 1], fpr[i], pro[i - 1], pro[i]
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


# ------------------------------------------------------------------------------ helpers


def labels_from_masks(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    view_labels = masks.flatten(2).amax(dim=2).long()
    return view_labels, view_labels.amax(dim=1)


def update_from_maps(
    metric: AnomalyMetrics, maps: torch.Tensor, masks: torch.Tensor, decide: bool = False
) -> None:
    """Update with view score = max of the map and sample score = max over its views;
    ``decide``: also OK/NG decisions, NG above the batch's median view score."""
    view_labels, sample_labels = labels_from_masks(masks)
    view_scores = maps.flatten(2).amax(dim=2)
    decisions = {}
    if decide:
        pred_view = (view_scores > view_scores.median()).long()
        decisions = {"pred_view_labels": pred_view, "pred_sample_labels": pred_view.amax(dim=1)}
    metric.update(
        maps, masks, view_scores, view_scores.amax(dim=1), view_labels, sample_labels, **decisions
    )


def synthetic_batch(
    generator: torch.Generator, batch: int, views: int, size: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-normal distances times ``scale``; rectangular defects raise them by a random factor.

    Half the samples are normal; each anomalous sample has a defect in one or two views. The
    defect strength varies per region, so regions differ in how easy they are (AUPRO != AUROC).
    """
    masks = torch.zeros(batch, views, 1, size, size)
    strength = torch.zeros(batch, views, 1, size, size)
    for b in range(batch // 2, batch):
        for v in torch.randperm(views, generator=generator)[: 1 + b % 2].tolist():
            for _ in range(1 + (b + v) % 3):  # 1 to 3 rectangles, possibly touching
                h, w = torch.randint(2, size // 3, (2,), generator=generator).tolist()
                y, x = torch.randint(0, size - max(h, w), (2,), generator=generator).tolist()
                masks[b, v, 0, y : y + h, x : x + w] = 1
                factor = 0.2 + 0.8 * torch.rand((), generator=generator)
                strength[b, v, 0, y : y + h, x : x + w] = factor
    noise = torch.randn(masks.shape, generator=generator) * 0.35
    maps = scale * torch.exp(noise + strength)
    return maps, masks


def tensor_state_bytes(metric: AnomalyMetrics) -> int:
    return sum(
        value.numel() * value.element_size()
        for name in metric._defaults
        if isinstance(value := getattr(metric, name), torch.Tensor)
    )


# ------------------------------------------------------------------- binned vs exact (pixel)


def test_binned_pixel_metrics_match_exact_references_across_scales_and_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    metric = AnomalyMetrics()
    all_maps, all_masks = [], []
    # Batches at very different scales (pooled into one ROC), one with heavy ties (scores
    # rounded to two significant digits) and one with negative scores.
    for index, scale in enumerate([1e-3, 1.0, 1e3, 1.0, 30.0]):
        maps, masks = synthetic_batch(generator, batch=4, views=3, size=40, scale=scale)
        if index == 3:
            maps = torch.round(maps * 100) / 100  # ties within and across classes
        if index == 4:
            maps = maps - 45.0  # negative distances around zero
        update_from_maps(metric, maps, masks)
        all_maps.append(maps)
        all_masks.append(masks)
    maps = torch.cat(all_maps).double().numpy()  # float32 values, exactly as the metric saw them
    masks = torch.cat(all_masks).numpy()
    assert len(np.unique(maps)) < maps.size * 0.95, "the data should hold ties"

    result = metric.compute()
    scores, labels = maps.ravel(), masks.ravel().astype(int)
    exact_auc = reference_roc_auc(scores, labels)
    exact_ap = reference_average_precision(scores, labels)
    exact_pro = reference_aupro(maps.reshape(-1, 40, 40), masks.reshape(-1, 40, 40))
    assert 0.6 < exact_auc < 0.97 and 0.1 < exact_pro < 0.9  # not a trivial case
    # The README's claim: binned pixel metrics within 1e-4 of the exact values. Measured here:
    # 4e-7 (AUROC), 4e-5 (AP), 5e-6 (AUPRO); the bound is the claim, 2.5x the worst error.
    assert abs(result["pixel_auroc"] - exact_auc) < BINNING_CLAIM
    assert abs(result["pixel_ap"] - exact_ap) < BINNING_CLAIM
    assert abs(result["pixel_aupro"] - exact_pro) < BINNING_CLAIM
    assert result["n_pixels"] == maps.size
    assert result["n_views"] == 5 * 4 * 3 and result["n_samples"] == 5 * 4


def test_exact_view_level_functions_match_references_with_ties() -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=300) + rng.integers(0, 2, 300), 1)  # many ties
    labels = (rng.random(300) < 0.3).astype(int)
    scores[labels == 1] += 0.4
    pairwise = np.mean(
        (scores[labels == 1][:, None] > scores[labels == 0][None, :])
        + 0.5 * (scores[labels == 1][:, None] == scores[labels == 0][None, :])
    )
    assert exact_auroc(scores, labels) == pytest.approx(pairwise, abs=1e-12)
    reference = reference_roc_auc(scores, labels)
    assert exact_auroc(scores, labels) == pytest.approx(reference, abs=1e-12)
    assert exact_average_precision(scores, labels) == pytest.approx(
        reference_average_precision(scores, labels), abs=1e-12
    )


def test_scikit_learn_agrees() -> None:
    # scikit-learn is in the test extras (pyproject.toml): this comparison always runs.
    from sklearn import metrics as sklearn_metrics

    rng = np.random.default_rng(2)
    scores = np.round(rng.normal(size=500), 1)
    labels = (rng.random(500) < 0.4).astype(int)
    assert exact_auroc(scores, labels) == pytest.approx(
        sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12
    )
    assert exact_average_precision(scores, labels) == pytest.approx(
        sklearn_metrics.average_precision_score(labels, scores), abs=1e-12
    )


# ------------------------------------------------------------------------------- binning


def test_binning_resolves_the_same_relative_gap_at_every_scale() -> None:
    binning = ScoreBinning()
    assert binning.relative_resolution < 1e-3
    scales = torch.logspace(-4, 8, 25, dtype=torch.float64)
    gap = 1 + 2 * binning.relative_resolution
    low = binning.bin_index(scales.float())
    high = binning.bin_index((scales * gap).float())
    assert torch.all(high > low), "a 2-bin relative gap must land in a higher bin at every scale"
    ordered = torch.sort(torch.randn(10_000, dtype=torch.float64) * 1e3).values.float()
    assert torch.all(torch.diff(binning.bin_index(ordered)) >= 0), "binning must be monotone"
    edges = binning.lower_edges()
    assert torch.all(torch.diff(edges) > 0)
    # A score just above a lower edge lands in that bin (negative, near zero, positive).
    probe = torch.tensor([100, 70_000, 100_000], dtype=torch.long)
    just_above = edges[probe] + edges[probe].abs() * 1e-5
    assert torch.equal(binning.bin_index(just_above.float()), probe)
    extreme = binning.bin_index(torch.tensor([-1e30, 1e30]))
    assert extreme.tolist() == [0, binning.num_bins - 1]


def test_label_regions_uses_8_connectivity_and_never_joins_views() -> None:
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 2, 4] = True  # separate region
    masks[0, 4, :] = True  # bottom row of view 0 ...
    masks[1, 0, :] = True  # ... and top row of view 1 must stay two regions
    labels, num_regions = label_regions(masks)
    assert num_regions == 4
    assert labels[0, 0, 0] == labels[0, 1, 1] != 0
    assert labels[0, 4, 0] != labels[1, 0, 0]
    assert len(np.unique(labels[masks])) == 4 and np.all(labels[~masks] == 0)


# --------------------------------------------------------------------------- known values


def test_hand_computed_aupro_and_auroc() -> None:
    """Two samples of one 1x7 view; the second is normal (its pixels count for the FPR).

    Sample 0: defect region A = pixels 0-1 (scores .9, .5), region B = pixels 5-6 (.4, .6),
    normal pixels .7, .4, .1. Sample 1, all normal: .8 .4 .15 .12 .11 .05 .01. So 10 normal
    pixels. Thresholds high to low (FPR, PRO): .9 -> (0, .25); .8 -> (.1, .25);
    .7 -> (.2, .25); .6 -> (.2, .5); .5 -> (.2, .75); .4 (two normals and B tie) -> (.4, 1).
    Area to FPR .3: .2 * .25 + .1 * (.75 + .875) / 2 = .13125 (PRO .875 interpolated at .3);
    AUPRO = .13125 / .3 = .4375. AUROC: (10 + 8 + 8 + 7) / 40 = .825 (the .4 tie counts half).
    """
    maps = torch.tensor(
        [[[[[0.9, 0.5, 0.7, 0.4, 0.1, 0.4, 0.6]]]], [[[[0.8, 0.4, 0.15, 0.12, 0.11, 0.05, 0.01]]]]]
    )
    masks = torch.tensor([[[[[1, 1, 0, 0, 0, 1, 1]]]], [[[[0, 0, 0, 0, 0, 0, 0]]]]]).float()
    metric = AnomalyMetrics()
    update_from_maps(metric, maps, masks)
    result = metric.compute()
    assert result["pixel_aupro"] == pytest.approx(0.4375, abs=1e-9)
    assert result["pixel_auroc"] == pytest.approx(0.825, abs=1e-12)
    assert result["n_regions"] == 2
    # AP by hand: positives at ranks .9 (1/1), .6 (2/4), .5 (3/5), then .4 enters with two
    # normals (4/8): (1 + .5 + .6 + .5) / 4.
    assert result["pixel_ap"] == pytest.approx((1 + 0.5 + 0.6 + 0.5) / 4, abs=1e-12)


def test_perfect_reversed_and_random_scores() -> None:
    generator = torch.Generator().manual_seed(3)
    _, masks = synthetic_batch(generator, batch=6, views=3, size=32, scale=1.0)

    perfect = AnomalyMetrics(num_bins=SMALL_BINS)
    maps = 10.0 + masks * 5 + torch.rand(masks.shape, generator=generator)
    update_from_maps(perfect, maps, masks)
    result = perfect.compute()
    for key in ("pixel_auroc", "pixel_ap", "pixel_aupro", "view_auroc", "view_ap"):
        assert result[key] == pytest.approx(1.0, abs=1e-9), key
    assert result["sample_auroc"] == 1.0 and result["sample_ap"] == 1.0

    reversed_metric = AnomalyMetrics(num_bins=SMALL_BINS)
    maps = 10.0 - masks * 5 + torch.rand(masks.shape, generator=generator)
    view_labels, sample_labels = labels_from_masks(masks)
    view_scores = -view_labels.float()  # anomalous views score lower
    reversed_metric.update(
        maps, masks, view_scores, -sample_labels.float(), view_labels, sample_labels
    )
    result = reversed_metric.compute()
    for key in ("pixel_auroc", "pixel_aupro", "view_auroc", "sample_auroc"):
        assert result[key] == pytest.approx(0.0, abs=1e-9), key

    random_metric = AnomalyMetrics()
    update_from_maps(random_metric, torch.rand(masks.shape, generator=generator) * 100, masks)
    result = random_metric.compute()
    assert result["pixel_auroc"] == pytest.approx(0.5, abs=0.02)
    assert result["pixel_aupro"] == pytest.approx(0.15, abs=0.03)  # PRO ~ FPR: area .045/.3


def test_raw_distances_are_not_squashed_like_logits() -> None:
    """50..5000 distances give the AUROC of the same scores / 5000 (anomalib#3407)."""
    generator = torch.Generator().manual_seed(4)
    _, masks = synthetic_batch(generator, batch=4, views=3, size=32, scale=1.0)
    maps = 50 + 4950 * torch.rand(masks.shape, generator=generator) ** (2 - masks)
    raw, divided = AnomalyMetrics(), AnomalyMetrics()
    update_from_maps(raw, maps, masks)
    update_from_maps(divided, maps / 5000, masks)
    raw_result, divided_result = raw.compute(), divided.compute()
    assert raw_result["pixel_auroc"] > 0.6
    # Both are binned estimates of the same exact value, each within BINNING_CLAIM of it;
    # measured apart: 3e-6 (AUROC), 4e-5 (AP), 8e-6 (AUPRO).
    for key in ("pixel_auroc", "pixel_ap", "pixel_aupro"):
        assert raw_result[key] == pytest.approx(divided_result[key], abs=BINNING_CLAIM), key
    for key in ("view_auroc", "view_ap", "sample_auroc", "sample_ap"):
        assert raw_result[key] == divided_result[key], key


# --------------------------------------------------------------------- memory and merging


def test_pixel_state_size_does_not_grow_with_updates() -> None:
    generator = torch.Generator().manual_seed(5)
    metric = AnomalyMetrics()
    update_from_maps(metric, *synthetic_batch(generator, 2, 2, 32, 1.0))
    after_one = tensor_state_bytes(metric)
    for _ in range(19):
        update_from_maps(metric, *synthetic_batch(generator, 2, 2, 32, 1.0))
    assert tensor_state_bytes(metric) == after_one
    assert metric.compute()["n_pixels"] == 20 * 2 * 2 * 32 * 32


def test_merged_halves_equal_one_metric_over_everything() -> None:
    generator = torch.Generator().manual_seed(6)
    batches = [synthetic_batch(generator, 4, 3, 24, scale) for scale in (0.5, 2.0, 7.0)]
    whole, first, second = (AnomalyMetrics(num_bins=SMALL_BINS) for _ in range(3))
    for index, batch in enumerate(batches):
        update_from_maps(whole, *batch)
        update_from_maps(first if index < 2 else second, *batch)
    first.merge_state(second)
    for name in ("normal_pixel_hist", "anomalous_pixel_hist", "region_overlap_hist", "num_regions"):
        assert torch.equal(getattr(first, name), getattr(whole, name)), name
    assert first.compute() == whole.compute()


def _ddp_worker(rank: int, rendezvous: str, batches: list, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        metric = AnomalyMetrics(num_bins=SMALL_BINS)
        # Uneven shards: rank 0 gets two batches, rank 1 one.
        for batch in batches[:2] if rank == 0 else batches[2:]:
            update_from_maps(metric, *batch, decide=True)
        result = metric.compute()  # syncs states over the process group
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_ddp_reduction_over_two_processes(tmp_path: Path, ddp_rendezvous: str) -> None:
    generator = torch.Generator().manual_seed(7)
    batches = [synthetic_batch(generator, 2, 3, 16, scale) for scale in (1.0, 3.0, 9.0)]
    single = AnomalyMetrics(num_bins=SMALL_BINS)
    for batch in batches:
        update_from_maps(single, *batch, decide=True)
    expected = single.compute()
    assert {"view_f1", "sample_fpr"} <= set(expected)  # the decision counts are reduced too
    mp.spawn(_ddp_worker, args=(ddp_rendezvous, batches, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == pytest.approx(expected, abs=1e-12), rank


def test_decision_metrics_against_a_hand_count() -> None:
    metric = AnomalyMetrics(num_bins=SMALL_BINS)
    view_labels = torch.tensor([[1, 0], [0, 0], [1, 1]])
    pred_views = torch.tensor([[1, 1], [0, 1], [0, 1]])
    pred_samples = torch.tensor([0, 1, 1])
    masks = torch.zeros(3, 2, 1, 4, 4)  # views labelled anomalous may have empty masks
    maps = torch.rand(3, 2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    scores = maps.flatten(2).amax(dim=2)
    for rows in (slice(0, 2), slice(2, 3)):  # two batches: the counts add up
        metric.update(
            maps[rows], masks[rows], scores[rows], scores[rows].amax(dim=1), view_labels[rows],
            view_labels[rows].amax(dim=1), pred_view_labels=pred_views[rows],
            pred_sample_labels=pred_samples[rows],
        )  # fmt: skip
    result = metric.compute()
    # Views: TP (0,0) (2,1); FP (0,1) (1,1); FN (2,0); TN (1,0).
    assert result["view_f1"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 1))
    assert result["view_fpr"] == pytest.approx(2 / 3)
    assert result["view_fnr"] == pytest.approx(1 / 3)
    # Samples (labels 1, 0, 1): TP sample 2, FP sample 1, FN sample 0, no TN.
    assert result["sample_f1"] == pytest.approx(0.5)
    assert result["sample_fpr"] == pytest.approx(1.0)
    assert result["sample_fnr"] == pytest.approx(0.5)
    # Without decisions there are no decision metrics; with some batches only, NaN.
    plain = AnomalyMetrics(num_bins=SMALL_BINS)
    plain.update(maps, masks, scores, scores.amax(1), view_labels, view_labels.amax(1))
    assert "view_f1" not in plain.compute()
    plain.update(
        maps, masks, scores, scores.amax(1), view_labels, view_labels.amax(1),
        pred_view_labels=pred_views, pred_sample_labels=pred_samples,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="no OK/NG decision"):
        assert math.isnan(plain.compute()["view_fpr"])


# -------------------------------------------------------------------------- bad input


def test_inconsistent_sample_label_is_an_error_naming_the_sample() -> None:
    metric = AnomalyMetrics(num_bins=SMALL_BINS)
    maps = torch.rand(3, 2, 1, 8, 8)
    masks = torch.zeros_like(maps)
    view_labels = torch.tensor([[0, 0], [0, 1], [0, 0]])
    sample_labels = torch.tensor([0, 0, 0])  # sample 1 has an anomalous view
    view_scores, sample_scores = maps.amax((2, 3, 4)), maps.amax((1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"sample 1 of the batch.*view labels \[0, 1\]"):
        metric.update(maps, masks, view_scores, sample_scores, view_labels, sample_labels)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("nan_map", r"sample 1 of the batch .*view 0: the anomaly map holds NaN"),
        ("soft_mask", r"sample 0 of the batch .*view 1: the mask holds values other than 0 and 1"),
        ("unlabelled_mask", r"sample 1 of the batch .*view 1: the mask has defect pixels"),
        ("bad_shape", r"view_scores must have shape \(2, 2\)"),
    ],
)
def test_bad_batches_are_rejected(change: str, message: str) -> None:
    maps = torch.rand(2, 2, 1, 8, 8)
    masks = torch.zeros_like(maps)
    view_labels = torch.zeros(2, 2, dtype=torch.long)
    view_scores = maps.amax((2, 3, 4))
    if change == "nan_map":
        maps[1, 0, 0, 3, 3] = float("nan")
    if change == "soft_mask":
        masks[0, 1, 0, 2, 2] = 0.5
    if change == "unlabelled_mask":
        masks[1, 1, 0, 2, 2] = 1.0
    if change == "bad_shape":
        view_scores = view_scores[:, :1]
    sample_scores, sample_labels = maps.amax((1, 2, 3, 4)), view_labels.amax(1)
    metric = AnomalyMetrics(num_bins=SMALL_BINS)
    with pytest.raises(ValueError, match=message):
        metric.update(maps, masks, view_scores, sample_scores, view_labels, sample_labels)


def test_only_normal_data_gives_nan_with_a_warning() -> None:
    metric = AnomalyMetrics(num_bins=SMALL_BINS)
    maps = torch.rand(2, 2, 1, 8, 8)
    update_from_maps(metric, maps, torch.zeros_like(maps))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = metric.compute()
    for key in ("pixel_auroc", "pixel_ap", "pixel_aupro", "view_auroc", "sample_ap"):
        assert math.isnan(result[key]), key
    assert any("pixel_aupro set to NaN" in str(w.message) for w in caught)
    assert result["n_samples"] == 2 and result["n_pixels"] == 2 * 2 * 64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = AnomalyMetrics(num_bins=SMALL_BINS).compute()  # before any update: no crash
    assert math.isnan(fresh["sample_auroc"]) and fresh["n_views"] == 0


# ------------------------------------------------------------------------------- export


def test_write_metrics_round_trip(tmp_path: Path) -> None:
    metrics = {
        "pixel_auroc": 0.97, "pixel_ap": 0.5, "pixel_aupro": float("nan"), "view_auroc": 0.9,
        "view_ap": 0.8, "sample_auroc": torch.tensor(0.95), "sample_ap": np.float64(0.92),
        "n_samples": 20.0, "n_views": 100.0, "n_pixels": 6553600.0, "n_regions": 31.0,
    }  # fmt: skip
    run = tmp_path / "realiad" / "audiojack" / "version_0"
    json_path, csv_path = write_metrics(run, metrics, "audiojack")
    assert json_path == run / "metrics.json" and csv_path == run / "metrics.csv"
    assert "null" in json_path.read_text() and "NaN" not in json_path.read_text()
    data = json.loads(json_path.read_text())
    assert data["category"] == "audiojack" and data["pixel_aupro"] is None
    assert data["sample_auroc"] == pytest.approx(0.95) and data["n_samples"] == 20
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 1 and rows[0]["category"] == "audiojack"
    assert float(rows[0]["view_ap"]) == 0.8 and rows[0]["pixel_aupro"] == ""
    assert list(rows[0]) == list(data)
    assert sorted(p.name for p in run.iterdir()) == ["metrics.csv", "metrics.json"]  # no temp files

    other_run = tmp_path / "realiad" / "bottle" / "version_0"
    write_metrics(other_run, {**metrics, "pixel_auroc": 0.8}, "bottle")
    collected = collect_metrics(tmp_path)
    assert [row["category"] for row in collected] == ["audiojack", "bottle"]
    assert math.isnan(collected[0]["pixel_aupro"]) and collected[1]["pixel_auroc"] == 0.8
    assert collected[0]["run_dir"] == str(run)

    with pytest.raises(ValueError, match="lack"):
        write_metrics(tmp_path / "x", {"pixel_auroc": 1.0}, "x")


def test_collect_metrics_names_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "cat" / "version_1" / "metrics.json"
    broken.parent.mkdir(parents=True)
    broken.write_text('{"category": "cat", "pixel_auroc": 0.9')
    with pytest.raises(DataError, match=str(broken)):
        collect_metrics(tmp_path)


def test_format_metrics_table_has_a_mean_row() -> None:
    rows = [
        {"category": "a", "pixel_auroc": 0.9, "sample_auroc": 0.8, "view_ap": float("nan")},
        {"category": "b", "pixel_auroc": 0.8, "sample_auroc": 1.0, "view_ap": 0.5},
    ]
    rows[0]["n_samples"], rows[1]["n_samples"] = 10, 12
    table = format_metrics_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 2 + 1  # header, rule, two categories, mean
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    mean = [cell.strip() for cell in lines[-1].strip("|").split("|")]
    assert mean[0] == "mean"
    assert mean[header.index("pixel_auroc")] == "85.00"
    assert mean[header.index("sample_auroc")] == "90.00"
    assert mean[header.index("view_ap")] == "50.00 (1/2)"
    assert mean[header.index("pixel_aupro")] == "n/a"
    first = [cell.strip() for cell in lines[2].strip("|").split("|")]
    assert first[header.index("view_ap")] == "n/a" and first[header.index("n_samples")] == "10"
