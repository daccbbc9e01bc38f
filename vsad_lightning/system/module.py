"""``VSADModule``: the LightningModule (the *system*) that trains a ``VSADModel``.

The model (``vsad_lightning.models.model.VSADModel``, ``self.model``) holds everything scoring
needs: the frozen image encoder, the ``ViewAlignedUNet`` (diffusers U-Net + MVAM + FRM), the
``FeatureExtractor``, the ``MemoryBank``, the camera rig and the calibration; ``forward`` and
``score`` delegate to it. This class owns the training objective, the optimisers, the NaN
handling and the metric updates; every side effect (building the bank, writing files and
pictures) lives in ``vsad_lightning.callbacks``, and the memory bank callback comes with the
system itself (``configure_callbacks``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from vsad_lightning.bank.storage import MemoryBank
from vsad_lightning.callbacks.memory_bank import MemoryBankCallback
from vsad_lightning.data.batch import MultiViewBatch
from vsad_lightning.errors import DataError
from vsad_lightning.metrics import AnomalyMetrics
from vsad_lightning.models.calibration import Calibration, CalibrationMode, ThresholdRule
from vsad_lightning.models.features import FeatureExtractor, FeatureNorm
from vsad_lightning.models.model import (
    ARCHITECTURE_FIELDS,
    SCORING_FIELDS,
    AnomalyPrediction,
    VSADModel,
    to_original_frames,
)
from vsad_lightning.models.objective import diffusion_objective
from vsad_lightning.models.unet import ViewAlignedUNet

__all__ = [
    "AnomalyPrediction",
    "NonFiniteLossError",
    "VSADModule",
    "step_generator",
    "to_original_frames",
    "update_metrics",
]


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


class VSADModule(L.LightningModule):
    """VSAD: view-aligned latent diffusion features scored against a memory bank of normals.

    Args:
        backbone: ``tiny`` (random init, trained from scratch, CPU-friendly) or ``sd2`` (a local
            Stable Diffusion 2 base folder given by ``backbone_path``).
        backbone_path: the local SD2 folder (``unet/``, ``vae/``, ``scheduler/``, ...).
        image_size: the model's input size: the views, the latent level (``latent_weight``)
            and the anomaly maps are at this size.
        unet_image_size: the size the U-Net sees the views at (resized by area; the tiny
            U-Net's ``sample_size`` derives from it); ``None``: ``image_size``. Smaller than
            ``image_size``, the U-Net's passes (training, inversion, MVAM) cost what they cost at
            this size while the latent level keeps the fine detail of the full size: on the
            realistic rig, 128 px raised the latent's sample AUROC where the U-Net's cost at
            128 px does not fit the CPU demo (README, accuracy).
        tiny_encoder: the tiny backbone's image encoder (see ``build_backbone``).
        feature_levels: decoder up-block indices whose outputs (after FRM) are the features;
            negative indices count from the last block (default: the last two, the paper's
            levels 3 and 4).
        attention_dim: MVAM's attention width (docs/method.md#mvam).
        num_heads: MVAM's attention heads.
        window: MVAM's candidate window R: each position attends to an R x R neighbourhood
            around its homography-projected position in each neighbouring view.
        num_frequencies: frequency count L of MVAM's positional encoding of the offsets.
        use_mvam: ablation switch; false means MVAM is not installed.
        use_frm: ablation switch; false means FRM is not installed.
        train_unet: ``none | decoder | all`` (docs/method.md#training). A ``tiny`` backbone has
            random weights, so it needs ``all``.
        gradient_checkpointing: recompute U-Net activations in backward to save memory.
        lambda_r: weight of the consistency loss L_r in ``L = L_d + lambda_r * L_r``; not used
            when ``use_frm`` is false (L_r is FRM's loss, so the FRM ablation drops both).
        max_train_timestep: draw training timesteps from ``[0, max_train_timestep)`` rather
            than the whole schedule (``None``, the paper's choice); see ``diffusion_objective``.
        lr: AdamW's learning rate.
        weight_decay: AdamW's weight decay.
        warmup_steps: linear warm-up steps of the learning rate (0: none).
        lr_schedule: ``constant`` or ``cosine`` decay to 0 over the estimated training steps.
        feature_mode: ``inversion`` (DDIM inversion to ``t_star`` in ``inversion_steps`` steps)
            or ``noise`` (deterministic forward noising with ``feature_seed``).
        t_star: the timestep the features are read at (``feature_mode``).
        inversion_steps: DDIM inversion steps from 0 to ``t_star`` (``inversion`` mode).
        feature_seed: the noise seed of ``noise`` mode.
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
        threshold_quantile: the quantile of the ``quantile`` rule, in (0, 1).
        threshold_sigma: the number of robust standard deviations of the ``sigma`` rule.
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
        unet_image_size: int | None = None,
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
        self.save_hyperparameters()
        # The deployable model: everything scoring needs (VSADModel); this system adds the
        # objective, the optimisers, the NaN handling and the metrics.
        self.model = VSADModel(
            **{key: self.hparams[key] for key in (*ARCHITECTURE_FIELDS, *SCORING_FIELDS)}
        )
        self.test_metrics = AnomalyMetrics()
        self.test_results: dict[str, float] | None = None
        # Non-finite-loss bookkeeping; saved in checkpoints so a resume keeps counting.
        self.skipped_steps = 0
        self.bad_steps_in_a_row = 0
        self._drop_next_update = False  # DDP: a skipped step's zero gradients are not applied
        # How the memory bank was built (MemoryBankCallback), saved in checkpoints for audits.
        self.bank_build_info: dict = {}
        # Checkpoints written before the model was its own module keep loading.
        self._register_load_state_dict_pre_hook(_prefix_legacy_keys, with_module=True)

    # ----------------------------------------------------------------------------- plumbing
    def configure_callbacks(self):
        """The memory bank callback, unless the Trainer already has one (the CLI adds its own,
        configured by ``bank``): a plain ``Trainer.fit(VSADModule(), datamodule)`` then ends
        with a model that scores (bank, calibration and ``final.ckpt``)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and any(
            isinstance(c, MemoryBankCallback) for c in trainer.callbacks
        ):
            return []
        return [MemoryBankCallback()]

    def on_fit_start(self) -> None:
        # The rig travels in every checkpoint of the run (last.ckpt included).
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and getattr(datamodule, "homographies", None) is not None:
            size = int(self.hparams.image_size)
            self.model.rig.set_from_datamodule(datamodule, (size, size))

    # The parts of the model, under their former names (tests, benchmarks, callbacks).
    @property
    def encoder(self) -> nn.Module:
        return self.model.encoder

    @property
    def unet(self) -> ViewAlignedUNet:
        return self.model.unet

    @property
    def feature_extractor(self) -> FeatureExtractor:
        return self.model.feature_extractor

    @property
    def memory_bank(self) -> MemoryBank:
        return self.model.memory_bank

    @property
    def calibration(self) -> Calibration:
        return self.model.calibration

    @property
    def noise_scheduler(self):
        return self.model.noise_scheduler

    @property
    def feature_levels(self) -> list[int]:
        return self.model.feature_levels

    @property
    def level_weights(self) -> dict[int, float]:
        self._sync_model()
        return self.model.level_weights

    def _sync_model(self) -> VSADModel:
        """The model with the scoring settings of ``hparams`` (which tests and
        ``vsad-test --model.calibration ...`` may change after fitting)."""
        settings = {key: self.hparams[key] for key in SCORING_FIELDS}
        if settings != asdict(self.model.config):
            self.model.configure(**settings)
        return self.model

    def encode(self, images: Tensor) -> Tensor:
        """``(B, V, 3, H, W)`` images -> ``(B, V, c, h, w)`` scaled latents ``z = s E(I)``."""
        return self.model.encode(images)

    def _conditioning(self, batch_size: int) -> Tensor:
        return self.model.conditioning(batch_size)

    # ----------------------------------------------------------------------------- training
    @property
    def noise_seed(self) -> int:
        if self.hparams.noise_seed is not None:
            return int(self.hparams.noise_seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _objective(self, batch: MultiViewBatch, generator: torch.Generator | None = None):
        latents = self.model.unet_latents(batch.images)
        return diffusion_objective(
            self.unet,
            latents,
            self.noise_scheduler,
            self._conditioning(batch.batch_size),
            batch.homographies,
            batch.image_size,
            batch.neighbour_mask,
            # L_r is FRM's loss: without FRM the ablation trains on L_d alone.
            lambda_r=self.hparams.lambda_r if self.hparams.use_frm else 0.0,
            max_timestep=self.hparams.max_train_timestep,
            generator=generator,
        )

    def training_step(self, batch: MultiViewBatch, batch_idx: int) -> Tensor | None:
        """One step of ``L = L_d + λ_r L_r``; ``None`` (no optimiser step) if the loss is not
        finite.

        Under DDP every rank must take the same decision, or the ranks that step would wait
        forever in the gradient all-reduce of the ranks that skipped: the "bad" flag is
        max-reduced over ranks first, so one rank's NaN skips the step everywhere. Lightning
        refuses a ``None`` step under DDP, so there every rank returns a zero loss instead (the
        same gradient all-reduce on every rank) and ``optimizer_step`` drops the update
        (``tests/test_ddp_nan.py``).
        """
        generator = step_generator(
            self.device, self.noise_seed, self.current_epoch, batch_idx, self.global_rank
        )
        out = self._objective(batch, generator)
        bad = torch.tensor(0.0 if torch.isfinite(out.loss) else 1.0, device=self.device)
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="max")
        if bool(bad > 0):
            self._skip_step(out.loss)
            if self.trainer.world_size == 1:
                return None
            # Lightning refuses a ``None`` step under DDP. A zero loss over every trained weight
            # gives zero gradients through the same all-reduce on every rank, and
            # ``optimizer_step`` then drops the update: the step is skipped everywhere.
            self._drop_next_update = True
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
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

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, except under DDP after a step that every rank skipped
        (``training_step``): the closure (forward, backward, all-reduce) runs, the update not."""
        if self.trainer.world_size == 1 or optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()
        if self._drop_next_update:
            self._drop_next_update = False
            return None
        return optimizer.step(closure=lambda: loss)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["vsad_bad_steps"] = {
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_a_row": self.bad_steps_in_a_row,
        }
        if self.bank_build_info:
            checkpoint["memory_bank_build"] = dict(self.bank_build_info)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("vsad_bad_steps", {})
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_steps_in_a_row = int(state.get("bad_steps_in_a_row", 0))
        self.bank_build_info = dict(checkpoint.get("memory_bank_build", {}))

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

    # ------------------------------------------------------------------- features, scoring
    def forward(self, images: Tensor, **kwargs) -> AnomalyPrediction:
        """``VSADModel.forward``: score ``(B, V, 3, H, W)`` images with the model's rig."""
        return self._sync_model()(images, **kwargs)

    @torch.no_grad()
    def extract_features(self, batch: MultiViewBatch) -> dict[int, Tensor]:
        """``VSADModel.extract_features`` of a batch (its homographies and neighbour mask)."""
        return self._sync_model().extract_features(
            batch.images, batch.homographies, batch.neighbour_mask
        )

    @torch.no_grad()
    def score(self, batch: MultiViewBatch) -> AnomalyPrediction:
        """``VSADModel.forward`` on a batch, with the batch's geometry."""
        return self._sync_model()(
            batch.images, batch.homographies, batch.neighbour_mask, batch.registration
        )

    @torch.no_grad()
    def score_extracted(
        self, batch: MultiViewBatch, features: dict[int, Tensor]
    ) -> AnomalyPrediction:
        """``VSADModel.score_extracted`` with the batch's geometry."""
        geometry = (batch.image_size, batch.homographies, batch.neighbour_mask, batch.registration)
        return self._sync_model().score_extracted(features, *geometry)

    @torch.no_grad()
    def leave_one_out_maps(
        self,
        samples: Tensor,
        features_of,
        image_size: tuple[int, int],
        row_samples: dict[int, Tensor] | None = None,
    ) -> Tensor:
        """``VSADModel.leave_one_out_maps`` with this system's settings."""
        return self._sync_model().leave_one_out_maps(samples, features_of, image_size, row_samples)

    @torch.no_grad()
    def fit_calibration(
        self,
        loo_maps: Tensor,
        homographies: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
    ) -> None:
        """``VSADModel.fit_calibration`` with this system's settings."""
        self._sync_model().fit_calibration(loo_maps, homographies, neighbour_mask)

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


_LEGACY_PREFIXES = ("encoder.", "unet.", "memory_bank.", "calibration.")


def _prefix_legacy_keys(module, state_dict, prefix, *args) -> None:
    """State-dict keys of checkpoints written before ``VSADModule.model`` existed
    (``unet.*`` instead of ``model.unet.*``) are renamed in place before loading."""
    for key in list(state_dict):
        rest = key[len(prefix) :]
        if key.startswith(prefix) and rest.startswith(_LEGACY_PREFIXES):
            state_dict[prefix + "model." + rest] = state_dict.pop(key)
