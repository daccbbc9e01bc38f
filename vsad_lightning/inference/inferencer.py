"""``VSADInferencer``: score multi-view samples with a fitted model, without a Trainer, a
datamodule or the training data.

The model (``VSADModel``) carries its camera rig, memory bank and calibration, so a checkpoint
(``final.ckpt``) or an exported bundle (``vsad export``) is all that is needed. A sample goes
through the same steps as in ``vsad-test``: the stored views are read as RGB, the sample's own
homographies are estimated from them when the model was fitted with per-sample homographies
(``Rig.sample_homographies``), the views are resized and normalised
(``data.transforms.views_to_tensors``) and scored; so the numbers are ``vsad-test``'s.

    inferencer = VSADInferencer.from_checkpoint("runs/.../checkpoints/final.ckpt")
    result = inferencer.predict({"C1": "a.jpg", "C2": "b.jpg", ...})
    result.sample_score, result.decision, result.view_decisions, result.maps
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vsad_lightning.data.batch import MultiViewBatch, MultiViewSample, collate_multiview
from vsad_lightning.data.dataset import read_sample_views
from vsad_lightning.data.folder import index_folder
from vsad_lightning.data.images import read_image_rgb
from vsad_lightning.data.transforms import views_to_tensors
from vsad_lightning.errors import DataError
from vsad_lightning.models.model import (
    ARCHITECTURE_FIELDS,
    SCORING_FIELDS,
    AnomalyPrediction,
    VSADModel,
)

ViewInput = str | os.PathLike | np.ndarray | Tensor
"""One view: an image file, an ``(H, W, 3)`` uint8 RGB array, or a ``(3, H, W)`` tensor (uint8
0..255, or float in [-1, 1] as ``MultiViewBatch.images`` holds them)."""


@dataclass
class SamplePrediction:
    """The result for one sample (views in ``view_names`` order, maps at the model's size).

    Attributes:
        sample_id: the sample's name (its folder for ``predict_folder``).
        view_names: the rig's views.
        anomaly_maps: ``(V, H, W)`` raw kNN distances.
        maps: ``(V, H, W)`` the maps of the model's calibration mode (the view scores are
            their maxima).
        view_scores: ``(V,)``; sample_score: the max over the views.
        view_labels: ``(V,)`` bool, True = NG at the calibrated view thresholds; ``None`` when
            the model holds no calibration. sample_label: likewise for the sample.
        masks: ``(V, H, W)`` bool, pixels above their view's threshold (``None`` uncalibrated).
    """

    sample_id: str
    view_names: list[str]
    anomaly_maps: Tensor
    maps: Tensor
    view_scores: Tensor
    sample_score: float
    view_labels: Tensor | None
    sample_label: bool | None
    masks: Tensor | None

    @property
    def decision(self) -> str | None:
        """``"OK"``, ``"NG"``, or ``None`` for an uncalibrated model."""
        return None if self.sample_label is None else ("NG" if self.sample_label else "OK")

    @property
    def view_decisions(self) -> dict[str, str] | None:
        if self.view_labels is None:
            return None
        return {
            v: "NG" if bool(x) else "OK"
            for v, x in zip(self.view_names, self.view_labels, strict=True)
        }


def split_prediction(
    batch: MultiViewBatch, prediction: AnomalyPrediction
) -> list[SamplePrediction]:
    """One ``SamplePrediction`` per sample of a scored batch (on the CPU)."""
    out = []
    for b in range(batch.batch_size):

        def pick(t: Tensor | None, b: int = b) -> Tensor | None:
            return None if t is None else t[b].detach().cpu()

        view_labels, sample_label = (
            pick(prediction.pred_view_labels),
            pick(prediction.pred_sample_labels),
        )
        masks = pick(prediction.pred_masks)
        out.append(
            SamplePrediction(
                sample_id=batch.sample_ids[b],
                view_names=list(batch.view_names),
                anomaly_maps=pick(prediction.anomaly_maps)[:, 0],
                maps=pick(prediction.normalised_maps)[:, 0],
                view_scores=pick(prediction.view_scores),
                sample_score=float(prediction.sample_scores[b]),
                view_labels=None if view_labels is None else view_labels.bool(),
                sample_label=None if sample_label is None else bool(sample_label),
                masks=None if masks is None else masks[:, 0].bool(),
            )
        )
    return out


def _as_rgb(view: ViewInput, what: str) -> tuple[np.ndarray, str]:
    """``(H, W, 3)`` uint8 RGB and the source path ("" for arrays)."""
    if isinstance(view, str | os.PathLike):
        return read_image_rgb(view, what), str(view)
    if isinstance(view, Tensor):
        t = view.detach().cpu()
        if t.dim() != 3 or t.shape[0] != 3:
            raise DataError(f"{what}: expected a (3, H, W) tensor, got {tuple(t.shape)}")
        if t.is_floating_point():
            t = ((t.clamp(-1, 1) + 1) * 127.5).round()
        return t.to(torch.uint8).permute(1, 2, 0).contiguous().numpy(), ""
    if isinstance(view, np.ndarray):
        if view.ndim != 3 or view.shape[2] != 3 or view.dtype != np.uint8:
            raise DataError(
                f"{what}: expected an (H, W, 3) uint8 RGB array, got {view.shape} {view.dtype}"
            )
        return np.ascontiguousarray(view), ""
    raise DataError(f"{what}: expected a path, a numpy array or a tensor, got {type(view)}")


class VSADInferencer:
    """Scores samples with a ``VSADModel`` (see the module docstring).

    Args:
        model: a fitted model (bank, rig and, for OK/NG, calibration).
        device: where to score (``"cpu"``, ``"cuda"``).
    """

    def __init__(self, model: VSADModel, device: str | torch.device = "cpu") -> None:
        model.rig.require()
        model.check_ready()
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    # ------------------------------------------------------------------------- loading
    @classmethod
    def from_checkpoint(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", **settings
    ) -> VSADInferencer:
        """From a checkpoint written by ``vsad fit`` (``final.ckpt``), loaded with
        ``weights_only=True`` (nothing is unpickled). ``settings`` override scoring settings
        (``ScoringConfig`` fields, e.g. ``calibration="view"``)."""
        return cls(load_checkpoint_model(path, **settings), device)

    @classmethod
    def from_bundle(
        cls, folder: str | os.PathLike, device: str | torch.device = "cpu", **settings
    ) -> VSADInferencer:
        """From a bundle written by ``vsad export`` (safetensors + JSON, nothing unpickled)."""
        from vsad_lightning.inference.export import load_bundle

        return cls(load_bundle(folder, **settings), device)

    @property
    def view_names(self) -> list[str]:
        return list(self.model.rig.view_names)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.model.rig.image_size

    # ------------------------------------------------------------------------- samples
    def make_sample(
        self, views: Mapping[str, ViewInput], sample_id: str = "sample"
    ) -> MultiViewSample:
        """One sample as the model sees it: resized views, its homographies, no labels."""
        self.model.rig.check_views(list(views), f"sample {sample_id!r}")
        images, paths = [], []
        for view in self.view_names:
            rgb, path = _as_rgb(views[view], f"sample {sample_id!r} view {view}")
            images.append(rgb)
            paths.append(path)
        return self._sample(images, sample_id, paths)

    def _sample(self, images: list[np.ndarray], sample_id: str, paths: list[str]):
        first = images[0].shape
        for view, image in zip(self.view_names, images, strict=True):
            if image.shape != first:
                raise DataError(
                    f"sample {sample_id!r} view {view} is {image.shape[1]}x{image.shape[0]} px, "
                    f"but view {self.view_names[0]} is {first[1]}x{first[0]} px; all views of "
                    "a sample must have the same size"
                )
        homographies = self.model.rig.sample_homographies(images)
        tensors, masks = views_to_tensors(images, [None] * len(images), self.image_size)
        zeros = torch.zeros(len(images), dtype=torch.long)
        return MultiViewSample(
            images=tensors,
            masks=masks,
            view_labels=zeros,
            sample_label=zeros.max(),
            homographies=homographies,
            sample_id=sample_id,
            category="",
            view_names=self.view_names,
            image_paths=paths,
        )

    def score_batch(self, batch: MultiViewBatch) -> AnomalyPrediction:
        """The model's prediction for a batch (its images and homographies, the rig's
        neighbour mask)."""
        batch = batch.to(self.device)
        return self.model(batch.images, batch.homographies, self.model.rig.neighbour_mask)

    def collate(self, samples: Sequence[MultiViewSample]) -> MultiViewBatch:
        return collate_multiview(samples, self.model.rig.neighbour_mask.cpu())

    def predict(self, views: Mapping[str, ViewInput], sample_id: str = "sample"):
        """Score one sample: ``{"C1": path | array | tensor, ...}`` -> ``SamplePrediction``."""
        batch = self.collate([self.make_sample(views, sample_id)])
        return split_prediction(batch, self.score_batch(batch))[0]

    def predict_batches(
        self, root: str | os.PathLike, batch_size: int = 1
    ) -> Iterator[tuple[MultiViewBatch, AnomalyPrediction]]:
        """Score every sample folder of ``root`` (``<root>/<sample_id>/<view>.<ext>``, the
        ``vsad predict`` layout), ``batch_size`` samples at a time, in sample-id order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        records, _ = index_folder(root, None, self.view_names)
        for start in range(0, len(records), batch_size):
            samples = []
            for record in records[start : start + batch_size]:
                images, _ = read_sample_views(record)
                paths = [str(vf.image_path) for vf in record.views]
                samples.append(self._sample(images, record.sample_id, paths))
            batch = self.collate(samples)
            yield batch, self.score_batch(batch)

    def predict_folder(
        self, root: str | os.PathLike, batch_size: int = 1
    ) -> list[SamplePrediction]:
        """``predict`` for every sample folder of ``root`` (see ``predict_batches``)."""
        return [
            result
            for batch, prediction in self.predict_batches(root, batch_size)
            for result in split_prediction(batch, prediction)
        ]


_LEGACY_PREFIXES = ("encoder.", "unet.", "memory_bank.", "calibration.")


def load_checkpoint_model(path: str | os.PathLike, **settings) -> VSADModel:
    """The ``VSADModel`` of a ``VSADModule`` checkpoint (hyperparameters and weights)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist (expected a .ckpt written by vsad fit)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    hparams = checkpoint.get("hyper_parameters") or {}
    wanted = (*ARCHITECTURE_FIELDS, *SCORING_FIELDS)
    kwargs = {key: hparams[key] for key in wanted if key in hparams}
    kwargs.update(settings)
    model = VSADModel(**kwargs)
    state = {}
    for key, value in checkpoint["state_dict"].items():
        if key.startswith("model."):
            state[key[len("model.") :]] = value
        elif key.startswith(_LEGACY_PREFIXES):
            state[key] = value
    model.load_state_dict(state, strict=True)
    return model.eval()
