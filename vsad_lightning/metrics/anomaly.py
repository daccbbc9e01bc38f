"""``AnomalyMetrics``: pixel, view and sample AUROC / AP and pixel AUPRO (docs/evaluation.md).

Pixel level covers every pixel of every test view. Storing them for an exact ROC would grow
without bound at Real-IAD scale (docs/evaluation.md), so pixel scores are counted into fixed
histograms instead: memory is O(bins) whatever the number of test pixels, and the histograms of
several processes add up (DDP ``sum``). View and sample scores are few, so they are kept and
their AUROC and AP are exact.

Scores are raw kNN distances of unknown scale. They are never squashed by a sigmoid or read as
logits (anomalib#3407); the binning below has the same relative resolution at every scale,
so 1e-3-scale and 1e3-scale distances are resolved equally well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat, rank_zero_warn

from vsad_lightning.metrics.curves import (
    binned_aupro,
    binned_auroc,
    binned_average_precision,
    exact_auroc,
    exact_average_precision,
)

# Per-region overlaps are fractions 1/|region|; they are accumulated in fixed point (integers in
# units of 1/PRO_UNIT) so the state is an integer tensor: DDP sums are exact and independent of
# the order of reduction, and no float64 state is needed (some accelerators lack float64). The
# rounding costs at most |region| / (2 * PRO_UNIT) of one region's overlap (7e-6 for a region of
# a million pixels); the int64 total stays below 2**63 up to ~1.3e8 regions.
PRO_UNIT = 2**36

DECISION_LEVELS: tuple[str, ...] = ("view", "sample")
"""Levels with OK/NG decisions, whose F1 / FPR / FNR ``compute`` returns."""


@dataclass(frozen=True)
class ScoreBinning:
    """Fixed, scale-free bins for scores of unknown scale and sign.

    A score ``s`` maps to ``u = asinh(s / linear_width)`` and ``u`` is cut into ``num_bins``
    equal bins over ``[-asinh(max_abs_score / linear_width), +asinh(...)]``; scores beyond
    ``±max_abs_score`` land in the end bins. For ``|s| >> linear_width``,
    ``u ≈ sign(s) log(2|s| / linear_width)``, so bins are uniform in log|s|: each bin spans the
    same *relative* width ``exp(bin_width) - 1`` (0.054 % with the defaults) from 1e-5 up to
    1e9. Near zero the map is linear, so zero and negative scores are binned too. The binning is
    fixed before any data is seen, so nothing is fitted on the test set.
    """

    num_bins: int = 2**17
    linear_width: float = 1e-6
    max_abs_score: float = 1e9

    def __post_init__(self) -> None:
        if self.num_bins < 2:
            raise ValueError(f"num_bins must be at least 2, got {self.num_bins}")
        if not 0 < self.linear_width < self.max_abs_score:
            raise ValueError(
                "need 0 < linear_width < max_abs_score, got "
                f"linear_width={self.linear_width}, max_abs_score={self.max_abs_score}"
            )

    @property
    def half_range(self) -> float:
        """Half the covered range in ``u = asinh(s / linear_width)`` units."""
        return math.asinh(self.max_abs_score / self.linear_width)

    @property
    def bin_width(self) -> float:
        """Width of one bin in ``u`` units."""
        return 2.0 * self.half_range / self.num_bins

    @property
    def relative_resolution(self) -> float:
        """Relative width of a bin, ``(upper - lower) / lower``, for ``|s| >> linear_width``."""
        return math.expm1(self.bin_width)

    def bin_index(self, scores: Tensor) -> Tensor:
        """Bin of every score (int64, same shape); monotone: a higher score never gets a lower bin.

        Computed in float32: at ``|u| <= 36`` its rounding (~4e-6) is far below a bin (5e-4).
        """
        return self.bin_position(scores).long()

    def bin_position(self, scores: Tensor) -> Tensor:
        """Bin of every score as a float32 tensor of whole numbers (exact below 2**24).

        Separate from ``bin_index`` so callers can add offsets before the one int64 conversion.
        In-place steps keep it to one temporary of the input's size.
        """
        position = torch.asinh(scores.float() * (1.0 / self.linear_width))
        position.add_(self.half_range).mul_(1.0 / self.bin_width)
        return position.floor_().clamp_(0, self.num_bins - 1)

    def lower_edges(self) -> Tensor:
        """Lower edge of every bin in score units (float64); the first bin also holds all below."""
        u = -self.half_range + self.bin_width * torch.arange(self.num_bins, dtype=torch.float64)
        return self.linear_width * torch.sinh(u)


def label_regions(region_masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected ground-truth regions of several views, with ids unique across the views.

    Args:
        region_masks: ``(K, H, W)`` bool, the defect masks of ``K`` views.

    Returns:
        ``(labels, num_regions)``: ``labels`` is ``(K, H, W)`` int32, 0 on normal pixels and
        ``1..num_regions`` on defect pixels (8-connectivity, as in MVTec AD's AUPRO).

    The views are stacked vertically with one empty row between neighbours: an 8-connected
    region cannot cross an empty row, so a single ``cv2.connectedComponents`` call labels all
    views at once instead of a Python loop over views.
    """
    num_views, height, width = region_masks.shape
    stacked = np.zeros((num_views, height + 1, width), dtype=np.uint8)
    stacked[:, :height] = region_masks
    num_labels, labels = cv2.connectedComponents(
        stacked.reshape(num_views * (height + 1), width), connectivity=8, ltype=cv2.CV_32S
    )
    labels = labels.reshape(num_views, height + 1, width)[:, :height]
    return np.ascontiguousarray(labels), int(num_labels) - 1


def _concatenated(state: list[Tensor] | Tensor) -> np.ndarray:
    """A kept-scores state (a list, or one tensor after a DDP sync) as a flat numpy array."""
    if isinstance(state, list) and not state:  # compute() before any update
        return np.zeros(0)
    return dim_zero_cat(state).cpu().numpy().ravel()


def _first_index(flags: Tensor) -> tuple[int, ...]:
    """Index tuple of the first True entry of a (B, V) or (B,) bool tensor."""
    return tuple(int(i) for i in torch.nonzero(flags)[0])


class AnomalyMetrics(Metric):
    """Pixel / view / sample AUROC and AP, and pixel AUPRO, for multi-view anomaly detection.

    ``update`` takes one test batch; ``compute`` returns ``pixel_auroc, pixel_ap, pixel_aupro,
    view_auroc, view_ap, sample_auroc, sample_ap``, the decision metrics below, ``n_samples,
    n_views, n_pixels`` (and ``n_regions``) as floats. A metric with no positives or no
    negatives is NaN, with a warning.

    Pixel level (binned, memory O(num_bins)):
        * AUROC: trapezoid over the ROC with one threshold per bin (tied pairs count half).
        * AP: scikit-learn's step-wise ``sum (R_k - R_{k-1}) P_k`` over the bin thresholds.
        * AUPRO: for each connected defect region (8-connectivity, per view) the fraction of
          its pixels at or above each threshold, averaged over all regions, against the FPR over
          all normal pixels (normal views included); area up to ``aupro_max_fpr`` (interpolated
          there) divided by ``aupro_max_fpr``.
    The binned values differ from the exact ones only through scores sharing a bin (relative
    width ``binning.relative_resolution``); tests/test_metrics.py measures the difference.

    View and sample level (exact): scores and labels are kept (a few numbers per sample); AUROC
    by average ranks, AP by scikit-learn's definition. All scores are handled as float32.

    Decisions (OK/NG at the thresholds calibrated on normals, ``pred_view_labels`` and
    ``pred_sample_labels`` of ``update``): confusion counts per level give ``view_f1``,
    ``view_fpr``, ``view_fnr``, ``sample_f1``, ``sample_fpr``, ``sample_fnr`` with
    ``F1 = 2 TP / (2 TP + FP + FN)``, ``FPR = FP / (FP + TN)``, ``FNR = FN / (FN + TP)``
    (NaN where the denominator is 0, and with a warning when only some batches came with
    decisions; left out when no batch did).

    All states reduce across DDP processes: histograms, confusion and other counts by ``sum``,
    kept scores by ``cat``. Histograms and counts are integers, so the sum is exact. States are
    not ``persistent`` (they stay out of checkpoints).

    Args:
        num_bins: number of pixel-score bins (docs/evaluation.md#binned-metrics). 2**17 bins cost
            3 MiB of int64 state.
        linear_width: scores with ``|s|`` below this are binned linearly, above it
            logarithmically (see ``ScoreBinning``).
        max_abs_score: scores beyond ``±max_abs_score`` share the end bins.
        aupro_max_fpr: FPR limit of the AUPRO (0.3, docs/evaluation.md#aupro).
        **kwargs: passed to ``torchmetrics.Metric`` (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        num_bins: int = 2**17,
        linear_width: float = 1e-6,
        max_abs_score: float = 1e9,
        aupro_max_fpr: float = 0.3,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 < aupro_max_fpr <= 1:
            raise ValueError(f"aupro_max_fpr must be in (0, 1], got {aupro_max_fpr}")
        self.binning = ScoreBinning(num_bins, linear_width, max_abs_score)
        self.aupro_max_fpr = aupro_max_fpr
        zeros = torch.zeros(num_bins, dtype=torch.long)
        self.add_state("normal_pixel_hist", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("anomalous_pixel_hist", zeros.clone(), dist_reduce_fx="sum")
        # sum over regions r of (pixels of r in bin b) / |r|, in units of 1 / PRO_UNIT.
        self.add_state("region_overlap_hist", zeros.clone(), dist_reduce_fx="sum")
        self.add_state("num_regions", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("view_score_list", [], dist_reduce_fx="cat")
        self.add_state("view_label_list", [], dist_reduce_fx="cat")
        self.add_state("sample_score_list", [], dist_reduce_fx="cat")
        self.add_state("sample_label_list", [], dist_reduce_fx="cat")
        # Confusion counts (TP, FP, FN, TN) of the OK/NG decisions, and how many views and
        # samples came without a decision (then the decision metrics are undefined).
        for level in DECISION_LEVELS:
            self.add_state(
                f"{level}_confusion", torch.zeros(4, dtype=torch.long), dist_reduce_fx="sum"
            )
            self.add_state(
                f"{level}_undecided", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum"
            )

    # ------------------------------------------------------------------------------- update
    def update(
        self,
        anomaly_maps: Tensor,
        masks: Tensor,
        view_scores: Tensor,
        sample_scores: Tensor,
        view_labels: Tensor,
        sample_labels: Tensor,
        pred_view_labels: Tensor | None = None,
        pred_sample_labels: Tensor | None = None,
    ) -> None:
        """Add one batch.

        Args:
            anomaly_maps: ``(B, V, 1, H, W)`` float pixel scores (raw distances).
            masks: ``(B, V, 1, H, W)`` ground truth, exactly 0 or 1 (float, int or bool).
            view_scores: ``(B, V)`` float.
            sample_scores: ``(B,)`` float.
            view_labels: ``(B, V)`` int, 1 for an anomalous view.
            sample_labels: ``(B,)`` int; must equal the max of the sample's view labels.
            pred_view_labels, pred_sample_labels: ``(B, V)`` and ``(B,)`` OK/NG decisions (0 or
                1) at the calibrated thresholds, or ``None`` when the model has none.

        Raises:
            ValueError: wrong shapes, labels or masks not in {0, 1}, non-finite scores, a sample
                label that disagrees with its view labels, or a view with defect pixels labelled
                normal. The message names the sample (and view) in the batch.
        """
        anomaly_maps, masks = anomaly_maps.detach(), masks.detach()
        view_scores, sample_scores = view_scores.detach(), sample_scores.detach()
        is_defect = self._validate(
            anomaly_maps, masks, view_scores, sample_scores, view_labels, sample_labels
        )

        # Pixel histograms: one bincount for both classes; defect pixels are offset by
        # num_bins (added in float32, exact since 2 * num_bins < 2**24, before one int64 cast).
        num_bins = self.binning.num_bins
        position = self.binning.bin_position(anomaly_maps)  # (B, V, 1, H, W)
        class_and_bin = position.add_(is_defect, alpha=num_bins).long()
        counts = torch.bincount(class_and_bin.flatten(), minlength=2 * num_bins)
        self.normal_pixel_hist += counts[:num_bins].to(self.normal_pixel_hist.device)
        self.anomalous_pixel_hist += counts[num_bins:].to(self.anomalous_pixel_hist.device)

        # AUPRO regions: only views with defect pixels need connected components.
        view_has_defect = is_defect.flatten(2).any(dim=2)  # (B, V)
        if bool(view_has_defect.any()):
            region_bins = class_and_bin[view_has_defect][:, 0] - num_bins  # defect pixels only
            self._add_regions(region_bins, is_defect[view_has_defect][:, 0])

        self.view_score_list.append(view_scores.float().flatten())
        self.view_label_list.append(view_labels.long().flatten())
        self.sample_score_list.append(sample_scores.float().flatten())
        self.sample_label_list.append(sample_labels.long().flatten())
        for level, predicted, truth in (
            ("view", pred_view_labels, view_labels),
            ("sample", pred_sample_labels, sample_labels),
        ):
            self._add_decisions(level, predicted, truth)

    def _add_decisions(self, level: str, predicted: Tensor | None, truth: Tensor) -> None:
        confusion = getattr(self, f"{level}_confusion")
        if predicted is None:
            undecided = getattr(self, f"{level}_undecided")
            undecided += truth.numel()
            return
        if tuple(predicted.shape) != tuple(truth.shape):
            raise ValueError(
                f"pred_{level}_labels must have shape {tuple(truth.shape)}, "
                f"got {tuple(predicted.shape)}"
            )
        predicted = predicted.detach().long().flatten().to(confusion.device)
        if bool(((predicted != 0) & (predicted != 1)).any()):
            raise ValueError(f"pred_{level}_labels must be 0 (OK) or 1 (NG)")
        truth = truth.detach().long().flatten().to(confusion.device)
        # index 0: TP (1, 1), 1: FP (1, 0), 2: FN (0, 1), 3: TN (0, 0)
        index = 2 * (1 - predicted) + (1 - truth)
        confusion += torch.bincount(index, minlength=4)

    def _add_regions(self, bins: Tensor, is_defect: Tensor) -> None:
        """Histogram each region's pixel scores weighted by 1/|region| (fixed point).

        ``bins`` and ``is_defect`` are ``(K, H, W)`` for the ``K`` views that hold defects.
        Summing per-pixel weights 1/|r| per bin over all regions at once is the same as adding
        up one histogram per region normalised by its size, without a loop over regions.
        """
        labels_np, num_regions = label_regions(is_defect.cpu().numpy())
        labels = torch.from_numpy(labels_np).to(device=bins.device, dtype=torch.long)
        region_size = torch.bincount(labels.flatten(), minlength=num_regions + 1).clamp_(min=1)
        region_weight = (PRO_UNIT + region_size // 2) // region_size  # round(PRO_UNIT / |r|)
        in_region = labels > 0
        pixel_weight = region_weight[labels[in_region]]
        # scatter_add_ rather than a weighted bincount: the latter raises on CUDA under
        # torch.use_deterministic_algorithms (Trainer(deterministic=True)).
        overlap = torch.zeros(self.binning.num_bins, dtype=torch.long, device=bins.device)
        overlap.scatter_add_(0, bins[in_region], pixel_weight)
        self.region_overlap_hist += overlap.to(self.region_overlap_hist.device)
        self.num_regions += num_regions

    def _validate(
        self,
        anomaly_maps: Tensor,
        masks: Tensor,
        view_scores: Tensor,
        sample_scores: Tensor,
        view_labels: Tensor,
        sample_labels: Tensor,
    ) -> Tensor:
        """Check one batch; return the defect pixels as a bool ``(B, V, 1, H, W)`` tensor."""
        if anomaly_maps.ndim != 5 or anomaly_maps.shape[2] != 1:
            raise ValueError(
                f"anomaly_maps must be (B, V, 1, H, W), got {tuple(anomaly_maps.shape)}"
            )
        batch, views = anomaly_maps.shape[:2]
        expected = {
            "masks": (masks, tuple(anomaly_maps.shape)),
            "view_scores": (view_scores, (batch, views)),
            "view_labels": (view_labels, (batch, views)),
            "sample_scores": (sample_scores, (batch,)),
            "sample_labels": (sample_labels, (batch,)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if batch == 0 or views == 0:
            raise ValueError(f"empty batch: anomaly_maps has shape {tuple(anomaly_maps.shape)}")
        if not anomaly_maps.is_floating_point():
            raise ValueError(f"anomaly_maps must be a float tensor, got {anomaly_maps.dtype}")

        seen = sum(int(t.numel()) for t in self.sample_score_list)
        where = "sample {b} of the batch (sample {g} seen by this metric)"

        def fail(flags: Tensor, what: str) -> None:
            index = _first_index(flags)
            text = where.format(b=index[0], g=seen + index[0])
            if len(index) > 1:
                text += f", view {index[1]}"
            raise ValueError(f"{text}: {what}")

        # Cheap pre-check: a sum is finite when every score is (unless huge scores overflow it,
        # hence the exact per-view check before failing).
        if not math.isfinite(float(anomaly_maps.float().sum())):
            bad_map = ~torch.isfinite(anomaly_maps).flatten(2).all(dim=2)
            if bool(bad_map.any()):
                fail(bad_map, "the anomaly map holds NaN or infinite scores")
        if not bool(torch.isfinite(view_scores).all()):
            fail(~torch.isfinite(view_scores), "the view score is NaN or infinite")
        if not bool(torch.isfinite(sample_scores).all()):
            fail(~torch.isfinite(sample_scores), "the sample score is NaN or infinite")

        # masks == (masks != 0) holds exactly for 0 and 1 (and for bool masks).
        is_defect = masks != 0
        if not bool((masks == is_defect).all()):
            bad_mask = (masks != is_defect).flatten(2).any(dim=2)
            fail(bad_mask, "the mask holds values other than 0 and 1")
        bad_view = (view_labels != 0) & (view_labels != 1)
        if bool(bad_view.any()):
            fail(bad_view, f"view label {int(view_labels[bad_view][0])} is not 0 or 1")
        bad_sample = (sample_labels != 0) & (sample_labels != 1)
        if bool(bad_sample.any()):
            fail(bad_sample, f"sample label {int(sample_labels[bad_sample][0])} is not 0 or 1")

        inconsistent = sample_labels != view_labels.amax(dim=1)
        if bool(inconsistent.any()):
            b = _first_index(inconsistent)[0]
            fail(
                inconsistent,
                f"sample label {int(sample_labels[b])} but view labels "
                f"{view_labels[b].tolist()} (a sample is anomalous when any view is)",
            )

        unlabelled_defect = is_defect.flatten(2).any(dim=2) & (view_labels == 0)
        if bool(unlabelled_defect.any()):
            fail(unlabelled_defect, "the mask has defect pixels but the view label is 0")
        return is_defect

    # ------------------------------------------------------------------------------ compute
    def compute(self) -> dict[str, float]:
        """All metrics as Python floats (NaN where undefined, with a warning)."""
        normal = self.normal_pixel_hist.cpu().numpy()
        anomalous = self.anomalous_pixel_hist.cpu().numpy()
        overlap = self.region_overlap_hist.cpu().numpy().astype(np.float64) / PRO_UNIT
        num_regions = int(self.num_regions)
        num_normal, num_anomalous = int(normal.sum()), int(anomalous.sum())

        view_scores, view_labels, sample_scores, sample_labels = (
            _concatenated(state)
            for state in (
                self.view_score_list,
                self.view_label_list,
                self.sample_score_list,
                self.sample_label_list,
            )
        )

        results: dict[str, float] = {}
        pixel_names = "pixel_auroc, pixel_ap"
        if self._defined(pixel_names, num_anomalous, "defect pixels", num_normal, "pixels"):
            results["pixel_auroc"] = binned_auroc(anomalous, normal)
            results["pixel_ap"] = binned_average_precision(anomalous, normal)
        else:
            results["pixel_auroc"] = results["pixel_ap"] = float("nan")
        if self._defined("pixel_aupro", num_regions, "defect regions", num_normal, "pixels"):
            results["pixel_aupro"] = binned_aupro(
                overlap, num_regions, normal, max_fpr=self.aupro_max_fpr
            )
        else:
            results["pixel_aupro"] = float("nan")
        for level, scores, labels in (
            ("view", view_scores, view_labels),
            ("sample", sample_scores, sample_labels),
        ):
            num_pos = int(labels.sum())
            names = f"{level}_auroc, {level}_ap"
            num_normal_level = labels.size - num_pos
            if self._defined(names, num_pos, f"anomalous {level}s", num_normal_level, f"{level}s"):
                results[f"{level}_auroc"] = exact_auroc(scores, labels)
                results[f"{level}_ap"] = exact_average_precision(scores, labels)
            else:
                results[f"{level}_auroc"] = results[f"{level}_ap"] = float("nan")

        for level in DECISION_LEVELS:
            results.update(self._decision_metrics(level))

        results["n_samples"] = float(sample_labels.size)
        results["n_views"] = float(view_labels.size)
        results["n_pixels"] = float(num_normal + num_anomalous)
        results["n_regions"] = float(num_regions)
        return results

    def _decision_metrics(self, level: str) -> dict[str, float]:
        """F1, FPR and FNR of ``level``'s OK/NG decisions (NaN where undefined)."""
        tp, fp, fn, tn = (int(c) for c in getattr(self, f"{level}_confusion").tolist())
        undecided = int(getattr(self, f"{level}_undecided"))
        names = [f"{level}_{name}" for name in ("f1", "fpr", "fnr")]
        if tp + fp + fn + tn == 0:
            return {}  # no decisions at all (a model without calibration): nothing to report
        if undecided:
            rank_zero_warn(
                f"{', '.join(names)} set to NaN: {undecided} {level}s have no OK/NG decision",
                UserWarning,
            )
            return dict.fromkeys(names, float("nan"))

        def ratio(num: int, den: int) -> float:
            return num / den if den else float("nan")

        return {
            names[0]: ratio(2 * tp, 2 * tp + fp + fn),
            names[1]: ratio(fp, fp + tn),
            names[2]: ratio(fn, fn + tp),
        }

    @staticmethod
    def _defined(
        names: str, num_positive: int, positives: str, num_normal: int, normals: str
    ) -> bool:
        """False (with a warning) when a metric lacks positives or normal examples."""
        if num_positive > 0 and num_normal > 0:
            return True
        rank_zero_warn(
            f"{names} set to NaN: the test data has {num_positive} {positives} and "
            f"{num_normal} normal {normals} (both are needed)",
            UserWarning,
        )
        return False
