"""Callbacks that write what a test run produces: metrics files and pictures."""

from __future__ import annotations

from pathlib import Path

import cv2
import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from vsad_lightning.data.batch import MultiViewBatch
from vsad_lightning.geometry.registration import sample_to_original
from vsad_lightning.metrics.export import write_metrics
from vsad_lightning.utils.io import atomic_write_json, write_image


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
    """Pictures of the first ``num_samples`` test samples, all views side by side.

    Row 1: the image with the ground-truth contour (green). Row 2: the anomaly map of the
    model's calibration mode (``AnomalyPrediction.normalised_maps``; the raw distances for
    ``none``) over the image (colour map JET) with the same contour. They go to TensorBoard
    (``test/maps/<id>``) and to ``<run>/images/<sample_id>.png``. The colour scale is shared
    by the pictured samples, from 0 to the largest score among them: display only, never used
    by any metric. Under DDP, rank 0 pictures the first samples of its own shard.
    """

    def __init__(self, num_samples: int = 4, alpha: float = 0.5) -> None:
        self.num_samples = num_samples
        self.alpha = alpha
        self._kept: list[tuple[str, Tensor, Tensor, Tensor]] = []

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._kept = []

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch: MultiViewBatch, batch_idx, dataloader_idx=0
    ) -> None:
        if not trainer.is_global_zero:
            return
        for b in range(batch.batch_size):
            if len(self._kept) >= self.num_samples:
                return
            self._kept.append(
                (
                    batch.sample_ids[b],
                    sample_to_original(batch.images[b], batch.registration[b]).float().cpu(),
                    batch.masks[b].float().cpu(),
                    outputs.normalised_maps[b].float().cpu(),
                )
            )

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        out_dir = run_dir(trainer) / "images"
        if not trainer.is_global_zero or not self._kept:
            return
        top = max(float(maps.max()) for _, _, _, maps in self._kept)
        out_dir.mkdir(parents=True, exist_ok=True)
        for sample_id, images, masks, maps in self._kept:
            picture = self.render(images, masks, maps, vmax=top)
            write_image(out_dir / f"{sample_id}.png", picture[..., ::-1])
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(
                        f"test/maps/{sample_id}", picture, trainer.global_step, dataformats="HWC"
                    )
        self._kept = []

    def render(self, images: Tensor, masks: Tensor, maps: Tensor, vmax: float) -> np.ndarray:
        """``(V,3,H,W)`` images in [-1,1], ``(V,1,H,W)`` masks and maps -> an RGB uint8 grid."""
        top_row, bottom_row = [], []
        for image, mask, amap in zip(images, masks, maps, strict=True):
            rgb = ((image.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            scaled = (amap[0] / max(vmax, 1e-12)).clamp(0, 1).mul(255).round().byte().numpy()
            heat = cv2.applyColorMap(scaled, cv2.COLORMAP_JET)[..., ::-1]
            overlay = cv2.addWeighted(rgb, 1 - self.alpha, heat, self.alpha, 0.0)
            contours, _ = cv2.findContours(
                (mask[0].numpy() > 0.5).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
            )
            plain = np.ascontiguousarray(rgb)
            overlay = np.ascontiguousarray(overlay)
            cv2.drawContours(plain, contours, -1, (0, 255, 0), 1)
            cv2.drawContours(overlay, contours, -1, (0, 255, 0), 1)
            top_row.append(plain)
            bottom_row.append(overlay)
        return np.concatenate([np.concatenate(top_row, 1), np.concatenate(bottom_row, 1)], 0)
