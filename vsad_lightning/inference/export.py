"""Export a fitted model as a self-contained bundle, loadable without unpickling anything.

A bundle is a folder::

    config.json          hyperparameters (architecture + scoring settings), the camera rig
                         (views, neighbour graph, image size, the category cache where
                         per-sample homographies are used) and how the bank was built
    model.safetensors    every tensor of the model: weights, memory bank, calibration, rig

``safetensors`` holds tensors only and ``json`` plain values, so loading a bundle runs no
code from the files (a ``.ckpt`` needs ``torch.load(weights_only=True)`` for the same
guarantee). ``load_bundle`` rebuilds the ``VSADModel``; ``VSADInferencer.from_bundle`` wraps it.

``ScoringGraph.export`` compiles the scoring path (kNN against the bank, maps, calibration,
fusion, OK/NG) with ``torch.export`` for the model's settings. The feature extraction is not
exported: diffusers' U-Net and MVAM's gathers do not trace through ``torch.export`` as they
are (see the README's "Export" paragraph).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vsad_lightning.errors import DataError
from vsad_lightning.models import fusion
from vsad_lightning.models.calibration import CALIBRATION_MODES
from vsad_lightning.models.fusion import fuse_maps
from vsad_lightning.models.model import VSADModel
from vsad_lightning.models.scoring import sample_scores, score_features, view_scores
from vsad_lightning.utils.io import atomic_write_text

BUNDLE_FORMAT = "vsad-bundle"
BUNDLE_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_RIG_STATE = "rig._extra_state"


def export_bundle(model: VSADModel, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model`` as a bundle into ``folder`` (created); returns the folder."""
    model.rig.require()
    model.check_ready()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    rig = state.pop(_RIG_STATE)
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in state.items()}
    config = {
        "format": BUNDLE_FORMAT,
        "version": BUNDLE_VERSION,
        "hyperparameters": model.hyperparameters(),
        "rig": rig,
        **(extra or {}),
    }
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": BUNDLE_FORMAT})
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=1) + "\n")
    return folder


def load_bundle(folder: str | os.PathLike, **settings) -> VSADModel:
    """The ``VSADModel`` of a bundle; ``settings`` override scoring settings."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise DataError(
                f"{path} does not exist: {folder} is not a bundle written by vsad export"
            )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{config_path} is not valid JSON ({e})") from e
    if config.get("format") != BUNDLE_FORMAT or config.get("version") != BUNDLE_VERSION:
        raise DataError(
            f"{config_path}: format {config.get('format')!r} version {config.get('version')!r}, "
            f"expected {BUNDLE_FORMAT!r} version {BUNDLE_VERSION}"
        )
    model = VSADModel(**{**config["hyperparameters"], **settings})
    state: dict = dict(load_file(str(weights_path)))
    state[_RIG_STATE] = config["rig"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def checkpoint_to_bundle(ckpt_path: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """``vsad export``: the model of a checkpoint as a bundle."""
    from vsad_lightning.inference.inferencer import load_checkpoint_model

    model = load_checkpoint_model(ckpt_path)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    extra = {"memory_bank_build": checkpoint.get("memory_bank_build", {})}
    return export_bundle(model, folder, extra)


class ScoringGraph(nn.Module):
    """The scoring path of a fitted ``VSADModel`` with its settings fixed, for ``torch.export``.

    ``forward(features, homographies)`` takes ``extract_features``' output and the batch's
    ``(B, V, V, 3, 3)`` homographies and returns ``(maps, view_scores, sample_scores,
    view_labels, sample_labels, masks)`` as ``VSADModel.score_extracted`` does (the maps of the
    calibration mode; only the first three without a calibration). It runs the same functions
    (``score_features``, ``Calibration`` buffers, ``fuse_maps``) without the Python checks that
    re-derive statistics when a setting changes: those run once in ``export``.
    """

    def __init__(self, model: VSADModel) -> None:
        super().__init__()
        # Only what scoring reads (the U-Net's weights stay out of the graph).
        self.memory_bank = model.memory_bank
        self.calibration = model.calibration
        self.rig = model.rig
        self.config = replace(model.config)
        self.level_weights = dict(model.level_weights)

    def forward(self, features: dict[int, Tensor], homographies: Tensor):
        model, config = self, self.config
        out = score_features(
            model.memory_bank,
            features,
            model.rig.image_size,
            weights=model.level_weights,
            sigma=config.sigma,
            backend="torch",
            positional_radius=config.radius,
        )
        calibration = model.calibration
        if not calibration.is_fitted():
            return out.anomaly_maps, out.view_scores, out.sample_scores
        mode = config.calibration
        m = CALIBRATION_MODES.index(mode)
        maps = calibration._mode_maps(out.anomaly_maps, mode)
        if config.fusion_strength > 0:
            maps = fuse_maps(
                maps, homographies, model.rig.neighbour_mask, float(config.fusion_strength)
            )
        if mode != "none":
            shape = (1, -1, 1, 1, 1)
            maps = (maps - calibration.view_center[m].view(shape)) / calibration.view_scale[m].view(
                shape
            )
        per_view = view_scores(maps)
        per_sample = sample_scores(per_view)
        threshold = calibration.view_threshold[m]
        return (
            maps,
            per_view,
            per_sample,
            (per_view > threshold).long(),
            (per_sample > calibration.sample_threshold[m]).long(),
            maps > threshold.view(1, -1, 1, 1, 1),
        )

    @classmethod
    def export(cls, model: VSADModel, features: dict[int, Tensor], homographies: Tensor):
        """``torch.export`` of the scoring path for features of these shapes; returns the
        exported program's module (call it like ``forward``)."""
        model.eval()
        # Settings changed since fitting re-derive their statistics here, eagerly, once.
        model.score_extracted(
            features, model.rig.image_size, homographies, model.rig.neighbour_mask
        )
        # Shapes that are stored as data are read now, as constants of the graph: the bank's
        # grids and the neighbour pairs of the rig (a nonzero() of its mask).
        bank = model.memory_bank
        grids = {level: bank.grid(level) for level in bank.levels}
        pairs = fusion.neighbour_pairs(model.rig.neighbour_mask)
        bank.grid = grids.get  # instance attribute: shadows the method while tracing
        try:
            with mock.patch.object(fusion, "neighbour_pairs", lambda mask: pairs):
                program = torch.export.export(cls(model), (features, homographies), strict=False)
        finally:
            del bank.grid
        return program.module()
