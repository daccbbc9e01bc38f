"""Export a fitted model as a self-contained bundle, loadable without unpickling anything.

A bundle is a folder::

    config.json          hyperparameters (architecture + scoring settings), the camera rig
                         (views, neighbour graph, image size, the category cache where
                         per-sample homographies are used) and how the bank was built
    model.safetensors    every tensor of the model: weights, memory bank, calibration, rig

``safetensors`` holds tensors only and ``json`` plain values, so loading a bundle runs no
code from the files (a ``.ckpt`` needs ``torch.load(weights_only=True)`` for the same
guarantee). ``load_bundle`` rebuilds the ``VSADModel``; ``VSADInferencer.from_bundle`` wraps it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vsad_lightning.errors import DataError
from vsad_lightning.models.model import VSADModel
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
            raise DataError(f"{path} does not exist: {folder} is not a bundle written by vsad export")
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
