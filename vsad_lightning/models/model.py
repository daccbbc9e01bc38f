"""``VSADModel``: the deployable torch model, apart from the Lightning system.

It holds everything scoring needs: the frozen encoder, the ``ViewAlignedUNet`` (U-Net + MVAM
+ FRM), the ``FeatureExtractor``, the ``MemoryBank``, the camera ``Rig`` and the
``Calibration``. ``forward(images)`` returns an ``AnomalyPrediction`` (maps, view and sample
scores, and OK/NG decisions where the model is calibrated), with no Trainer, no datamodule and
no training data. ``fit_memory_bank(loader)`` builds the bank and the calibration from the
training normals (``MemoryBankCallback`` drives it, DDP sharding included).

``VSADModule`` (``vsad_lightning.system``) wraps it for training: objective, optimisers, NaN
handling and metrics. The scoring settings (``ScoringConfig``) may change after fitting
(``vsad-test --model.calibration view``); the architecture may not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from vsad_lightning.bank.builder import StreamingBankBuilder
from vsad_lightning.bank.coreset import greedy_coreset
from vsad_lightning.bank.storage import MemoryBank, flatten_features, unflatten_features
from vsad_lightning.geometry.registration import is_identity, maps_to_original
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
from vsad_lightning.models.rig import Rig
from vsad_lightning.models.scoring import score_features
from vsad_lightning.models.unet import ViewAlignedUNet

Gather = Callable[[Tensor], Tensor]
"""``all_gather``: a ``(...)`` tensor of this rank -> ``(world, ...)`` (``LightningModule``'s)."""


@dataclass
class AnomalyPrediction:
    """What the model returns for one batch (and ``test_step`` / ``predict_step``).

    Attributes:
        anomaly_maps: ``(B, V, 1, H, W)`` raw distances (not probabilities), whatever the
            calibration mode.
        normalised_maps: ``(B, V, 1, H, W)`` the maps of the calibration mode
            (``ScoringConfig.calibration``; the raw maps for ``none``): the view scores are
            their maxima and the pixel metrics are computed on them.
        view_scores: ``(B, V)``, the max of each view's normalised map.
        sample_scores: ``(B,)``, the max over the sample's views.
        pred_view_labels: ``(B, V)`` int64, 1 = NG at the calibrated view threshold; ``None``
            when the model holds no calibration.
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


@dataclass
class ScoringConfig:
    """How features are extracted and scored; may change after fitting without refitting
    (the calibration statistics are re-derived where needed). The meaning of each field is in
    ``VSADModule``'s docstring (same names as its arguments)."""

    feature_mode: Literal["inversion", "noise"] = "inversion"
    t_star: int = 200
    inversion_steps: int = 5
    feature_seed: int = 0
    level_weights: list[float] | None = None
    latent_weight: float = 0.0
    sigma: float = 4.0
    knn_backend: Literal["auto", "torch", "faiss", "projected"] = "auto"
    feature_norm: FeatureNorm = "none"
    bank_mode: Literal["global", "positional"] = "global"
    positional_radius: int = 2
    calibration: CalibrationMode = "none"
    threshold_rule: ThresholdRule = "quantile"
    threshold_quantile: float = 0.95
    threshold_sigma: float = 3.0
    calibration_floor: float = 1.0
    calibration_folds: int = 5
    fusion_strength: float = 0.0

    def validate(self) -> None:
        if self.calibration not in CALIBRATION_MODES:
            raise ValueError(
                f"calibration must be one of {CALIBRATION_MODES}, got {self.calibration!r}"
            )
        if self.threshold_rule not in ("quantile", "sigma"):
            raise ValueError(
                f"threshold_rule must be 'quantile' or 'sigma', got {self.threshold_rule!r}"
            )
        if not 0.0 < self.threshold_quantile < 1.0:
            raise ValueError(f"threshold_quantile must be in (0, 1), got {self.threshold_quantile}")
        if self.threshold_sigma <= 0:
            raise ValueError(f"threshold_sigma must be > 0, got {self.threshold_sigma}")
        if self.calibration_floor < 0:
            raise ValueError(f"calibration_floor must be >= 0, got {self.calibration_floor}")
        if self.calibration_folds < 2:
            raise ValueError(f"calibration_folds must be >= 2, got {self.calibration_folds}")
        if not 0.0 <= self.fusion_strength <= 1.0:
            raise ValueError(f"fusion_strength must be in [0, 1], got {self.fusion_strength}")
        if self.latent_weight < 0:
            raise ValueError(f"latent_weight must be >= 0, got {self.latent_weight}")
        if self.bank_mode not in ("global", "positional"):
            raise ValueError(f"bank_mode must be 'global' or 'positional', got {self.bank_mode!r}")
        if self.positional_radius < 0:
            raise ValueError(f"positional_radius must be >= 0, got {self.positional_radius}")

    @property
    def threshold_setting(self) -> tuple[ThresholdRule, float]:
        rule = self.threshold_rule
        value = self.threshold_quantile if rule == "quantile" else self.threshold_sigma
        return rule, float(value)

    @property
    def radius(self) -> int | None:
        """The positional search radius, ``None`` for the global bank."""
        return int(self.positional_radius) if self.bank_mode == "positional" else None


SCORING_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ScoringConfig))

ARCHITECTURE_FIELDS: tuple[str, ...] = (
    "backbone",
    "backbone_path",
    "image_size",
    "unet_image_size",
    "tiny_encoder",
    "feature_levels",
    "attention_dim",
    "num_heads",
    "window",
    "num_frequencies",
    "use_mvam",
    "use_frm",
    "train_unet",
    "gradient_checkpointing",
)
"""The ``VSADModel`` arguments that fix its parameters (the rest is ``ScoringConfig``)."""


class VSADModel(nn.Module):
    """VSAD as a plain ``nn.Module``: features of a view-aligned latent diffusion U-Net,
    scored against a memory bank of normal features.

    Args: the architecture (``ARCHITECTURE_FIELDS``) and the scoring settings
    (``ScoringConfig``); see ``VSADModule``'s docstring for each.
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
        **scoring: Any,
    ) -> None:
        super().__init__()
        unknown = sorted(set(scoring) - set(SCORING_FIELDS))
        if unknown:
            raise TypeError(f"VSADModel got unknown arguments {unknown}")
        unet_size = int(image_size if unet_image_size is None else unet_image_size)
        if not 0 < unet_size <= int(image_size):
            raise ValueError(
                f"unet_image_size {unet_image_size} must be in (0, image_size = {image_size}]: "
                "the U-Net sees the views at most at the model's input size"
            )
        self.architecture = {
            "backbone": backbone,
            "backbone_path": backbone_path,
            "image_size": int(image_size),
            "unet_image_size": unet_image_size if unet_image_size is None else unet_size,
            "tiny_encoder": tiny_encoder,
            "feature_levels": [int(x) for x in feature_levels],
            "attention_dim": attention_dim,
            "num_heads": num_heads,
            "window": window,
            "num_frequencies": num_frequencies,
            "use_mvam": use_mvam,
            "use_frm": use_frm,
            "train_unet": train_unet,
            "gradient_checkpointing": gradient_checkpointing,
        }
        self.unet_image_size = unet_size
        try:
            parts = build_backbone(
                backbone, path=backbone_path, image_size=unet_size, tiny_encoder=tiny_encoder
            )
        except ValueError as e:
            if unet_size == int(image_size):
                raise
            raise ValueError(f"unet_image_size {unet_size}: {e}") from e
        f = parts.downsample_factor
        if unet_size != int(image_size) and int(image_size) % f:
            raise ValueError(
                f"image_size {image_size} must be a multiple of the encoder's downsampling "
                f"{f}: the latent level is encoded at image_size (unet_image_size {unet_size})"
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
        self.memory_bank = MemoryBank()
        # Normal-only statistics and thresholds (buffers: they travel in the checkpoint).
        self.calibration = Calibration()
        self.rig = Rig()
        self.config = ScoringConfig()
        self.configure(**scoring)

    # ----------------------------------------------------------------------------- settings
    def configure(self, **settings: Any) -> None:
        """Change scoring settings (``ScoringConfig`` fields), validated."""
        config = replace(self.config, **settings)
        if config.level_weights is not None:
            config.level_weights = [float(w) for w in config.level_weights]
            if len(config.level_weights) != len(self.feature_levels):
                raise ValueError(
                    f"level_weights has {len(config.level_weights)} entries but there are "
                    f"{len(self.feature_levels)} feature levels {self.feature_levels}"
                )
        config.validate()
        current = self.config
        self.config = config
        extractor = (
            config.feature_mode,
            config.t_star,
            config.inversion_steps,
            config.feature_seed,
        )
        before = (
            current.feature_mode,
            current.t_star,
            current.inversion_steps,
            current.feature_seed,
        )
        if not hasattr(self, "feature_extractor") or extractor != before:
            self.feature_extractor = FeatureExtractor(
                mode=config.feature_mode,
                t_star=config.t_star,
                num_steps=config.inversion_steps,
                seed=config.feature_seed,
            )

    def hyperparameters(self) -> dict[str, Any]:
        """Every constructor argument: ``VSADModel(**model.hyperparameters())`` rebuilds it."""
        return {**self.architecture, **asdict(self.config)}

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: keep it deterministic in every stage
        return self

    @property
    def level_weights(self) -> dict[int, float]:
        weights = self.config.level_weights or [1.0] * len(self.feature_levels)
        out = {level: float(w) for level, w in zip(self.feature_levels, weights, strict=True)}
        if self.config.latent_weight > 0:
            out[LATENT_LEVEL] = float(self.config.latent_weight)
        return out

    # ----------------------------------------------------------------------------- features
    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """``(B, V, 3, H, W)`` images -> ``(B, V, c, h, w)`` scaled latents ``z = s E(I)``."""
        B, V = images.shape[:2]
        latents = self.encoder(images.flatten(0, 1))
        return latents.unflatten(0, (B, V))

    @torch.no_grad()
    def unet_latents(self, images: Tensor, latents: Tensor | None = None) -> Tensor:
        """The latents the U-Net works on: ``encode`` of the views resized (area) to
        ``unet_image_size``, or ``latents`` (``encode(images)``, when already computed) when
        that is the images' own size. Homographies keep referring to the full-size images."""
        small, full = self.unet_image_size, self.architecture["image_size"]
        if small == full:
            return self.encode(images) if latents is None else latents
        B, V, _, H, W = images.shape
        size = (H * small // full, W * small // full)
        resized = nn.functional.interpolate(images.flatten(0, 1), size=size, mode="area")
        return self.encode(resized.unflatten(0, (B, V)))

    def conditioning(self, batch_size: int) -> Tensor:
        """The (empty prompt) text conditioning of ``batch_size`` samples."""
        return self.prompt_embedding.expand(batch_size, -1, -1)

    @torch.no_grad()
    def extract_features(
        self, images: Tensor, homographies: Tensor, neighbour_mask: Tensor
    ) -> dict[int, Tensor]:
        """Per-level features ``(B, V, C_l, h_l, w_l)`` after FRM (docs/method.md#inversion),
        plus the latent itself under ``LATENT_LEVEL`` when ``latent_weight > 0``."""
        latents = self.encode(images)
        features = self.feature_extractor(
            self.unet,
            self.unet_latents(images, latents),
            self.conditioning(images.shape[0]),
            homographies,
            (images.shape[-1], images.shape[-2]),
            neighbour_mask,
            self.noise_scheduler.alphas_cumprod,
            self.noise_scheduler.config.prediction_type,  # what the U-Net predicts
        )
        if self.config.latent_weight > 0:
            features[LATENT_LEVEL] = latents
        return normalise_features(features, self.config.feature_norm)

    # ------------------------------------------------------------------------------ scoring
    def _geometry(
        self, images: Tensor, homographies: Tensor | None, neighbour_mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        B, V = images.shape[:2]
        if homographies is None or neighbour_mask is None:
            self.rig.require()
            if len(self.rig.view_names) != V:
                raise ValueError(
                    f"images have {V} views, but the model's rig has {self.rig.view_names}"
                )
        if homographies is None:
            homographies = self.rig.homographies.expand(B, -1, -1, -1, -1)
        if neighbour_mask is None:
            neighbour_mask = self.rig.neighbour_mask
        return homographies.to(images.device), neighbour_mask.to(images.device)

    def check_ready(self) -> None:
        """Fail with one clear line when the model cannot score in its current settings."""
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
        mode, fusion = self.config.calibration, float(self.config.fusion_strength)
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

    @torch.no_grad()
    def forward(
        self,
        images: Tensor,
        homographies: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
        registration: Tensor | None = None,
    ) -> AnomalyPrediction:
        """Score ``(B, V, 3, H, W)`` images in [-1, 1] (the datamodule's transform).

        Args:
            images: the views in the rig's order (``rig.view_names``), at the model's size.
            homographies: ``(B, V, V, 3, 3)`` at the images' size; ``None``: the rig's
                category homographies for every sample (``VSADInferencer`` passes each
                sample's own where the model uses per-sample homographies).
            neighbour_mask: ``(V, V)`` bool; ``None``: the rig's.
            registration: ``(B, V, 3, 3)`` registration of the views (``data.register_views``);
                ``None``: none.
        """
        self.check_ready()
        homographies, neighbour_mask = self._geometry(images, homographies, neighbour_mask)
        features = self.extract_features(images, homographies, neighbour_mask)
        size = (images.shape[-1], images.shape[-2])
        return self.score_extracted(features, size, homographies, neighbour_mask, registration)

    @torch.no_grad()
    def score_extracted(
        self,
        features: dict[int, Tensor],
        image_size: tuple[int, int],
        homographies: Tensor,
        neighbour_mask: Tensor,
        registration: Tensor | None = None,
    ) -> AnomalyPrediction:
        """The scores of features ``extract_features`` already computed: the U-Net passes are
        the expensive part, so benchmarks that compare scoring options on one fitted model
        extract once and score many times (``benchmarks/accuracy.py``).

        With registered views (``data.register_views``) the bank, calibration and fusion all
        work in the registered frames, and the view scores are maxima there (for the normals
        and the test samples alike); only the returned pixel maps are carried back to each
        view's original frame (``geometry.registration.maps_to_original``), where the masks
        are (docs/method.md#registration)."""
        prediction = self._score_registered(features, image_size, homographies, neighbour_mask)
        if registration is None:
            return prediction
        return to_original_frames(prediction, registration)

    def _score_registered(
        self,
        features: dict[int, Tensor],
        image_size: tuple[int, int],
        homographies: Tensor,
        neighbour_mask: Tensor,
    ) -> AnomalyPrediction:
        config = self.config
        fusion = float(config.fusion_strength)
        out = score_features(
            self.memory_bank,
            features,
            image_size,
            weights=self.level_weights,
            sigma=config.sigma,
            backend=config.knn_backend,
            positional_radius=config.radius,
        )
        if not self.calibration.is_fitted():
            return AnomalyPrediction(out.anomaly_maps, out.view_scores, out.sample_scores)
        rule, value = config.threshold_setting
        if not self.calibration.fusion_matches(fusion):
            # The fusion strength was changed at test time: re-derive from the stored normals.
            self.calibration.set_view_statistics(fusion)
            self.calibration.set_thresholds(rule, value)
        if not self.calibration.thresholds_match(rule, value):
            # The rule was changed at test time: re-derive from the stored normal scores.
            self.calibration.set_thresholds(rule, value)
        calibrated = self.calibration.apply(
            out.anomaly_maps,
            config.calibration,
            homographies=homographies,
            neighbour_mask=neighbour_mask,
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

    # -------------------------------------------------------------------------- calibration
    @torch.no_grad()
    def leave_one_out_maps(
        self,
        samples: Tensor,
        features_of,
        image_size: tuple[int, int],
        row_samples: dict[int, Tensor] | None = None,
    ) -> Tensor:
        """``(m, V, H, W)`` raw maps of training samples scored without their own bank rows
        (``calibration.leave_one_out_maps`` with this model's scoring settings)."""
        config = self.config
        return leave_one_out_maps(
            self.memory_bank,
            samples,
            features_of,
            image_size,
            self.level_weights,
            config.sigma,
            positional_radius=config.radius,
            folds=config.calibration_folds,
            row_samples=row_samples,
            backend=config.knn_backend,
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
        rule, value = self.config.threshold_setting
        self.calibration.fit(
            loo_maps,
            homographies=homographies,
            neighbour_mask=neighbour_mask,
            floor=self.config.calibration_floor,
            rule=rule,
            value=value,
            fusion_strength=float(self.config.fusion_strength),
        )

    def level_name(self, level: int) -> str:
        """A bank level as the config names it: ``latent``, or the ``feature_levels`` entry and
        its decoder up block (the bank keys decoder levels by absolute up-block index, so
        ``feature_levels: [-2, -1]`` of 4 blocks are blocks 2 and 3, and the latent by
        ``LATENT_LEVEL``)."""
        if level == LATENT_LEVEL:
            return "level latent (model.latent_weight)"
        blocks = len(self.unet.unet.up_blocks)
        for entry in self.architecture["feature_levels"]:
            if int(entry) % blocks == level:
                return f"level {int(entry)} (decoder up block {level})"
        return f"level {level} (decoder up block {level})"

    # -------------------------------------------------------------------------- memory bank
    @torch.no_grad()
    def fit_memory_bank(
        self,
        loader: Iterable,
        *,
        gather: Gather | None = None,
        rank: int = 0,
        world_size: int = 1,
        broadcast: Callable[[Any], Any] | None = None,
        coreset_ratio: float = 1.0,
        projection_dim: int = 128,
        seed: int = 0,
        streaming: bool = False,
        spill_dir: str | None = None,
        dtype: torch.dtype = torch.float32,
        log: Callable[[str], None] | None = None,
        warn: Callable[[str], None] | None = None,
        check_stop: Callable[[], None] | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> dict:
        """Build the memory bank from the training normals in ``loader``, then calibrate.

        docs/method.md#memory-bank: features of all training views, or a greedy k-center
        coreset, per level, stored as buffers. Under DDP, ``loader`` is this rank's strided
        shard (samples ``rank, rank + world_size, ...`` of the unsharded loader, whole
        batches of ``MultiViewBatch``) and ``gather`` the all-gather; every rank ends with the
        same bank (the pitfall of anomalib#2673). ``broadcast`` sends rank 0's calibration to
        every rank. The calibration scores every training normal against the bank without its
        own rows, from the features the bank was built from (never extracted twice).

        Args:
            coreset_ratio, projection_dim, seed, streaming, spill_dir: see
                ``MemoryBankCallback``.
            dtype: the bank's storage dtype (``MemoryBankCallback``'s ``dtype``); the search
                computes in float32 whatever it is.
            log, warn: receive progress lines and warnings (default: none).
            check_stop: called before every batch and every calibration chunk; raises to end
                the build promptly (the CLI's SIGTERM/SIGINT handling).
            on_batch: called after every batch of features (a progress meter).

        Returns:
            how the bank was built (world size, coreset ratio, rows per level), for audits.
        """
        if world_size > 1 and gather is None:
            raise ValueError("fit_memory_bank over several processes needs gather")
        if not 0.0 < coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        state = _BankFit(self, rank, world_size, gather, check_stop, on_batch)
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"the bank dtype must be float32 or float16, got {dtype}")
        info: dict = {
            "world_size": world_size,
            "coreset_ratio": coreset_ratio,
            "streaming": streaming,
            "dtype": str(dtype).removeprefix("torch."),
        }
        self.memory_bank.storage_dtype = dtype
        features: dict[int, Tensor] | None = None
        builder: StreamingBankBuilder | None = None
        kept: dict[int, Tensor] = {}
        if streaming:
            builder = StreamingBankBuilder(
                coreset_ratio=coreset_ratio,
                projection_dim=projection_dim,
                seed=seed,
                spill_dir=spill_dir,
                dtype=dtype,
            )
            try:
                for level, rows, n in state.extract(loader):
                    builder.add(level, rows, n)
            except BaseException:
                builder.close()
                raise
            if not builder.levels:
                builder.close()
                raise RuntimeError("the training feature loader yielded no samples on this rank")
            # A coreset's calibration reads the rows it was selected from back from the spill.
            builder.keep_spill = coreset_ratio < 1.0
            levels = builder.build(gather if world_size > 1 else None, rank)
        else:
            chunks: dict[int, list[Tensor]] = {}
            for level, rows, _ in state.extract(loader):
                chunks.setdefault(level, []).append(rows)
            if not chunks:
                raise RuntimeError("the training feature loader yielded no samples on this rank")
            local = {level: torch.cat(parts) for level, parts in chunks.items()}
            features = (
                local
                if world_size == 1
                else {level: state.gather_rows(rows) for level, rows in local.items()}
            )
            info["feature_rows"] = {str(lv): int(r.shape[0]) for lv, r in features.items()}
            levels = _select(features, coreset_ratio, projection_dim, seed, kept)
        if log:
            log(f"memory bank: features gathered from {world_size} process(es)")
        try:
            for level, rows in levels:
                # Every feature in sample order keeps its place (positional bank); a coreset
                # does not.
                grid = state.grids.get(level) if coreset_ratio >= 1.0 else None
                self.memory_bank.set_level(level, rows, grid=grid)
                if log:
                    log(f"memory bank {self.level_name(level)}: {rows.shape[0]} x {rows.shape[1]}")
            if builder is not None:
                info["feature_rows"] = {str(lv): n for lv, n in builder.total_rows.items()}
                kept = dict(builder.kept)
            state.calibrate(features, builder, kept, broadcast, log, warn)
        finally:
            if builder is not None:
                builder.close()
        return info


def _select(features, coreset_ratio, projection_dim, seed, kept):
    for level, rows in sorted(features.items()):
        if coreset_ratio < 1.0:
            keep = greedy_coreset(rows, coreset_ratio, projection_dim=projection_dim, seed=seed)
            kept[level] = keep
            rows = rows[keep]
        yield level, rows


class _BankFit:
    """The state of one ``fit_memory_bank`` call: feature grids, the normals' geometry."""

    def __init__(
        self,
        model: VSADModel,
        rank: int,
        world: int,
        gather: Gather | None,
        check_stop: Callable[[], None] | None = None,
        on_batch: Callable[[], None] | None = None,
    ) -> None:
        self.model = model
        self.rank, self.world, self.gather = rank, world, gather
        self.check_stop = check_stop or (lambda: None)
        self.on_batch = on_batch or (lambda: None)
        self.grids: dict[int, tuple[int, int, int]] = {}
        self.image_size: tuple[int, int] | None = None
        self.homographies: list[Tensor] = []
        self.neighbour_mask: Tensor | None = None

    def extract(self, loader: Iterable):
        """``(level, rows, samples)`` per batch and level, in ``flatten_features`` order."""
        model = self.model
        was_training = model.training
        model.eval()
        device = model.prompt_embedding.device
        try:
            for batch in loader:
                self.check_stop()
                batch = batch.to(device)
                # What calibration needs besides the features: the image size, and the
                # homographies and neighbour mask that fusion of the normals' maps uses.
                self.image_size = batch.image_size
                self.homographies.append(batch.homographies.float().cpu())
                self.neighbour_mask = batch.neighbour_mask.cpu()
                features = model.extract_features(
                    batch.images, batch.homographies, batch.neighbour_mask
                )
                for level, feats in features.items():
                    self.grids[level] = (feats.shape[1], feats.shape[3], feats.shape[4])
                    yield level, flatten_features(feats.float()), feats.shape[0]
                self.on_batch()
        finally:
            model.train(was_training)

    def gather_rows(self, rows: Tensor) -> Tensor:
        """All-gather ``(n_r, C)`` rows of different lengths from every rank, rank order."""
        device = self.model.prompt_embedding.device
        rows = rows.to(device)
        count = torch.tensor([rows.shape[0]], device=device)
        counts = self.gather(count).flatten().tolist()
        padded = rows.new_zeros((max(counts), rows.shape[1]))
        padded[: rows.shape[0]] = rows
        gathered = self.gather(padded)  # (world, max_n, C)
        return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])

    def normal_homographies(self) -> Tensor:
        """``(N, V, V, 3, 3)`` homographies of every training normal, in the unsharded
        loader's order (each rank saw the strided shard ``rank, rank + world, ...``)."""
        local = torch.cat(self.homographies)
        if self.world == 1:
            return local
        shape = local.shape[1:]
        gathered = self.gather_rows(local.flatten(1)).cpu()
        return gathered.view(-1, *shape)[loader_order(gathered.shape[0], self.world)]

    @torch.no_grad()
    def calibrate(self, features, builder, kept, broadcast, log, warn) -> None:
        """Fit the calibration from LOO maps of every training normal (collective).

        Where the features come from: a bank of whole feature maps holds them itself
        (``MemoryBank.sample_features``); a coreset needs the rows it was selected from, which
        are ``features`` (the in-memory build, every rank holds all of them) or this rank's
        spill file (the streaming build, which keeps it for this).
        """
        model = self.model
        bank = model.memory_bank
        rank, world = self.rank, self.world
        if self.image_size is None:
            raise RuntimeError("calibration: no training batch was seen (image size unknown)")
        homographies = self.normal_homographies()
        levels = bank.levels
        first = levels[0]
        row_samples: dict[int, Tensor] | None = None
        features_of: Callable[[Tensor], dict[int, Tensor]]
        if all(bank.grid(level) is not None for level in levels):
            total = bank.num_samples(first)

            def features_of(ids: Tensor) -> dict[int, Tensor]:
                return {level: bank.sample_features(level, ids) for level in levels}

        else:
            per_sample = {level: math.prod(self.grids[level]) for level in levels}
            row_samples = {level: kept[level] // per_sample[level] for level in levels}
            if features is not None:
                total = features[first].shape[0] // per_sample[first]

                def read(level: int, ids: Tensor) -> Tensor:
                    rows = features[level]
                    return rows.view(-1, per_sample[level], rows.shape[1])[ids.to(rows.device)]

            else:
                total = builder.total_rows[first] // per_sample[first]

                def read(level: int, ids: Tensor) -> Tensor:
                    # This rank's spill holds global samples rank, rank + world, ...
                    return builder.local_samples(level, (ids - rank) // world)

            def features_of(ids: Tensor) -> dict[int, Tensor]:
                out = {}
                for level in levels:
                    rows = read(level, ids)
                    out[level] = unflatten_features(
                        rows.reshape(-1, rows.shape[-1]).float(), (ids.numel(), *self.grids[level])
                    )
                return out

        if total < 2:
            if warn:
                warn(
                    f"calibration skipped: {total} training normal (leave-one-out needs at least "
                    "2); the model can only be tested with model.calibration none, without OK/NG"
                )
            return
        started = time.perf_counter()
        samples = torch.arange(rank, total, world)
        read_features = features_of

        def features_of(ids: Tensor) -> dict[int, Tensor]:  # called per chunk: a stop point
            self.check_stop()
            return read_features(ids)

        maps = model.leave_one_out_maps(samples, features_of, self.image_size, row_samples)
        if world > 1:
            shape = maps.shape[1:]
            gathered = self.gather_rows(maps.flatten(1).contiguous())
            # Rank r scored samples r, r + world, ...: back to sample order on every rank.
            maps = gathered[loader_order(total, world).to(gathered.device)].view(-1, *shape)
        if world > 1 and builder is None:
            # The in-memory bank holds the samples in rank order; the calibration stores the
            # normals in the loader's order, as one process and the streaming build do.
            maps = maps[loader_order(total, world).to(maps.device)]
        if homographies.shape[0] != total:
            raise RuntimeError(
                f"calibration: {homographies.shape[0]} homographies for {total} training normals"
            )
        model.fit_calibration(maps, homographies, self.neighbour_mask)
        if world > 1 and broadcast is not None:
            # The maps are the same on every rank, and so is the fit; rank 0's buffers are sent
            # to every rank anyway, so no rank can be left with other thresholds.
            state = {k: v.cpu() for k, v in model.calibration.state_dict().items()}
            model.calibration.load_state_dict(broadcast(state))
        if log:
            log(
                f"calibration: leave-one-out maps of {total} training normals "
                f"({time.perf_counter() - started:.1f} s)"
            )


def loader_order(total: int, world: int) -> Tensor:
    """Indices that put rank-ordered samples (rank 0's ``0, world, ...``, then rank 1's ``1,
    world + 1, ...``) back in the loader's order ``0, 1, 2, ...``."""
    return torch.argsort(torch.cat([torch.arange(r, total, world) for r in range(world)]))
