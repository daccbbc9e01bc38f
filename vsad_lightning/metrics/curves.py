"""Threshold curves and their areas: binned (pixel level) and exact (view and sample level).

docs/evaluation.md. Pixel scores arrive as histograms over fixed score bins (see
``anomaly.ScoreBinning``); a bin is one threshold "score >= lower edge of the bin", and scores
that share a bin are tied. View and sample scores are few, so they are kept and handled exactly.

Every function works in float64 numpy on the CPU and returns NaN when the area is undefined (no
positives or no negatives); the caller decides whether to warn. Raw distances are used as they
are: nothing here applies a sigmoid or reads scores as logits (anomalib#3407).
"""

from __future__ import annotations

import numpy as np


def trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under the piecewise-linear curve through ``(x, y)`` from ``x[0]`` to ``x_max``.

    ``x`` must be non-decreasing. When ``x_max`` falls between two points the curve is cut
    there, with ``y`` interpolated linearly (the usual AUPRO convention, MVTec AD's
    ``trapezoid(..., x_max=0.3)``). When the curve ends before ``x_max`` the area stops at its end.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    num_inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.trapezoid(y[:num_inside], x[:num_inside]))
    if 0 < num_inside < len(x):
        x0, x1 = x[num_inside - 1], x[num_inside]  # x0 <= x_max < x1, so x1 > x0
        y0, y1 = y[num_inside - 1], y[num_inside]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_cut) * (x_max - x0)
    return float(area)


def _from_top(hist: np.ndarray) -> np.ndarray:
    """Running totals from the highest bin down: entry k counts everything in the k+1 top bins."""
    return np.cumsum(np.asarray(hist, dtype=np.float64)[::-1])


def binned_roc(positive_hist: np.ndarray, negative_hist: np.ndarray) -> tuple[np.ndarray, ...]:
    """ROC points ``(fpr, tpr)`` for thresholds at every bin, from (0, 0) to (1, 1)."""
    fpr = np.concatenate([[0.0], _from_top(negative_hist) / float(np.sum(negative_hist))])
    tpr = np.concatenate([[0.0], _from_top(positive_hist) / float(np.sum(positive_hist))])
    return fpr, tpr


def binned_auroc(positive_hist: np.ndarray, negative_hist: np.ndarray) -> float:
    """AUROC from binned scores: trapezoid over the binned ROC.

    The trapezoid is what gives a positive and a negative that share a bin half a point, as
    exact AUROC does for a tied pair.
    """
    if np.sum(positive_hist) == 0 or np.sum(negative_hist) == 0:
        return float("nan")
    fpr, tpr = binned_roc(positive_hist, negative_hist)
    return float(np.trapezoid(tpr, fpr))


def binned_average_precision(positive_hist: np.ndarray, negative_hist: np.ndarray) -> float:
    """Average precision from binned scores, scikit-learn's step-wise definition.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over thresholds from high to low, where a threshold is a
    bin: recall rises only at bins holding positives, so only those bins contribute.
    """
    num_positive = float(np.sum(positive_hist))
    if num_positive == 0 or np.sum(negative_hist) == 0:
        return float("nan")
    true_pos = _from_top(positive_hist)
    false_pos = _from_top(negative_hist)
    new_pos = np.asarray(positive_hist, dtype=np.float64)[::-1]
    has_pos = new_pos > 0
    precision = true_pos[has_pos] / (true_pos[has_pos] + false_pos[has_pos])
    return float(np.sum(new_pos[has_pos] / num_positive * precision))


def binned_aupro(
    region_overlap_hist: np.ndarray,
    num_regions: int,
    normal_hist: np.ndarray,
    max_fpr: float = 0.3,
) -> float:
    """Normalised area under the PRO curve up to ``max_fpr`` from binned scores.

    ``region_overlap_hist[b]`` is ``sum_r (pixels of region r in bin b) / |r|`` over all
    ground-truth regions, so its running total from the top bin down, divided by the number of
    regions, is the mean per-region overlap (PRO) at each threshold. ``normal_hist`` counts all
    normal pixels (of anomalous and normal views alike) and gives the FPR at the same thresholds.
    The area up to ``max_fpr`` (cut there by interpolation) is divided by ``max_fpr``.
    """
    if num_regions == 0 or np.sum(normal_hist) == 0:
        return float("nan")
    fpr = np.concatenate([[0.0], _from_top(normal_hist) / float(np.sum(normal_hist))])
    pro = np.concatenate([[0.0], _from_top(region_overlap_hist) / float(num_regions)])
    return float(trapezoid_up_to(fpr, pro, max_fpr) / max_fpr)


def _as_scores_and_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores but {labels.size} labels")
    return scores, labels


def exact_auroc(scores, labels) -> float:
    """Exact AUROC by ranks (Mann-Whitney U); tied scores get their average rank.

    Equals the trapezoidal area under the exact ROC: a tied positive/negative pair counts half.
    """
    scores, labels = _as_scores_and_labels(scores, labels)
    num_pos = int(labels.sum())
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    group_starts = np.flatnonzero(np.r_[True, np.diff(sorted_scores) != 0])
    group_ends = np.r_[group_starts[1:], scores.size]
    # 1-based ranks start+1 .. end share their mean (start + 1 + end) / 2.
    average_rank = (group_starts + 1 + group_ends) / 2.0
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = np.repeat(average_rank, group_ends - group_starts)
    rank_sum = ranks[labels].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def exact_average_precision(scores, labels) -> float:
    """Exact average precision, scikit-learn's definition: ``sum_n (R_n - R_{n-1}) P_n``.

    Thresholds are the distinct scores, from high to low; tied scores enter together.
    """
    scores, labels = _as_scores_and_labels(scores, labels)
    num_pos = int(labels.sum())
    if num_pos == 0 or num_pos == labels.size:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    true_pos = np.cumsum(labels[order])
    false_pos = np.cumsum(~labels[order])
    last_of_tie = np.r_[np.diff(sorted_scores) != 0, True]
    true_pos, false_pos = true_pos[last_of_tie], false_pos[last_of_tie]
    recall = true_pos / num_pos
    precision = true_pos / (true_pos + false_pos)
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def binned_precision_recall(
    positive_hist: np.ndarray, negative_hist: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """PR points ``(recall, precision)`` for thresholds at every bin holding a score, from the
    top bin down: the curve whose step-wise area is ``binned_average_precision``."""
    true_pos = _from_top(positive_hist)
    false_pos = _from_top(negative_hist)
    flagged = true_pos + false_pos
    keep = flagged > 0
    recall = true_pos[keep] / max(float(np.sum(positive_hist)), 1.0)
    return recall, true_pos[keep] / flagged[keep]


def _exact_counts(scores, labels) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Running true/false positives for thresholds at each distinct score, high to low."""
    scores, labels = _as_scores_and_labels(scores, labels)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    last_of_tie = np.r_[np.diff(sorted_scores) != 0, True]
    true_pos = np.cumsum(labels[order])[last_of_tie].astype(np.float64)
    false_pos = np.cumsum(~labels[order])[last_of_tie].astype(np.float64)
    num_pos = int(labels.sum())
    return true_pos, false_pos, num_pos, labels.size - num_pos


def exact_roc(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr)`` at every distinct score, from (0, 0) to (1, 1); its trapezoid
    is ``exact_auroc``. NaN arrays when a class is missing."""
    true_pos, false_pos, num_pos, num_neg = _exact_counts(scores, labels)
    if num_pos == 0 or num_neg == 0:
        return np.array([np.nan]), np.array([np.nan])
    return np.r_[0.0, false_pos / num_neg], np.r_[0.0, true_pos / num_pos]


def exact_precision_recall(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """PR points ``(recall, precision)`` at every distinct score, high to low; the step-wise
    area is ``exact_average_precision``. NaN arrays when there is no positive."""
    true_pos, false_pos, num_pos, _ = _exact_counts(scores, labels)
    if num_pos == 0:
        return np.array([np.nan]), np.array([np.nan])
    return true_pos / num_pos, true_pos / (true_pos + false_pos)
