"""``VSADModule``: the LightningModule (the *system*) that wires the models together.

The models are plain ``nn.Module``s from ``vsad_lightning.models``: a frozen image encoder,
the ``ViewAlignedUNet`` (diffusers U-Net + MVAM + FRM), the ``FeatureExtractor`` and the
``MemoryBank``. This class owns the training objective, scoring and metric updates; every side
effect (building the bank, writing files and pictures) lives in ``vsad_lightning.callbacks``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from vsad_lightning.bank.storage import MemoryBank
from vsad_lightning.data.batch import MultiViewBatch
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.registration import is_identity, maps_to_original
from vsad_lightning.metrics import AnomalyMetrics
from vsad_lightning.models.backbones import build_backbone
from vsad_lightning.models.calibration import (
    CALIBRATION_MODES,
    Calibration,
    CalibrationMode,
    ThresholdRule,
    leave_one_out_maps,
)
from vsad_lightning.models.features import (
    LATENT_LEVEL,
    FeatureExtractor,
    FeatureNorm,
    normalise_features,
)
from vsad_lightning.models.objective import diffusion_objective
from vsad_lightning.models.scoring import score_features
from vsad_lightning.models.unet import ViewAlignedUNet


class NonFiniteLossError(DataError):
    """Training stopped: the loss was NaN or inf for ``max_bad_steps`` consecutive steps.

    A ``DataError`` so that ``vsad-fit`` reports it as one line with exit code 2: the usual
    causes are a learning rate that is far too high or corrupt input images, both things the
    user fixes in the config or the data.
    """


def step_generator(device: torch.device, *key: int) -> torch.Generator:
    """A generator seeded from ``key`` alone (e.g. ``(seed, epoch, batch_idx, rank)``).

    The training noise then depends only on where training stands, never on how many random
    numbers the process drew before (a resumed run, a different number of validation batches),
    which is what makes a resumed run finish bit-identical to an uninterrupted one.
    ``SeedSequence`` mixes the words so that neighbouring keys give unrelated streams.
    """
    words = np.random.SeedSequence([int(k) for k in key]).generate_state(2, dtype=np.uint32)
    seed = (int(words[0]) << 32) | int(words[1])
    return torch.Generator(device=device).manual_seed(seed)


@dataclass
class AnomalyPrediction:
    """What ``test_step`` and ``predict_step`` return for one batch.

    Attributes:
        anomaly_maps: ``(B, V, 1, H, W)`` raw distances (not probabilities), whatever the
            calibration mode.
        normalised_maps: ``(B, V, 1, H, W)`` the maps of the calibration mode
            (``VSADModule(calibration=...)``; the raw maps for ``none``): the view scores are
            their maxima and the pixel metrics are computed on them.
        view_scores: ``(B, V)``, the max of each view's normalised map.
        sample_scores: ``(B,)``, the max over the sample's views.
        pred_view_labels: ``(B, V)`` int64, 1 = NG at the calibrated view threshold; ``None``
            when the checkpoint holds no calibration.
        pred_sample_labels: ``(B,)`` int64, 1 = NG at the calibrated sample threshold.
        pred_masks: ``(B, V, 1, H, W)`` bool, pixels above their view's threshold (a view is NG
            exactly when its mask has a pixel).
    """

    anomaly_maps: Tensor
    view_scores: Tensor
    sample_scores: Tensor
    normalised_maps: Tensor | None = None
    pred_view_labels: Tensor | None = None
    pred_sample_labels: Tensor | None = None
    pred_masks: Tensor | None = None

    def __post_init__(self) -> None:
        if self.normalised_maps is None:
            self.normalised_maps = self.anomaly_maps


def update_metrics(
    metrics: AnomalyMetrics, batch: MultiViewBatch, prediction: AnomalyPrediction
) -> None:
    """One test batch into ``metrics``: the scored maps (calibrated where the model is), the
    view and sample scores and decisions, against the batch's labels."""
    metrics.update(
        prediction.normalised_maps,
        batch.masks,
        prediction.view_scores,
        prediction.sample_scores,
        batch.view_labels,
        batch.sample_labels,
        pred_view_labels=prediction.pred_view_labels,
        pred_sample_labels=prediction.pred_sample_labels,
    )


def to_original_frames(prediction: AnomalyPrediction, registration: Tensor) -> AnomalyPrediction:
    """``prediction`` with its pixel maps carried from the registered frames back to the
    original ones (``maps_to_original``); itself, untouched, when every ``R_v`` is the
    identity (registration off)."""
    if is_identity(registration):
        return prediction
    normalised_is_raw = prediction.normalised_maps is prediction.anomaly_maps
    anomaly_maps = maps_to_original(prediction.anomaly_maps, registration)
    return replace(
        prediction,
        anomaly_maps=anomaly_maps,
        normalised_maps=(
            anomaly_maps
            if normalised_is_raw
            else maps_to_original(prediction.normalised_maps, registration)
        ),
        pred_masks=(
            None
            if prediction.pred_masks is None
            else maps_to_original(prediction.pred_masks, registration)
        ),
    )


class VSADModule(L.LightningModule):
    """VSAD: view-aligned latent diffusion features scored against a memory bank of normals.

    Args:
        backbone: ``tiny`` (random init, trained from scratch, CPU-friendly) or ``sd2`` (a local
            Stable Diffusion 2 base folder given by ``backbone_path``).
        backbone_path: the local SD2 folder (``unet/``, ``vae/``, ``scheduler/``, ...).
        image_size: the training image size (the tiny U-Net's ``sample_size`` derives from it).
        tiny_encoder: the tiny backbone's image encoder (see ``build_backbone``).
        feature_levels: decoder up-block indices whose outputs (after FRM) are the features;
            negative indices count from the last block (default: the last two, the paper's
            levels 3 and 4).
        attention_dim, num_heads, window, num_frequencies: MVAM's attention width, heads,
            candidate window R and frequency count L (docs/method.md#mvam).
        use_mvam, use_frm: ablation switches; off means the module is not installed.
        train_unet: ``none | decoder | all`` (docs/method.md#training). A ``tiny`` backbone has
            random weights, so it needs ``all``.
        gradient_checkpointing: recompute U-Net activations in backward to save memory.
        lambda_r: weight of the consistency loss L_r in ``L = L_d + lambda_r * L_r``.
        max_train_timestep: draw training timesteps from ``[0, max_train_timestep)`` rather
            than the whole schedule (``None``, the paper's choice); see ``diffusion_objective``.
        lr, weight_decay: AdamW.
        warmup_steps: linear warm-up steps of the learning rate (0: none).
        lr_schedule: ``constant`` or ``cosine`` decay to 0 over the estimated training steps.
        feature_mode: ``inversion`` (DDIM inversion to ``t_star`` in ``inversion_steps`` steps)
            or ``noise`` (deterministic forward noising with ``feature_seed``).
        t_star, inversion_steps, feature_seed: see ``feature_mode``.
        level_weights: ``w_l`` in the pixel score, one per feature level (default: all 1).
        latent_weight: ``w`` of one extra level, the encoder's latent ``z_v`` itself (key
            ``LATENT_LEVEL``); 0 (default, the paper) leaves it out. The U-Net's features
            describe a position through its context; the latent keeps the fine local detail
            (with the tiny backbone's pixel-unshuffle encoder, the raw 4x4 pixel patch), which
            catches small, low-contrast defects. It gets the same ``feature_norm`` and bank
            mode as the other levels. Measured in ``benchmarks/results/accuracy.md``.
        sigma: Gaussian smoothing of the anomaly maps, in image pixels.
        knn_backend: ``auto`` (the exact projected search on large CPU banks with a steep
            spectrum, else ``torch``), ``torch``, ``faiss`` or ``projected``; all
            exact, the same distances (``vsad_lightning.bank.knn``).
        feature_norm: ``none | instance | l2``, applied to bank and test features alike
            (``vsad_lightning.models.features.normalise_features``).
        bank_mode: ``global`` (the paper: every query against the whole bank of its level) or
            ``positional`` (only the same view within ``positional_radius`` feature positions;
            needs ``bank.coreset_ratio: 1.0``; ``MemoryBank.positional_distances``).
        positional_radius: the positional bank's search half-width, in feature positions.
        noise_seed: seeds the training timesteps and noise together with
            ``(epoch, batch_idx, global_rank)`` (``step_generator``); ``None``: the run's
            ``seed_everything`` value (``PL_GLOBAL_SEED``), else 0.
        max_bad_steps: a step whose loss is NaN or inf is skipped (no optimiser step) and
            counted in ``train/skipped_steps``; after this many consecutive such steps training
            stops with ``NonFiniteLossError``.
        calibration: how view and sample scores are normalised with statistics of the training
            normals' leave-one-out maps (``vsad_lightning.models.calibration``, computed by
            ``MemoryBankCallback`` at fit end for every mode, so it can be switched at test
            time): ``none`` (the paper: raw distances), ``view`` (each view's scores
            standardised by the normals' view scores of that view) or ``position`` (each map
            pixel standardised by the normals' maps at that place, then per view). Default
            ``none`` keeps the paper's scores; ``configs/demo.yaml`` uses ``position``
            (measured in the README's options table).
        threshold_rule: how the OK/NG thresholds come from the normals' scores: ``quantile``
            (the ``threshold_quantile`` quantile, per view and per sample: exactly
            ``n - 1 - floor((n - 1) q)`` of ``n`` LOO normals are NG, 2 of 40 at 0.95) or
            ``sigma`` (median + ``threshold_sigma`` x 1.4826 MAD). The 0.95 quantile lies
            inside the data of ~40 normals (between the 38th and 39th largest) instead of
            extrapolating a tail shape; measured in the README's options table.
        threshold_quantile, threshold_sigma: the value of each rule.
        calibration_floor: the per-pixel spread of the ``position`` mode is at least this
            fraction of its view's mean spread, so that a place where normals never vary (flat
            background) cannot turn a tiny change into a huge score; at 1.0 (default) places
            noisier than the view's average are damped and none is amplified.
        calibration_folds: the global bank's leave-one-out uses this many folds (sub-banks
            without one fold's samples); the positional bank leaves out exactly the sample.
        fusion_strength: cross-view fusion of the calibrated maps before the view score
            (``vsad_lightning.models.fusion``, docs/method.md#fusion): a place that the
            neighbouring views see, carried through the sample's homographies, keeps only the
            part of its score that a neighbour confirms, in proportion ``fusion_strength``
            (0: off, the paper's scoring; 1: fully). Places no neighbour sees keep their score,
            so defects that one view alone sees are never discounted. Needs a calibrated
            model; the normals' statistics are re-derived when it changes at test time.
    """

    def __init__(
        self,
        backbone: Literal["tiny", "sd2"] = "tiny",
        backbone_path: str | None = None,
        image_size: int = 128,
        tiny_encoder: Literal["unshuffle", "vae"] = "unshuffle",
        feature_levels: Sequence[int] = (-2, -1),
        attention_dim: int = 64,
        num_heads: int = 4,
        window: int = 3,
        num_frequencies: int = 4,
        use_mvam: bool = True,
        use_frm: bool = True,
        train_unet: Literal["none", "decoder", "all"] = "all",
        gradient_checkpointing: bool = False,
        lambda_r: float = 0.1,
        max_train_timestep: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        feature_mode: Literal["inversion", "noise"] = "inversion",
        t_star: int = 200,
        inversion_steps: int = 5,
        feature_seed: int = 0,
        level_weights: Sequence[float] | None = None,
        latent_weight: float = 0.0,
        sigma: float = 4.0,
        knn_backend: Literal["auto", "torch", "faiss", "projected"] = "auto",
        feature_norm: FeatureNorm = "none",
        bank_mode: Literal["global", "positional"] = "global",
        positional_radius: int = 2,
        noise_seed: int | None = None,
        max_bad_steps: int = 5,
        calibration: CalibrationMode = "none",
        threshold_rule: ThresholdRule = "quantile",
        threshold_quantile: float = 0.95,
        threshold_sigma: float = 3.0,
        calibration_floor: float = 1.0,
        calibration_folds: int = 5,
        fusion_strength: float = 0.0,
    ) -> None:
        super().__init__()
        if max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        if calibration not in CALIBRATION_MODES:
            raise ValueError(f"calibration must be one of {CALIBRATION_MODES}, got {calibration!r}")
        if threshold_rule not in ("quantile", "sigma"):
            raise ValueError(
                f"threshold_rule must be 'quantile' or 'sigma', got {threshold_rule!r}"
            )
        if not 0.0 < threshold_quantile < 1.0:
            raise ValueError(f"threshold_quantile must be in (0, 1), got {threshold_quantile}")
        if threshold_sigma <= 0:
            raise ValueError(f"threshold_sigma must be > 0, got {threshold_sigma}")
        if calibration_floor < 0:
            raise ValueError(f"calibration_floor must be >= 0, got {calibration_floor}")
        if calibration_folds < 2:
            raise ValueError(f"calibration_folds must be >= 2, got {calibration_folds}")
        if not 0.0 <= fusion_strength <= 1.0:
            raise ValueError(f"fusion_strength must be in [0, 1], got {fusion_strength}")
        self.save_hyperparameters()
        parts = build_backbone(
            backbone, path=backbone_path, image_size=image_size, tiny_encoder=tiny_encoder
        )
        # The encoder is never trained (docs/method.md#encoder: the frozen VAE).
        self.encoder = parts.encoder.requires_grad_(False).eval()
        self.noise_scheduler = parts.scheduler
        self.register_buffer("prompt_embedding", parts.prompt_embedding, persistent=False)
        self.unet = ViewAlignedUNet(
            parts.unet,
            feature_levels=feature_levels,
            attention_dim=attention_dim,
            num_heads=num_heads,
            window=window,
            num_frequencies=num_frequencies,
            use_mvam=use_mvam,
            use_frm=use_frm,
            train_unet=train_unet,
            gradient_checkpointing=gradient_checkpointing,
        )
        self.feature_levels = sorted(self.unet.level_channels())
        if level_weights is not None and len(level_weights) != len(self.feature_levels):
            raise ValueError(
                f"level_weights has {len(level_weights)} entries but there are "
                f"{len(self.feature_levels)} feature levels {self.feature_levels}"
            )
        self.feature_extractor = FeatureExtractor(
            mode=feature_mode, t_star=t_star, num_steps=inversion_steps, seed=feature_seed
        )
        if latent_weight < 0:
            raise ValueError(f"latent_weight must be >= 0, got {latent_weight}")
        if bank_mode not in ("global", "positional"):
            raise ValueError(f"bank_mode must be 'global' or 'positional', got {bank_mode!r}")
        if positional_radius < 0:
            raise ValueError(f"positional_radius must be >= 0, got {positional_radius}")
        self.memory_bank = MemoryBank()
        # Normal-only statistics and thresholds (buffers: they travel in the checkpoint).
        self.calibration = Calibration()
        self.test_metrics = AnomalyMetrics()
        self.test_results: dict[str, float] | None = None
        # Non-finite-loss bookkeeping; saved in checkpoints so a resume keeps counting.
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0

    # ----------------------------------------------------------------------------- plumbing
    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int):
        if isinstance(batch, MultiViewBatch):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: keep it deterministic in every stage
        return self

    @property
    def level_weights(self) -> dict[int, float]:
        weights = self.hparams.level_weights or [1.0] * len(self.feature_levels)
        out = {level: float(w) for level, w in zip(self.feature_levels, weights, strict=True)}
        if self.hparams.latent_weight > 0:
            out[LATENT_LEVEL] = float(self.hparams.latent_weight)
        return out

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """``(B, V, 3, H, W)`` images -> ``(B, V, c, h, w)`` scaled latents ``z = s E(I)``."""
        B, V = images.shape[:2]
        latents = self.encoder(images.flatten(0, 1))
        return latents.unflatten(0, (B, V))

    def _conditioning(self, batch_size: int) -> Tensor:
        return self.prompt_embedding.expand(batch_size, -1, -1)

    # ----------------------------------------------------------------------------- training
    @property
    def noise_seed(self) -> int:
        if self.hparams.noise_seed is not None:
            return int(self.hparams.noise_seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _objective(self, batch: MultiViewBatch, generator: torch.Generator | None = None):
        latents = self.encode(batch.images)
        return diffusion_objective(
            self.unet,
            latents,
            self.noise_scheduler,
            self._conditioning(batch.batch_size),
            batch.homographies,
            batch.image_size,
            batch.neighbour_mask,
            lambda_r=self.hparams.lambda_r,
            max_timestep=self.hparams.max_train_timestep,
            generator=generator,
        )

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor | None:
        """One step of ``L = L_d + λ_r L_r``; ``None`` (no optimiser step) if the loss is not
        finite.

        Under DDP every rank must take the same decision, or the ranks that step would wait
        forever in the gradient all-reduce of the ranks that skipped: the "bad" flag is
        max-reduced over ranks first, so one rank's NaN skips the step everywhere. Returning
        ``None`` on all ranks means no rank runs backward, so no collective is left pending.
        """
        generator = step_generator(
            self.device, self.noise_seed, self.current_epoch, batch_idx, self.global_rank
        )
        out = self._objective(batch, generator)
        bad = torch.tensor(0.0 if torch.isfinite(out.loss) else 1.0, device=self.device)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if bool(bad > 0):
            return self._skip_step(out.loss)
        self.bad_steps_in_a_row = 0
        self.log_dict(
            {
                "train/loss": out.loss,
                "train/denoising_loss": out.denoising_loss,
                "train/consistency_loss": out.consistency_loss,
            },
            prog_bar=True,
            batch_size=batch.batch_size,
        )
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=batch.batch_size)
        return out.loss

    def _skip_step(self, loss: Tensor) -> None:
        self.skipped_steps += 1
        self.bad_steps_in_a_row += 1
        self.log("train/skipped_steps", float(self.skipped_steps), batch_size=1)
        where = f"epoch {self.current_epoch}, step {self.global_step}"
        limit = self.hparams.max_bad_steps
        if self.bad_steps_in_a_row >= limit:
            raise NonFiniteLossError(
                f"training stopped: the loss was not finite ({float(loss.detach())}) for {limit} "
                f"consecutive steps (up to {where}); lower model.lr, check the training images, "
                "or resume from an earlier checkpoint"
            )
        rank_zero_warn(
            f"non-finite loss ({float(loss.detach())}) at {where}: step skipped "
            f"({self.bad_steps_in_a_row}/{limit} in a row, {self.skipped_steps} in total)"
        )
        return None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vsad_bad_steps"] = {
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_a_row": self.bad_steps_in_a_row,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("vsad_bad_steps", {})
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_steps_in_a_row = int(state.get("bad_steps_in_a_row", 0))

    def validation_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor:
        # The same noise for a batch at every validation: the curve shows the model, not noise.
        generator = step_generator(self.device, self.noise_seed, -1, batch_idx, self.global_rank)
        out = self._objective(batch, generator)
        self.log_dict(
            {
                "val/loss": out.loss,
                "val/denoising_loss": out.denoising_loss,
                "val/consistency_loss": out.consistency_loss,
            },
            batch_size=batch.batch_size,
            sync_dist=True,
        )
        return out.loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(
            self.unet.trainable_parameters(),
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
        )
        warmup = self.hparams.warmup_steps
        if warmup == 0 and self.hparams.lr_schedule == "constant":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), warmup + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if self.hparams.lr_schedule == "cosine":
                progress = (step - warmup) / max(1, total - warmup)
                return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    # ----------------------------------------------------------------------------- features
    @torch.no_grad()
    def extract_features(self, batch: MultiViewBatch) -> dict[int, Tensor]:
        """Per-level features ``(B, V, C_l, h_l, w_l)`` after FRM (docs/method.md#inversion),
        plus the latent itself under ``LATENT_LEVEL`` when ``latent_weight > 0``."""
        latents = self.encode(batch.images)
        features = self.feature_extractor(
            self.unet,
            latents,
            self._conditioning(batch.batch_size),
            batch.homographies,
            batch.image_size,
            batch.neighbour_mask,
            self.noise_scheduler.alphas_cumprod,
        )
        if self.hparams.latent_weight > 0:
            features[LATENT_LEVEL] = latents
        return normalise_features(features, self.hparams.feature_norm)

    @torch.no_grad()
    def score(self, batch: MultiViewBatch) -> AnomalyPrediction:
        if not self.memory_bank.is_built():
            raise RuntimeError(
                "the memory bank is empty: fit the model (MemoryBankCallback builds the bank at "
                "fit end) or load a checkpoint written after fit"
            )
        missing = sorted(set(self.level_weights) - set(self.memory_bank.levels))
        if missing:
            # A checkpoint's bank holds the levels of the config it was fitted with.
            hint = (
                f" (level {LATENT_LEVEL} is the encoder latent that model.latent_weight > 0 "
                f"scores: fit with latent_weight > 0, or test with model.latent_weight 0)"
                if LATENT_LEVEL in missing
                else " (model.feature_levels must match the fitted model's)"
            )
            raise ValueError(
                f"the memory bank has levels {self.memory_bank.levels} but this model scores "
                f"levels {sorted(self.level_weights)}: missing {missing}{hint}"
            )
        mode = self.hparams.calibration
        fusion = float(self.hparams.fusion_strength)
        if fusion > 0 and not self.calibration.is_fitted():
            raise ValueError(
                f"model.fusion_strength is {fusion} but this model holds no calibration: refit, "
                "or test with model.fusion_strength 0"
            )
        if mode != "none" and not self.calibration.is_fitted():
            raise ValueError(
                f"model.calibration is {mode!r} but this model holds no calibration (a "
                "checkpoint written before calibration existed): refit, or test with "
                "model.calibration none"
            )
        return self.score_extracted(batch, self.extract_features(batch))

    @torch.no_grad()
    def score_extracted(
        self, batch: MultiViewBatch, features: dict[int, Tensor]
    ) -> AnomalyPrediction:
        """``score`` from features ``extract_features(batch)`` already computed: the U-Net passes
        are the expensive part, so benchmarks that compare scoring options on one fitted model
        extract once and score many times (``benchmarks/accuracy.py``).

        With registered views (``data.register_views``) the bank, calibration and fusion all
        work in the registered frames, and the view scores are maxima there (for the normals
        and the test samples alike); only the returned pixel maps are carried back to each
        view's original frame (``geometry.registration.maps_to_original``), where the masks
        are (docs/method.md#registration)."""
        return to_original_frames(self._score_registered(batch, features), batch.registration)

    def _score_registered(
        self, batch: MultiViewBatch, features: dict[int, Tensor]
    ) -> AnomalyPrediction:
        """``score_extracted`` in the frames of ``batch.images``."""
        mode = self.hparams.calibration
        fusion = float(self.hparams.fusion_strength)
        out = score_features(
            self.memory_bank,
            features,
            batch.image_size,
            weights=self.level_weights,
            sigma=self.hparams.sigma,
            backend=self.hparams.knn_backend,
            positional_radius=self._positional_radius,
        )
        if not self.calibration.is_fitted():
            return AnomalyPrediction(out.anomaly_maps, out.view_scores, out.sample_scores)
        rule, value = self._threshold_setting
        if not self.calibration.fusion_matches(fusion):
            # The fusion strength was changed at test time: re-derive from the stored normals.
            self.calibration.set_view_statistics(fusion)
            self.calibration.set_thresholds(rule, value)
        if not self.calibration.thresholds_match(rule, value):
            # The rule was changed at test time: re-derive from the stored normal scores.
            self.calibration.set_thresholds(rule, value)
        calibrated = self.calibration.apply(
            out.anomaly_maps,
            mode,
            homographies=batch.homographies,
            neighbour_mask=batch.neighbour_mask,
            fusion_strength=fusion,
        )
        return AnomalyPrediction(
            anomaly_maps=out.anomaly_maps,
            view_scores=calibrated.view_scores,
            sample_scores=calibrated.sample_scores,
            normalised_maps=calibrated.maps,
            pred_view_labels=calibrated.view_labels,
            pred_sample_labels=calibrated.sample_labels,
            pred_masks=calibrated.masks,
        )

    @property
    def _positional_radius(self) -> int | None:
        if self.hparams.bank_mode == "positional":
            return int(self.hparams.positional_radius)
        return None

    @property
    def _threshold_setting(self) -> tuple[ThresholdRule, float]:
        rule = self.hparams.threshold_rule
        value = (
            self.hparams.threshold_quantile if rule == "quantile" else self.hparams.threshold_sigma
        )
        return rule, float(value)

    # ---------------------------------------------------------------------------- calibration
    @torch.no_grad()
    def leave_one_out_maps(
        self,
        samples: Tensor,
        features_of,
        image_size: tuple[int, int],
        row_samples: dict[int, Tensor] | None = None,
    ) -> Tensor:
        """``(m, V, H, W)`` raw maps of training samples scored without their own bank rows.

        ``calibration.leave_one_out_maps`` with this model's scoring settings (level weights,
        ``sigma``, bank mode, kNN backend, ``calibration_folds``); ``MemoryBankCallback``
        calls it with the features the bank was built from.
        """
        return leave_one_out_maps(
            self.memory_bank,
            samples,
            features_of,
            image_size,
            self.level_weights,
            self.hparams.sigma,
            positional_radius=self._positional_radius,
            folds=self.hparams.calibration_folds,
            row_samples=row_samples,
            backend=self.hparams.knn_backend,
        )

    @torch.no_grad()
    def fit_calibration(
        self,
        loo_maps: Tensor,
        homographies: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
    ) -> None:
        """Fill ``self.calibration`` from the LOO maps of every training normal, with their
        homographies ``(n, V, V, 3, 3)`` and the neighbour mask where fusion may use them."""
        rule, value = self._threshold_setting
        self.calibration.fit(
            loo_maps,
            homographies=homographies,
            neighbour_mask=neighbour_mask,
            floor=self.hparams.calibration_floor,
            rule=rule,
            value=value,
            fusion_strength=float(self.hparams.fusion_strength),
        )

    # ----------------------------------------------------------------------------- evaluation
    def on_test_epoch_start(self) -> None:
        self.test_metrics.reset()
        self.test_results = None

    def test_step(self, batch: MultiViewBatch, batch_idx: int) -> AnomalyPrediction:
        prediction = self.score(batch)
        update_metrics(self.test_metrics, batch, prediction)
        return prediction

    def on_test_epoch_end(self) -> None:
        results = self.test_metrics.compute()
        self.test_results = {k: float(v) for k, v in results.items()}
        loggable = {f"test/{k}": v for k, v in self.test_results.items() if math.isfinite(v)}
        # Already reduced across ranks by the metric, so no sync_dist here.
        self.log_dict(loggable, rank_zero_only=True)

    def predict_step(self, batch: MultiViewBatch, batch_idx: int) -> AnomalyPrediction:
        return self.score(batch)
