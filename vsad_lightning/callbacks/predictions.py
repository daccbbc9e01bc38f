"""``PredictionWriter`` (``vsad-predict``) and ``TestScoresWriter`` (``vsad-fit``/``vsad-test``):
PNG anomaly maps and CSVs of view and sample scores with their OK/NG decisions."""

from __future__ import annotations

import csv
import io
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from vsad_lightning.callbacks.outputs import run_dir
from vsad_lightning.data.batch import MultiViewBatch
from vsad_lightning.geometry.registration import sample_to_original
from vsad_lightning.utils.io import atomic_write_text
from vsad_lightning.visualization.figures import (
    MIN_PANEL_PX,
    colour_scale,
    sample_figure,
    write_png,
)

SCORE_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "view",
    "image_path",
    "view_score",
    "sample_score",
    "view_decision",
    "sample_decision",
)
"""Columns of ``scores.csv``. The decisions are ``OK`` or ``NG`` at the thresholds calibrated on
the training normals (``vsad_lightning.models.calibration``), empty when the checkpoint holds no
calibration."""

TRUTH_COLUMNS: tuple[str, ...] = ("view_truth", "sample_truth")
"""The ground truth (``OK``/``NG``), added to the test run's ``scores.csv``."""


def _decision(labels: Tensor | None, index: tuple[int, ...]) -> str:
    if labels is None:
        return ""
    return "NG" if int(labels[index]) else "OK"


def score_rows(batch: MultiViewBatch, outputs, truth: bool = False) -> list[list[str]]:
    """One row per view of ``batch`` (``SCORE_COLUMNS``, plus ``TRUTH_COLUMNS`` if ``truth``).

    Scores are those of the model's calibration mode (raw kNN distances for ``none``, else
    standardised): never probabilities.
    """
    rows = []
    for b in range(batch.batch_size):
        for v, view in enumerate(batch.view_names):
            row = [
                batch.sample_ids[b],
                view,
                batch.image_paths[b][v] if batch.image_paths else "",
                f"{float(outputs.view_scores[b, v]):.6g}",
                f"{float(outputs.sample_scores[b]):.6g}",
                _decision(outputs.pred_view_labels, (b, v)),
                _decision(outputs.pred_sample_labels, (b,)),
            ]
            if truth:
                row += [_decision(batch.view_labels, (b, v)), _decision(batch.sample_labels, (b,))]
            rows.append(row)
    return rows


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


class PredictionWriter(L.Callback):
    """Write what ``vsad-predict`` produces into ``dir`` (as a callback of
    ``Trainer.predict``, or driven directly: ``start``, ``write`` per batch, ``finish``).

    - ``maps/<sample_id>.png``: the sample's figure (``visualization.figures.sample_figure``):
      every view's image above its anomaly map (the maps of the model's calibration mode),
      titled with the view and sample scores and the OK/NG decisions. The colour scale is the
      checkpoint's fixed scale (``colour_scale``: from its calibration thresholds), the same as
      the pictures of the test run, so a normal part looks calm and a broken one alarming.
    - ``scores.csv``: one row per view, ``SCORE_COLUMNS``: sample_id, view, image_path,
      view_score, sample_score, view_decision, sample_decision (``OK``/``NG``).
    """

    def __init__(self, dir: str = "predictions", vmax: float | None = None) -> None:
        """
        Args:
            dir: the output folder (created; existing files of the same name are replaced).
            vmax: the top of the maps' colour scale; unset: the checkpoint's calibrated scale
                (without a calibration, each sample's own largest score).
        """
        self.dir = Path(dir)
        self.vmax = vmax
        self._rows: list[list] = []
        self.csv_path: Path | None = None
        self._model = None

    def start(self, model=None) -> None:
        """Begin a prediction run: create ``dir/maps`` and forget earlier rows. ``model`` (a
        ``VSADModel`` or ``VSADModule``) gives the maps' fixed colour scale (``colour_scale``)."""
        self._model = model
        self._rows = []
        (self.dir / "maps").mkdir(parents=True, exist_ok=True)

    def write(self, batch: MultiViewBatch, outputs) -> None:
        """The pictures of one scored batch, and its rows for ``scores.csv``."""
        calibrated = colour_scale(self._model)
        for b in range(batch.batch_size):
            maps = outputs.normalised_maps[b].float().cpu()
            scale = calibrated or colour_scale(self._model, fallback_max=float(maps.max()))
            if self.vmax is not None:
                scale = replace(
                    scale, vmax=self.vmax, source=f"scale 0..{self.vmax} (--output.vmax)"
                )

            def labels(t, index):
                return None if t is None else t[index].long().cpu().tolist()

            picture = sample_figure(
                sample_to_original(batch.images[b], batch.registration[b]).float().cpu(),
                maps,
                scale,
                view_names=batch.view_names,
                sample_id=batch.sample_ids[b],
                view_scores=outputs.view_scores[b].float().cpu().tolist(),
                sample_score=float(outputs.sample_scores[b]),
                view_decisions=labels(outputs.pred_view_labels, b),
                sample_decision=labels(outputs.pred_sample_labels, b),
                panel_px=max(MIN_PANEL_PX, batch.images.shape[-1]),
            )
            write_png(self.dir / "maps" / f"{batch.sample_ids[b]}.png", picture)
        self._rows.extend(score_rows(batch, outputs))

    def finish(self, rows: list[list] | None = None) -> Path:
        """Write ``scores.csv`` (this writer's rows, or ``rows`` gathered over processes);
        returns its path."""
        self.csv_path = self.dir / "scores.csv"
        rows = self._rows if rows is None else rows
        _write_csv(self.csv_path, list(SCORE_COLUMNS), rows)
        return self.csv_path

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self.start(pl_module)

    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch: MultiViewBatch, batch_idx, dataloader_idx=0
    ) -> None:
        self.write(batch, outputs)

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        rows = self._rows
        # Under DDP each rank scored its own shard: gather every rank's rows, rank 0 writes
        # them all, in sample order (views keep theirs), as TestScoresWriter does.
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            everyone: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, rows)
            rows = sorted((row for part in everyone for row in part), key=lambda row: row[0])
        if trainer.is_global_zero:
            self.finish(rows)


class TestScoresWriter(L.Callback):
    """``<run>/scores.csv`` of a test run: ``SCORE_COLUMNS`` then ``TRUTH_COLUMNS``, one row per
    view, sorted by sample id.

    Under DDP every rank's rows are gathered (``all_gather_object``) and rank 0 writes; a sample
    the distributed sampler repeated to even out the shards is written once.
    """

    def __init__(self) -> None:
        self._rows: list[list[str]] = []
        self.csv_path: Path | None = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []

    def on_test_batch_end(
        self, trainer, pl_module, outputs, batch: MultiViewBatch, batch_idx, dataloader_idx=0
    ) -> None:
        self._rows.extend(score_rows(batch, outputs, truth=True))

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        rows = self._rows
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            everyone: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, rows)
            rows = [row for part in everyone for row in part]
        folder = run_dir(trainer)  # a collective: every rank calls it
        if not trainer.is_global_zero:
            return
        unique: dict[tuple[str, str], list[str]] = {}
        for row in rows:
            unique.setdefault((row[0], row[1]), row)  # the first occurrence wins
        ordered = sorted(unique.values(), key=lambda row: row[0])  # stable: views keep order
        self.csv_path = folder / "scores.csv"
        _write_csv(self.csv_path, [*SCORE_COLUMNS, *TRUTH_COLUMNS], ordered)
