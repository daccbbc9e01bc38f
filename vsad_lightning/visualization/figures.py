"""Figures an inspector reads: one multi-view sample, threshold curves, score histograms.

Every figure is drawn with matplotlib's Agg backend (no display needed) and returned as an RGB
``uint8`` array ``(H, W, 3)``, which goes to TensorBoard (``add_image``) and to PNG files alike.

**One colour scale per run** (``ColourScale``, ``colour_scale``). The maps are those of the
model's calibration mode (``AnomalyPrediction.normalised_maps``). With a fitted calibration the
scale is fixed by the calibration's view thresholds, which come from the training normals only:
from 0 to twice the largest view threshold, so the OK/NG threshold sits mid-scale (drawn on the
colour bar) and a normal view looks the same in every picture of the run, in ``vsad-test`` and
in ``vsad-predict`` of the same checkpoint. In the calibrated modes 0 is the normals' median view
score; in mode ``none`` it is distance 0. Without a calibration (an old checkpoint) the scale is
0 to the largest score among the pictured samples, and the picture says so. Display only:
nothing here feeds a metric.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import matplotlib

matplotlib.use("Agg")  # before pyplot: files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

from vsad_lightning.metrics.curves import (  # noqa: E402
    binned_precision_recall,
    binned_roc,
    exact_precision_recall,
    exact_roc,
    trapezoid_up_to,
)
from vsad_lightning.utils.io import write_image  # noqa: E402

COLOUR_MAP = "jet"
GROUND_TRUTH_COLOUR = (0.0, 1.0, 0.0)
MIN_PANEL_PX = 192
"""A view is drawn at least this many pixels wide (the dataset's resolution when larger)."""


@dataclass(frozen=True)
class ColourScale:
    """The run's fixed colour scale of anomaly maps.

    Attributes:
        vmin, vmax: the scale's ends, in the units of the calibration mode's maps.
        view_thresholds: ``(V,)`` OK/NG view thresholds, or ``None`` without calibration.
        sample_threshold: the OK/NG sample threshold, or ``None``.
        source: one line naming where the scale comes from (printed under the colour bar).
    """

    vmin: float
    vmax: float
    view_thresholds: tuple[float, ...] | None = None
    sample_threshold: float | None = None
    source: str = ""


def colour_scale(module, fallback_max: float | None = None) -> ColourScale | None:
    """The fixed scale of ``module`` (a ``VSADModel`` or ``VSADModule``) from the thresholds of
    its calibration, in the calibration mode it scores with.

    ``None`` when the module holds no fitted calibration and no ``fallback_max`` is given;
    with ``fallback_max`` the scale is ``[0, fallback_max]`` (module docstring).
    """
    model = getattr(module, "model", module)  # a VSADModule scores through its VSADModel
    calibration = getattr(model, "calibration", None)
    mode = getattr(getattr(model, "config", None), "calibration", None)
    if calibration is not None and calibration.is_fitted() and mode is not None:
        from vsad_lightning.models.calibration import CALIBRATION_MODES

        m = CALIBRATION_MODES.index(mode)
        view_thr = calibration.view_threshold[m].detach().float().cpu()
        sample_thr = float(calibration.sample_threshold[m])
        top = 2.0 * float(view_thr.max())
        if top > 0:
            return ColourScale(
                0.0,
                top,
                tuple(float(t) for t in view_thr),
                sample_thr,
                f"scale 0..2x view threshold (calibration '{mode}', training normals)",
            )
    if fallback_max is None:
        return None
    return ColourScale(0.0, max(float(fallback_max), 1e-12), source="scale 0..max (uncalibrated)")


def to_rgb(image: Tensor) -> np.ndarray:
    """``(3, H, W)`` in [-1, 1] -> ``(H, W, 3)`` float in [0, 1]."""
    return ((image.float().permute(1, 2, 0).clamp(-1, 1) + 1) / 2).cpu().numpy()


def _figure_to_rgb(fig: Figure) -> np.ndarray:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)
    plt.close(fig)
    buffer.seek(0)
    data = np.frombuffer(buffer.getvalue(), dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1].copy()


def _contours(mask: np.ndarray) -> list[np.ndarray]:
    found, _ = cv2.findContours(
        (mask > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    return [c[:, 0, :] for c in found]


def _draw_contours(ax, mask: np.ndarray, scale: float, colour, style: str = "-") -> None:
    for c in _contours(mask):
        closed = np.vstack([c, c[:1]]).astype(np.float64)
        # Pixel centres: pixel (x, y) of the mask is drawn at (x + 0.5, y + 0.5) * scale - 0.5.
        xy = (closed + 0.5) * scale - 0.5
        ax.plot(xy[:, 0], xy[:, 1], style, color=colour, linewidth=1.2)


def _decision(value: int | None) -> str:
    return "" if value is None else ("NG" if int(value) else "OK")


def sample_figure(
    images: Tensor,
    maps: Tensor,
    scale: ColourScale,
    *,
    view_names: Sequence[str],
    sample_id: str,
    view_scores: Sequence[float],
    sample_score: float,
    masks: Tensor | None = None,
    view_decisions: Sequence[int] | None = None,
    sample_decision: int | None = None,
    view_truth: Sequence[int] | None = None,
    sample_truth: int | None = None,
    panel_px: int = MIN_PANEL_PX,
    heading: str = "",
) -> np.ndarray:
    """One sample, all views: the image (row 1) and its anomaly map (row 2) on ``scale``.

    ``images`` ``(V, 3, H, W)`` in [-1, 1], ``maps`` ``(V, 1, H, W)``, ``masks`` ``(V, 1, H, W)``
    (ground truth, drawn as a green contour in both rows; ``None`` for unlabelled data). Each
    view is drawn ``panel_px`` pixels wide, titled with its name, its score and its OK/NG
    decision (and the truth when known); the figure title gives the sample score and decision.
    Returns an RGB ``uint8`` array.
    """
    num_views = images.shape[0]
    height, width = images.shape[-2:]
    panel_h = panel_px * height / width
    dpi = 100
    col_w, fig_w = panel_px / dpi, (num_views * (panel_px + 16) + 140) / dpi
    fig_h = (2 * panel_h + 190) / dpi
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    grid = fig.add_gridspec(
        2,
        num_views + 1,
        width_ratios=[col_w] * num_views + [0.12],
        left=10 / (fig_w * dpi),
        right=1 - 70 / (fig_w * dpi),
        top=1 - 105 / (fig_h * dpi),
        bottom=20 / (fig_h * dpi),
        wspace=0.06,
        hspace=0.08,
    )
    zoom = panel_px / width
    mesh = None
    for v in range(num_views):
        rgb = to_rgb(images[v])
        rgb = cv2.resize(rgb, (panel_px, round(panel_h)), interpolation=cv2.INTER_LINEAR)
        amap = maps[v, 0].float().cpu().numpy()
        amap = cv2.resize(amap, (panel_px, round(panel_h)), interpolation=cv2.INTER_LINEAR)
        mask = None if masks is None else masks[v, 0].float().cpu().numpy()
        top_ax = fig.add_subplot(grid[0, v])
        bottom_ax = fig.add_subplot(grid[1, v])
        top_ax.imshow(rgb, interpolation="nearest")
        bottom_ax.imshow(rgb.mean(axis=2), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        mesh = bottom_ax.imshow(
            amap,
            cmap=COLOUR_MAP,
            vmin=scale.vmin,
            vmax=scale.vmax,
            alpha=0.6,
            interpolation="nearest",
        )
        if mask is not None and mask.any():
            _draw_contours(top_ax, mask, zoom, GROUND_TRUTH_COLOUR)
            _draw_contours(bottom_ax, mask, zoom, GROUND_TRUTH_COLOUR)
        label = f"{view_names[v]}  {float(view_scores[v]):.2f}"
        if view_decisions is not None:
            label += f" {_decision(view_decisions[v])}"
        if view_truth is not None:
            label += f"\n(truth {_decision(view_truth[v])})"
        wrong = (
            view_decisions is not None
            and view_truth is not None
            and int(view_decisions[v]) != int(view_truth[v])
        )
        top_ax.set_title(label, fontsize=9, color="red" if wrong else "black")
        for ax in (top_ax, bottom_ax):
            ax.set_xticks([])
            ax.set_yticks([])
    bar_ax = fig.add_subplot(grid[1, num_views])
    bar = fig.colorbar(mesh, cax=bar_ax)
    bar.ax.tick_params(labelsize=7)
    if scale.view_thresholds:
        for t in sorted(set(scale.view_thresholds)):
            bar.ax.axhline(t, color="white", linewidth=1.0)
        bar.ax.set_ylabel("score (white: view thresholds)", fontsize=7)
    title = f"{sample_id}   sample score {sample_score:.2f}"
    if scale.sample_threshold is not None:
        title += f" (threshold {scale.sample_threshold:.2f})"
    if sample_decision is not None:
        title += f"   {_decision(sample_decision)}"
    if sample_truth is not None:
        title += f"   truth {_decision(sample_truth)}"
    if heading:
        title = f"{heading}\n{title}"
    fig.suptitle(title, fontsize=10)
    fig.text(0.005, 0.005, f"green: ground truth; {scale.source}", fontsize=7)
    return _figure_to_rgb(fig)


def _area(x: np.ndarray, y: np.ndarray) -> float:
    return float("nan") if np.isnan(x).any() else trapezoid_up_to(x, y, float(x[-1]))


def _step_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    if np.isnan(recall).any():
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def curves_figure(
    category: str,
    pixel_hists: tuple[np.ndarray, np.ndarray] | None,
    view: tuple[np.ndarray, np.ndarray],
    sample: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """ROC (top) and PR (bottom) curves at pixel, view and sample level of one category.

    ``pixel_hists`` is ``(anomalous, normal)`` pixel-score histograms (the binned metrics'
    state); ``view`` and ``sample`` are ``(scores, labels)``. The legend gives each area
    (the trapezoid of the ROC, the step-wise AP), the same numbers as ``metrics.json`` up to
    the binning of pixel scores.
    """
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.6), dpi=100)
    levels: list[tuple[str, tuple, tuple]] = []
    if pixel_hists is not None:
        positive, negative = pixel_hists
        if positive.sum() > 0 and negative.sum() > 0:
            levels.append(
                (
                    "pixel",
                    binned_roc(positive, negative),
                    binned_precision_recall(positive, negative),
                )
            )
        else:
            levels.append(("pixel", (np.array([np.nan]),) * 2, (np.array([np.nan]),) * 2))
    for name, (scores, labels) in (("view", view), ("sample", sample)):
        levels.append((name, exact_roc(scores, labels), exact_precision_recall(scores, labels)))
    for column, (name, (fpr, tpr), (recall, precision)) in enumerate(levels):
        roc_ax, pr_ax = axes[0, column], axes[1, column]
        roc_ax.plot(fpr, tpr, color="C0", label=f"AUROC {_area(fpr, tpr):.3f}")
        roc_ax.plot([0, 1], [0, 1], ":", color="grey")
        roc_ax.set(title=f"{name} ROC", xlabel="false positive rate", ylabel="true positive rate")
        pr_ax.step(recall, precision, where="post", color="C1")
        pr_ax.plot([], [], color="C1", label=f"AP {_step_ap(recall, precision):.3f}")
        pr_ax.set(title=f"{name} precision-recall", xlabel="recall", ylabel="precision")
        for ax in (roc_ax, pr_ax):
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right" if ax is roc_ax else "lower left")
    for column in range(len(levels), 3):
        axes[0, column].axis("off")
        axes[1, column].axis("off")
    fig.suptitle(f"{category}: threshold curves")
    fig.tight_layout()
    return _figure_to_rgb(fig)


def histograms_figure(
    category: str,
    view: tuple[np.ndarray, np.ndarray],
    sample: tuple[np.ndarray, np.ndarray],
    scale: ColourScale | None,
) -> np.ndarray:
    """Histograms of view and sample scores, normals against anomalies, with the OK/NG
    thresholds drawn (the view thresholds, one per view, as thin lines)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), dpi=100)
    thresholds = (
        (scale.view_thresholds if scale else None),
        ((scale.sample_threshold,) if scale and scale.sample_threshold is not None else None),
    )
    for ax, name, (scores, labels), lines in zip(
        axes, ("view", "sample"), (view, sample), thresholds, strict=True
    ):
        scores = np.asarray(scores, dtype=np.float64)
        labels = np.asarray(labels).astype(bool)
        finite = scores[np.isfinite(scores)]
        edges = np.histogram_bin_edges(finite if finite.size else [0.0, 1.0], bins=30)
        ax.hist(
            scores[~labels], bins=edges, alpha=0.6, color="C0", label=f"normal ({(~labels).sum()})"
        )
        ax.hist(
            scores[labels], bins=edges, alpha=0.6, color="C3", label=f"anomalous ({labels.sum()})"
        )
        for i, t in enumerate(sorted(set(lines or ()))):
            ax.axvline(
                t, color="black", linestyle="--", linewidth=1, label="threshold" if i == 0 else None
            )
        ax.set(title=f"{name} scores", xlabel="score", ylabel="count")
        ax.legend()
    fig.suptitle(f"{category}: scores of normals and anomalies")
    fig.tight_layout()
    return _figure_to_rgb(fig)


def write_png(path, picture: np.ndarray) -> None:
    """An RGB ``uint8`` picture as a PNG file (parents created), written atomically; a failed
    write is one ``DataError`` naming the file (``utils.io.write_image``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, picture[..., ::-1])


def as_numpy(values: Tensor | Sequence[float]) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


__all__ = [
    "ColourScale",
    "as_numpy",
    "colour_scale",
    "curves_figure",
    "histograms_figure",
    "sample_figure",
    "to_rgb",
    "write_png",
]
