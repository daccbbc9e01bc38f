"""Callbacks that write what a test run produces: metrics files and pictures."""

from __future__ import annotations

import functools
import heapq
import random
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from vsad_lightning.data.batch import MultiViewBatch
from vsad_lightning.geometry.registration import sample_to_original
from vsad_lightning.metrics.export import write_metrics
from vsad_lightning.utils.io import atomic_write_json
from vsad_lightning.visualization.figures import (
    MIN_PANEL_PX,
    colour_scale,
    curves_figure,
    histograms_figure,
    sample_figure,
    write_png,
)


def run_dir(trainer: L.Trainer) -> Path:
    """The run folder: the logger's version folder (``<root>/<dataset>/<category>/version_N``).

    ``trainer.log_dir`` is a collective (rank 0 broadcasts it): call this on every rank.
    """
    return Path(trainer.log_dir or trainer.default_root_dir)


HOMOGRAPHY_REPORT = "homographies.json"
"""The run folder's record of the homographies the run used (``homography_report()``)."""


class MetricsFileCallback(L.Callback):
    """Write ``metrics.json`` and ``metrics.csv`` into the run folder when testing ends, and
    ``homographies.json`` when a fit or test starts.

    The numbers are the module's ``test_results`` (already reduced over DDP ranks by the
    metric); rank 0 writes. ``metrics_path`` holds the written JSON path afterwards.
    ``homographies.json`` is the datamodule's ``homography_report()``: the cache used, its
    ``unreliable_pairs`` and the ``removed_pairs`` they take out of the neighbour graph, so that
    a number in ``metrics.json`` can be traced to the geometry behind it. It is written at the
    start, so a run that stops early still has it.
    """

    def __init__(self) -> None:
        self.metrics_path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage not in ("fit", "test"):
            return
        report_of = getattr(trainer.datamodule, "homography_report", None)
        report = report_of() if callable(report_of) else None
        folder = run_dir(trainer)
        if trainer.is_global_zero and report is not None:
            atomic_write_json(folder / HOMOGRAPHY_REPORT, report)

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        folder = run_dir(trainer)
        if not trainer.is_global_zero or pl_module.test_results is None:
            return
        category = getattr(trainer.datamodule, "category", "unknown")
        json_path, _ = write_metrics(folder, pl_module.test_results, category)
        self.metrics_path = json_path


class AnomalyMapPictures(L.Callback):
    """Pictures of a test run: chosen samples, threshold curves and score histograms.

    Samples (``sample_figure``: every view's image and anomaly map, titled with its name, score
    and OK/NG decision, the ground truth as a green contour, one colour bar), ``num_samples``
    of each kind:

    - ``false_alarm``: the highest-scoring normal samples;
    - ``miss``: the lowest-scoring anomalous samples;
    - ``detection``: typical detections, the anomalous samples decided NG (all anomalous
      samples without a calibration) whose scores lie nearest the median score of all such
      samples, chosen from a seeded reservoir of ``4 * num_samples`` of them (memory stays
      bounded whatever the test set).

    Per run (the category): ``curves`` (ROC and PR at pixel, view and sample level) and
    ``histograms`` (view and sample scores of normals against anomalies, thresholds drawn).

    All go to TensorBoard (``test/maps/<kind>/<rank>_<sample_id>``, ``test/curves``,
    ``test/histograms``) and to ``<run>/images/`` as PNG files, listed with their scores in
    ``images/index.json`` (read by ``vsad-report``'s page). The maps share the run's fixed
    colour scale (``visualization.figures.colour_scale``: from the calibration's thresholds).
    Views are drawn at the dataset's resolution (``data.resolution``, at least 192 px wide;
    the model's ``image_size`` pixels upsampled). Under DDP, rank 0 pictures its own shard.
    """

    KINDS = ("false_alarm", "miss", "detection")

    def __init__(self, num_samples: int = 4, seed: int = 0) -> None:
        """
        Args:
            num_samples: pictured samples of each kind (false alarms, misses, detections).
            seed: seed of the reservoir that typical detections are drawn from.
        """
        if num_samples < 0:
            raise ValueError(f"pictures.num_samples must be >= 0, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self._reset()

    def _reset(self) -> None:
        self._heaps: dict[str, list] = {"false_alarm": [], "miss": []}
        self._reservoir: list = []
        self._seen_detections = 0
        self._rng = random.Random(self.seed)
        self._view_scores: list[np.ndarray] = []
        self._view_labels: list[np.ndarray] = []
        self._sample_scores: list[float] = []
        self._sample_labels: list[int] = []
        self._detection_scores: list[float] = []
        self._view_names: list[str] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    @staticmethod
    def _entry(batch: MultiViewBatch, outputs, b: int) -> dict:
        def labels(t: Tensor | None, index) -> list[int] | int | None:
            return None if t is None else t[index].long().cpu().tolist()

        return {
            "sample_id": batch.sample_ids[b],
            "images": sample_to_original(batch.images[b], batch.registration[b]).float().cpu(),
            "masks": batch.masks[b].float().cpu(),
            "maps": outputs.normalised_maps[b].float().cpu(),
            "view_scores": outputs.view_scores[b].float().cpu().tolist(),
            "sample_score": float(outputs.sample_scores[b]),
            "view_decisions": labels(outputs.pred_view_labels, b),
            "sample_decision": labels(outputs.pred_sample_labels, b),
            "view_truth": batch.view_labels[b].cpu().tolist(),
            "sample_truth": int(batch.sample_labels[b]),
        }

    def _offer(self, kind: str, key: float, order: int, make) -> None:
        """Keep the ``num_samples`` largest ``key`` of ``kind`` (a min-heap)."""
        heap = self._heaps[kind]
        if len(heap) < self.num_samples:
            heapq.heappush(heap, (key, order, make()))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, order, make()))

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch: MultiViewBatch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.is_global_zero:
            return
        self._view_names = list(batch.view_names)
        self._view_scores.append(outputs.view_scores.float().cpu().numpy())
        self._view_labels.append(batch.view_labels.cpu().numpy())
        for b in range(batch.batch_size):
            score = float(outputs.sample_scores[b])
            truth = int(batch.sample_labels[b])
            order = len(self._sample_scores)
            self._sample_scores.append(score)
            self._sample_labels.append(truth)
            if self.num_samples == 0:
                continue
            make = functools.partial(self._entry, batch, outputs, b)
            if not truth:
                self._offer("false_alarm", score, order, make)
                continue
            self._offer("miss", -score, order, make)
            decided = outputs.pred_sample_labels
            if decided is not None and not int(decided[b]):
                continue
            self._detection_scores.append(score)
            self._seen_detections += 1
            size = 4 * self.num_samples
            if len(self._reservoir) < size:
                self._reservoir.append(make())
            else:
                slot = self._rng.randrange(self._seen_detections)
                if slot < size:
                    self._reservoir[slot] = make()

    def chosen(self) -> list[tuple[str, int, dict]]:
        """``(kind, rank, entry)`` of every pictured sample, rank 1 = most telling."""
        picked = []
        for kind in ("false_alarm", "miss"):
            ranked = sorted(self._heaps[kind], key=lambda item: (-item[0], item[1]))
            picked += [(kind, i + 1, entry) for i, (_, _, entry) in enumerate(ranked)]
        if self._reservoir:
            median = float(np.median(self._detection_scores))
            ranked = sorted(self._reservoir, key=lambda e: abs(e["sample_score"] - median))
            picked += [("detection", i + 1, e) for i, e in enumerate(ranked[: self.num_samples])]
        return picked

    def on_test_end(self, trainer, pl_module) -> None:
        out_dir = run_dir(trainer) / "images"  # a collective: every rank calls it
        if not trainer.is_global_zero or not self._sample_scores:
            return
        category = str(getattr(trainer.datamodule, "category", "unknown"))
        resolution = getattr(trainer.datamodule, "resolution", None)
        chosen = self.chosen()
        fallback = max((float(e["maps"].max()) for _, _, e in chosen), default=1.0)
        scale = colour_scale(pl_module, fallback_max=fallback)
        pictures: list[tuple[str, str, np.ndarray, dict]] = []
        for kind, rank, e in chosen:
            width = e["images"].shape[-1]
            panel = max(MIN_PANEL_PX, width, resolution if isinstance(resolution, int) else 0)
            picture = sample_figure(
                e["images"],
                e["maps"],
                scale,
                view_names=self._view_names,
                sample_id=e["sample_id"],
                view_scores=e["view_scores"],
                sample_score=e["sample_score"],
                masks=e["masks"],
                view_decisions=e["view_decisions"],
                sample_decision=e["sample_decision"],
                view_truth=e["view_truth"],
                sample_truth=e["sample_truth"],
                panel_px=panel,
                heading=f"{category}: {KIND_TITLES[kind]} #{rank}",
            )
            name = f"{kind}_{rank}_{e['sample_id']}"
            info = {
                "kind": kind,
                "rank": rank,
                "sample_id": e["sample_id"],
                "sample_score": e["sample_score"],
                "sample_decision": e["sample_decision"],
                "sample_truth": e["sample_truth"],
            }
            pictures.append((f"test/maps/{kind}/{rank}_{e['sample_id']}", name, picture, info))
        view = (
            np.concatenate(self._view_scores).ravel(),
            np.concatenate(self._view_labels).ravel(),
        )
        sample = (np.asarray(self._sample_scores), np.asarray(self._sample_labels))
        metrics = getattr(pl_module, "test_metrics", None)
        pixel = None
        if metrics is not None and hasattr(metrics, "anomalous_pixel_hist"):
            pixel = (
                metrics.anomalous_pixel_hist.cpu().numpy(),
                metrics.normal_pixel_hist.cpu().numpy(),
            )
        pictures.append(
            (
                "test/curves",
                "curves",
                curves_figure(category, pixel, view, sample),
                {"kind": "curves"},
            )
        )
        pictures.append(
            (
                "test/histograms",
                "histograms",
                histograms_figure(category, view, sample, scale),
                {"kind": "histograms"},
            )
        )
        index = []
        for tag, name, picture, info in pictures:
            write_png(out_dir / f"{name}.png", picture)
            index.append({**info, "file": f"{name}.png"})
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(
                        tag, picture, trainer.global_step, dataformats="HWC"
                    )
        atomic_write_json(
            out_dir / PICTURE_INDEX,
            {
                "category": category,
                "colour_scale": {"vmin": scale.vmin, "vmax": scale.vmax, "source": scale.source},
                "pictures": index,
            },
        )
        self._reset()


KIND_TITLES = {
    "false_alarm": "highest-scoring normal (false alarm)",
    "miss": "lowest-scoring anomaly (miss)",
    "detection": "typical detection",
}

PICTURE_INDEX = "index.json"
"""``<run>/images/index.json``: the pictures of a test run, their kind and scores."""
