"""``PredictionWriter``: PNG anomaly maps and a CSV of view and sample scores."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import lightning as L

from vsad_lightning.callbacks.outputs import AnomalyMapPictures
from vsad_lightning.data.batch import MultiViewBatch
from vsad_lightning.utils.io import atomic_write_text


class PredictionWriter(L.Callback):
    """Write what ``vsad-predict`` produces into ``dir``.

    - ``maps/<sample_id>.png``: the views side by side, the image above its anomaly-map overlay
      (colour scale 0..``vmax``; ``vmax`` unset means the sample's own largest score).
    - ``scores.csv``: one row per view: sample_id, view, image_path, view_score, sample_score.
      Scores are raw kNN distances (not probabilities).

    Args:
        dir: the output folder (created; existing files of the same name are replaced).
        vmax: a fixed top of the colour scale, so pictures of different runs compare.
    """

    def __init__(self, dir: str = "predictions", vmax: float | None = None) -> None:
        self.dir = Path(dir)
        self.vmax = vmax
        self._rows: list[list] = []
        self._pictures = AnomalyMapPictures()
        self.csv_path: Path | None = None

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        self._rows = []
        (self.dir / "maps").mkdir(parents=True, exist_ok=True)

    def on_predict_batch_end(
        self, trainer, pl_module, outputs, batch: MultiViewBatch, batch_idx, dataloader_idx=0
    ) -> None:
        for b in range(batch.batch_size):
            maps = outputs.anomaly_maps[b].float().cpu()
            vmax = self.vmax if self.vmax is not None else float(maps.max())
            picture = self._pictures.render(
                batch.images[b].float().cpu(), batch.masks[b].float().cpu(), maps, vmax=vmax
            )
            cv2.imwrite(str(self.dir / "maps" / f"{batch.sample_ids[b]}.png"), picture[..., ::-1])
            for v, view in enumerate(batch.view_names):
                path = batch.image_paths[b][v] if batch.image_paths else ""
                self._rows.append(
                    [
                        batch.sample_ids[b],
                        view,
                        path,
                        f"{float(outputs.view_scores[b, v]):.6g}",
                        f"{float(outputs.sample_scores[b]):.6g}",
                    ]
                )

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["sample_id", "view", "image_path", "view_score", "sample_score"])
        writer.writerows(self._rows)
        self.csv_path = self.dir / "scores.csv"
        atomic_write_text(self.csv_path, buffer.getvalue())
