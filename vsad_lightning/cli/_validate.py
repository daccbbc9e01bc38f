"""Check a whole run configuration before anything is trained or written.

The constructors of the model, the datamodule and the callbacks refuse most bad values
themselves (``VSADCLI.instantiate_classes`` turns their ``ValueError`` into a ``DataError``).
What follows are the values that are only *used* later, after training (the anomaly maps'
``sigma``, ``t_star`` against the scheduler, the bank's coreset with a positional bank) or
inside a library (the optimiser's learning rate, the ``DataLoader``'s workers): a mistake in
one of them used to cost a whole training run, or leave a run folder behind.
Every check here is cheap and needs no data.
"""

from __future__ import annotations

import math
from typing import Any

from vsad_lightning.errors import DataError


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DataError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def validate_model_options(hp: Any) -> None:
    """The ``model.*`` values whose constructor message would name an inner argument
    (``num_steps``, ``R``) instead of the option; checked on the parsed config."""
    if hp is None:
        return
    steps = getattr(hp, "inversion_steps", None)
    if isinstance(steps, int) and steps < 1:
        raise DataError(f"model.inversion_steps must be >= 1, got {steps}")
    window = getattr(hp, "window", None)
    if isinstance(window, int) and (window < 1 or window % 2 == 0):
        raise DataError(f"model.window (R) must be a positive odd integer, got {window}")
    heads = getattr(hp, "num_heads", None)
    if isinstance(heads, int) and heads < 1:
        raise DataError(f"model.num_heads must be >= 1, got {heads}")


def validate_model(model: Any) -> None:
    """The ``model.*`` values that ``VSADModule`` only uses after training.

    ``t_star`` must be a timestep of the scheduler (``docs/method.md#inversion``): the tiny
    backbone's schedule has 1000, SD2's as its ``scheduler/`` folder says.
    """
    hp = model.hparams
    steps = int(model.noise_scheduler.config.num_train_timesteps)
    if not 1 <= int(hp.t_star) < steps:
        raise DataError(
            f"model.t_star must be in [1, {steps - 1}] (the scheduler has {steps} timesteps), "
            f"got {hp.t_star}"
        )
    if hp.feature_mode == "inversion" and int(hp.inversion_steps) < 1:
        raise DataError(f"model.inversion_steps must be >= 1, got {hp.inversion_steps}")
    if hp.feature_mode == "inversion" and int(hp.inversion_steps) > int(hp.t_star):
        raise DataError(
            f"model.inversion_steps ({hp.inversion_steps}) must not exceed model.t_star "
            f"({hp.t_star}): each inversion step advances at least one timestep"
        )
    if hp.max_train_timestep is not None and not 1 <= int(hp.max_train_timestep) <= steps:
        raise DataError(
            f"model.max_train_timestep must be in [1, {steps}] or null, got {hp.max_train_timestep}"
        )
    for name, low in (("sigma", 0.0), ("lr", 0.0), ("weight_decay", 0.0), ("lambda_r", 0.0)):
        value = _finite(f"model.{name}", getattr(hp, name))
        if value < low:
            raise DataError(f"model.{name} must be >= {low:g}, got {value:g}")
    if int(hp.warmup_steps) < 0:
        raise DataError(f"model.warmup_steps must be >= 0, got {hp.warmup_steps}")
    if hp.level_weights is not None:
        for w in hp.level_weights:
            if _finite("model.level_weights", w) < 0:
                raise DataError(f"model.level_weights must be >= 0, got {list(hp.level_weights)}")


def validate_data(data: Any) -> None:
    """The ``data.*`` values the ``DataLoader`` or the estimator would refuse later."""
    hp = data.hparams
    if int(hp.num_workers) < 0:
        raise DataError(f"data.num_workers must be >= 0 (0: load in the main process), "
                        f"got {hp.num_workers}")  # fmt: skip
    if int(hp.homography_samples) < 1:
        raise DataError(f"data.homography_samples must be >= 1, got {hp.homography_samples}")


def validate_bank(bank: Any, model: Any) -> None:
    """A positional bank compares features in place, so it needs every training feature."""
    if getattr(model.hparams, "bank_mode", "global") == "positional" and bank.coreset_ratio < 1:
        raise DataError(
            "model.bank_mode 'positional' compares features in place and needs every training "
            f"feature: set bank.coreset_ratio to 1.0 (got {bank.coreset_ratio})"
        )
    if int(bank.projection_dim) < 1:
        raise DataError(f"bank.projection_dim must be >= 1, got {bank.projection_dim}")


def validate_run(model: Any, data: Any, bank: Any | None) -> None:
    """Every up-front check of one run; the first problem is a one-line ``DataError``."""
    validate_model(model)
    validate_data(data)
    if bank is not None:
        validate_bank(bank, model)
