"""Pictures of a test run: which samples are chosen, the figures, and the curves they plot."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vsad_lightning.callbacks.outputs import AnomalyMapPictures
from vsad_lightning.data.batch import MultiViewBatch
from vsad_lightning.metrics.curves import (
    binned_average_precision,
    binned_precision_recall,
    exact_auroc,
    exact_average_precision,
    exact_precision_recall,
    exact_roc,
)
from vsad_lightning.visualization.figures import ColourScale, sample_figure

V, H = 5, 16


def _batch(ids: list[str], truths: list[int]) -> MultiViewBatch:
    B = len(ids)
    masks = torch.zeros(B, V, 1, H, H)
    for b, truth in enumerate(truths):
        if truth:
            masks[b, 0, 0, 4:9, 4:9] = 1
    return MultiViewBatch(
        images=torch.zeros(B, V, 3, H, H),
        masks=masks,
        view_labels=masks.flatten(2).amax(2).long(),
        sample_labels=torch.tensor(truths),
        homographies=torch.eye(3).repeat(B, V, V, 1, 1),
        neighbour_mask=~torch.eye(V, dtype=torch.bool),
        sample_ids=ids,
        categories=["c"] * B,
        view_names=[f"C{v + 1}" for v in range(V)],
    )


def _outputs(scores: list[float], threshold: float) -> SimpleNamespace:
    sample = torch.tensor(scores)
    view = sample[:, None].repeat(1, V)
    return SimpleNamespace(
        normalised_maps=torch.zeros(len(scores), V, 1, H, H),
        view_scores=view,
        sample_scores=sample,
        pred_view_labels=(view > threshold).long(),
        pred_sample_labels=(sample > threshold).long(),
    )


def test_pictured_samples_are_false_alarms_misses_and_typical_detections():
    pictures = AnomalyMapPictures(num_samples=2)
    trainer = SimpleNamespace(is_global_zero=True)
    pictures.on_test_epoch_start(trainer, None)
    # Normals score 0..9, anomalies 10..29 (one missed at 0.5 and one at 1.5); threshold 5.
    normals = [(f"n{i:02d}", float(i), 0) for i in range(10)]
    anomalies = [(f"a{i:02d}", float(10 + i), 1) for i in range(20)]
    anomalies += [("a_miss1", 0.5, 1), ("a_miss2", 1.5, 1)]
    everything = normals + anomalies
    order = np.random.default_rng(0).permutation(len(everything))
    for start in range(0, len(order), 4):
        part = [everything[i] for i in order[start : start + 4]]
        pictures.on_test_batch_end(
            trainer,
            None,
            _outputs([s for _, s, _ in part], threshold=5.0),
            _batch([n for n, _, _ in part], [t for _, _, t in part]),
            0,
        )
    chosen = {(kind, rank): e["sample_id"] for kind, rank, e in pictures.chosen()}
    assert chosen[("false_alarm", 1)] == "n09" and chosen[("false_alarm", 2)] == "n08"
    assert chosen[("miss", 1)] == "a_miss1" and chosen[("miss", 2)] == "a_miss2"
    # Detections: anomalies above the threshold (10..29, median 19.5), nearest the median.
    detections = [e for kind, _, e in pictures.chosen() if kind == "detection"]
    assert len(detections) == 2
    assert all(10 <= e["sample_score"] <= 29 for e in detections)
    assert all(e["sample_truth"] == 1 and e["sample_decision"] == 1 for e in detections)
    # From a reservoir of 8 of the 20 detections, the two nearest the median of all 20.
    assert all(abs(e["sample_score"] - 19.5) <= 5.5 for e in detections), detections


def test_sample_figure_has_the_dataset_resolution_fixed_scale_and_contour():
    images = torch.zeros(V, 3, H, H)
    masks = torch.zeros(V, 1, H, H)
    masks[2, 0, 4:12, 4:12] = 1
    maps = torch.zeros(V, 1, H, H)
    maps[2, 0, 4:12, 4:12] = 3.0
    scale = ColourScale(0.0, 4.0, (2.0,) * V, 2.5, "test scale")
    kwargs = dict(
        view_names=[f"C{v + 1}" for v in range(V)],
        sample_id="s1",
        view_scores=[0.0, 0.0, 3.0, 0.0, 0.0],
        sample_score=3.0,
        masks=masks,
        view_decisions=[0, 0, 1, 0, 0],
        sample_decision=1,
        view_truth=[0, 0, 1, 0, 0],
        sample_truth=1,
    )
    picture = sample_figure(images, maps, scale, panel_px=128, **kwargs)
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert picture.shape[1] >= V * 128 and picture.shape[0] >= 2 * 128
    pure_green = (picture[..., 1] > 200) & (picture[..., 0] < 60) & (picture[..., 2] < 60)
    assert pure_green.sum() > 4 * 20, "the ground-truth contour is missing"
    # The same map under another sample's larger maximum draws the same colours: the scale
    # is the run's, not the sample's.
    brighter = maps.clone()
    brighter[4, 0, 0, 0] = 100.0
    again = sample_figure(images, brighter, scale, panel_px=128, **kwargs)
    left = picture.shape[1] // 2
    assert np.array_equal(picture[:, :left], again[:, :left])


def test_curves_agree_with_the_areas_the_metrics_report():
    rng = np.random.default_rng(1)
    scores = np.round(rng.normal(size=200), 1)  # ties on purpose
    labels = rng.random(200) < 0.3
    scores[labels] += 0.8
    fpr, tpr = exact_roc(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(exact_auroc(scores, labels), abs=1e-12)
    recall, precision = exact_precision_recall(scores, labels)
    area = np.sum(np.diff(np.r_[0.0, recall]) * precision)
    assert area == pytest.approx(exact_average_precision(scores, labels), abs=1e-12)
    positive = rng.integers(0, 5, size=64)
    negative = rng.integers(0, 50, size=64)
    recall, precision = binned_precision_recall(positive, negative)
    area = np.sum(np.diff(np.r_[0.0, recall]) * precision)
    assert area == pytest.approx(binned_average_precision(positive, negative), abs=1e-12)
