"""Calibration on normals only: leave-one-out scores, standardisation and OK/NG thresholds.

Raw scores are kNN distances (``vsad_lightning.models.scoring``). On a real rig some places
of a normal view vary a lot from one sample to the next (the part's outline, specular
highlights, busy texture), so the max over a normal view's pixels is set by those places and
one camera's scores are on another scale than the next camera's. The fix is to learn, from
normals only, how large a normal score is at each place and in each view:

1. **Leave-one-out (LOO) maps of the training normals** (``leave_one_out_maps``). A training
   sample is in the bank, so its own distance is ~0 everywhere; scored against the bank WITHOUT
   its own rows it looks like an unseen normal. The positional bank masks the sample's own
   entries in the search (``MemoryBank.positional_distances(exclude=...)``: no rebuild); the
   global bank uses k-fold sub-banks (``folds``, default 5: a fold's samples are scored against
   the bank rows of the other folds, so each sub-bank lacks 1/k of the normals). The features
   are the bank's own rows (a bank of whole feature maps) or the rows the bank was selected
   from (a coreset), never extracted again, and the maps go through the same
   ``scoring.anomaly_maps`` (upsampling, level weights, Gaussian smoothing) as test maps.
   ``data.val_fraction`` normals are no alternative here: ``train_feature_dataloader`` puts
   them in the bank too (``MultiViewDataModule``), so they need LOO like every other normal.
2. **Statistics** (``Calibration.fit``), all robust (median, and the median absolute deviation
   times 1.4826, which equals the standard deviation for Gaussian data and ignores the few
   normals that are odd at a place):

   * per view and per map pixel: centre ``c_v(p)`` and spread ``s_v(p)`` of the LOO maps, with
     ``s_v(p) >= floor * mean_p s_v(p)``: a place that never varies (flat background) would
     otherwise turn the smallest change into a huge score. The mean, not the median, over the
     view's pixels: where most of a view is flat background the median spread is ~0. With
     ``floor = 1`` only places noisier than the view's average are damped and none is
     amplified;
   * per view: centre and spread of the normals' view scores, for the ``view`` mode (raw view
     scores) and the ``position`` mode (view scores of the position-normalised maps);
   * the normals' view scores in every mode, and from them OK/NG thresholds per view and per
     sample (``threshold_rule``).

Scoring a test view (``Calibration.apply``), mode by mode (``VSADModule(calibration=...)``):

* ``none``: the raw map (the paper's scoring); view score = max of the map.
* ``view``: ``n_v(p) = (a_v(p) - C_v) / S_v`` with the view's centre and spread of normal view
  scores, so the view score ``max_p n_v(p)`` is the raw view score standardised per view.
* ``position``: ``z_v(p) = (a_v(p) - c_v(p)) / s_v(p)``, then ``n_v(p) = (z_v(p) - C'_v) /
  S'_v`` with the statistics of ``max_p z_v`` over the normals.

Sample score = max over its views. A view is NG when its score exceeds the view threshold, a
sample when its score exceeds the sample threshold (the max of V normal view scores is larger
than one view's, so it has its own threshold), and the binary mask of a view is
``n_v(p) > view threshold``: exactly the pixels that make the view NG.

**Cross-view fusion** (``model.fusion_strength``, ``vsad_lightning.models.fusion``) acts on the
mode's maps before the per-view standardisation (the position-normalised ``z_v`` in mode
``position``): neighbouring views, carried through the sample's homographies, confirm or
discount each other. The view statistics and thresholds are then those of the normals' FUSED
maps, so the training normals' homographies and the neighbour mask are stored with their LOO
maps.

Every statistic of every mode is stored, and so are the normals' LOO maps, so the mode, the
threshold rule and the fusion strength can be switched at test time without refitting (the
view statistics and thresholds are re-derived from the stored normals). Nothing here ever sees
a test label.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from vsad_lightning.bank.knn import DEFAULT_MAX_CHUNK_BYTES, KnnBackend
from vsad_lightning.bank.storage import MemoryBank
from vsad_lightning.models.fusion import fuse_maps
from vsad_lightning.models.scoring import (
    anomaly_maps,
    level_distance_maps,
    sample_scores,
    view_scores,
)

CalibrationMode = Literal["none", "view", "position"]
CALIBRATION_MODES: tuple[str, ...] = ("none", "view", "position")
"""Row order of the per-mode buffers of ``Calibration``."""

ThresholdRule = Literal["quantile", "sigma"]
THRESHOLD_RULES: tuple[str, ...] = ("quantile", "sigma")

MAD_TO_STD = 1.4826
"""``1 / Phi^-1(3/4)``: the MAD times this is the standard deviation of Gaussian data."""

_BUFFERS = (
    "position_center",
    "position_scale",
    "view_center",
    "view_scale",
    "normal_view_scores",
    "view_threshold",
    "sample_threshold",
    "threshold_setting",
    "normal_maps",
    "fusion_setting",
)
_GEOMETRY_BUFFERS = ("normal_homographies", "neighbour_mask")
"""Stored when ``fit`` gets the normals' homographies: what fusing their maps needs."""

_FUSION_CHUNK = 8
"""Normals fused at once when the view statistics are derived (bounds the warp's memory)."""


def median(values: Tensor, dim: int = 0) -> Tensor:
    """The median along ``dim`` (the mean of the two middle values for an even count).

    ``kthvalue`` rather than ``torch.quantile``, which refuses inputs above 2**24 elements
    (LOO maps of a category at 256 px are larger) and sorts the whole input.
    """
    count = values.shape[dim]
    if count == 0:
        raise ValueError("the median of an empty set is undefined")
    lower = values.kthvalue((count + 1) // 2, dim=dim).values
    if count % 2:
        return lower
    return 0.5 * (lower + values.kthvalue(count // 2 + 1, dim=dim).values)


def robust_center_scale(values: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    """``(median, 1.4826 * median |x - median|)`` along ``dim``: a centre and a spread that a
    few outlying normals do not move."""
    center = median(values, dim)
    spread = MAD_TO_STD * median((values - center.unsqueeze(dim)).abs(), dim)
    return center, spread


def _tiny(center: Tensor) -> Tensor:
    """A spread below which nothing is resolved: 1e-6 of the largest centre (never 0)."""
    return 1e-6 * center.abs().amax().clamp_min(1e-6)


@dataclass(frozen=True)
class CalibratedScores:
    """Scores of one batch under one calibration mode.

    Attributes:
        maps: ``(B, V, 1, H, W)`` normalised maps (the raw maps for mode ``none``).
        view_scores: ``(B, V)``, the max of each view's normalised map.
        sample_scores: ``(B,)``, the max over the sample's views.
        view_labels: ``(B, V)`` int64, 1 = NG (score above the view's threshold).
        sample_labels: ``(B,)`` int64, 1 = NG (score above the sample threshold).
        masks: ``(B, V, 1, H, W)`` bool, the pixels above their view's threshold.
    """

    maps: Tensor
    view_scores: Tensor
    sample_scores: Tensor
    view_labels: Tensor
    sample_labels: Tensor
    masks: Tensor


@torch.no_grad()
def leave_one_out_maps(
    bank: MemoryBank,
    samples: Tensor,
    features_of: Callable[[Tensor], Mapping[int, Tensor]],
    image_size: tuple[int, int],
    weights: Mapping[int, float] | None = None,
    sigma: float = 4.0,
    *,
    positional_radius: int | None = None,
    folds: int = 5,
    row_samples: Mapping[int, Tensor] | None = None,
    backend: KnnBackend = "auto",
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    batch_size: int = 4,
) -> Tensor:
    """``(m, V, H, W)`` maps of training samples ``samples``, each scored WITHOUT its own rows.

    Args:
        bank: the built bank; ``samples`` index its training samples ``0..n-1`` (the order the
            feature rows were added in).
        samples: ``(m,)`` the samples to score (under DDP, this process's share).
        features_of: ``(b,)`` sample indices -> level -> ``(b, V, C_l, h_l, w_l)`` features
            (e.g. ``MemoryBank.sample_features``: the bank's own rows).
        image_size, weights, sigma: as ``scoring.anomaly_maps`` (the test maps' settings).
        positional_radius: the positional bank's radius (then the sample's own entries are
            masked in the search), or ``None`` for the global bank (k-fold sub-banks).
        folds: global bank only: sample ``i`` is in fold ``i % folds`` and is scored against the
            rows of the other folds; with fewer samples than folds, each sample is its own fold.
        row_samples: global bank only: level -> ``(N_l,)`` the sample each bank row came from
            (a coreset); ``None``: the bank holds whole feature maps (rows ``i*R..(i+1)*R-1``
            are sample ``i``, ``R = V h w``).
        backend, max_chunk_bytes: the kNN search (``scoring.level_distance_maps``).
        batch_size: samples scored at a time.
    """
    samples = samples.flatten().long().cpu()
    if samples.numel() == 0:
        raise ValueError("leave_one_out_maps needs at least one sample to score")
    out: list[tuple[Tensor, Tensor]] = []

    def score(ids: Tensor, search: MemoryBank, radius: int | None, exclude: Tensor | None):
        for start in range(0, ids.numel(), batch_size):
            chunk = ids[start : start + batch_size]
            distances = level_distance_maps(
                search,
                features_of(chunk),
                backend=backend,
                max_chunk_bytes=max_chunk_bytes,
                positional_radius=radius,
                exclude=None if exclude is None else chunk,
            )
            maps = anomaly_maps(distances, image_size, weights=weights, sigma=sigma)
            out.append((chunk, maps[:, :, 0]))

    if positional_radius is not None:
        score(samples, bank, positional_radius, exclude=samples)
    else:
        origins = {level: _row_samples(bank, level, row_samples) for level in bank.levels}
        total = int(max(int(o.max()) for o in origins.values())) + 1
        if total < 2:
            raise ValueError("leave-one-out calibration needs at least 2 training samples")
        folds = min(int(folds), total)
        if folds < 2:
            raise ValueError(f"calibration folds must be >= 2, got {folds}")
        for fold in range(folds):
            ids = samples[samples % folds == fold]
            if ids.numel() == 0:
                continue
            sub = MemoryBank(dtype=bank.bank(bank.levels[0]).dtype).to(bank._device_anchor.device)
            for level, origin in origins.items():
                sub.set_level(level, bank.bank(level)[(origin % folds != fold).to(origin.device)])
            score(ids, sub, None, None)
            del sub
    ids = torch.cat([chunk for chunk, _ in out])
    maps = torch.cat([m for _, m in out])
    return _in_order(samples, ids, maps)


def _in_order(samples: Tensor, ids: Tensor, maps: Tensor) -> Tensor:
    """``maps`` (rows in the order ``ids``) reordered to the order of ``samples``."""
    position = {int(i): k for k, i in enumerate(ids.tolist())}
    return maps[torch.tensor([position[int(i)] for i in samples.tolist()], device=maps.device)]


def _row_samples(bank: MemoryBank, level: int, row_samples: Mapping[int, Tensor] | None) -> Tensor:
    """The training sample of every row of the bank of ``level``."""
    rows = bank.bank(level).shape[0]
    if row_samples is not None and level in row_samples:
        origin = row_samples[level].flatten().long()
        if origin.numel() != rows:
            raise ValueError(
                f"bank level {level} has {rows} rows but row_samples gives {origin.numel()}"
            )
        return origin.to(bank.bank(level).device)
    grid = bank.grid(level)
    if grid is None:
        raise ValueError(
            f"bank level {level} is a coreset: leave-one-out needs the sample of every bank row "
            "(row_samples)"
        )
    return torch.arange(rows, device=bank.bank(level).device) // math.prod(grid)


class Calibration(nn.Module):
    """Normal-only statistics and OK/NG thresholds, stored as buffers (they travel in checkpoints).

    Created empty (``is_fitted()`` False); ``fit`` fills it from LOO maps. Loading a state dict
    creates the buffers it holds first (as ``MemoryBank`` does), so a checkpoint's calibration
    loads into a fresh module, and a checkpoint written before calibration existed loads too
    (the module then stays unfitted). See the module docstring for the statistics.

    Buffers (``M`` = 3 modes in ``CALIBRATION_MODES`` order, ``n`` normals, ``V`` views):
        position_center, position_scale: ``(V, H, W)``, per-pixel centre and floored spread.
        view_center, view_scale: ``(M, V)``, the affine map of each mode's view scores
            (``none``: 0 and 1).
        normal_view_scores: ``(M, n, V)``, the LOO normals' view scores in each mode.
        view_threshold: ``(M, V)``; sample_threshold: ``(M,)``.
        threshold_setting: ``(2,)``, ``(rule index in THRESHOLD_RULES, its value)`` the
            thresholds were derived with.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    def is_fitted(self) -> bool:
        return all(name in self._buffers for name in _BUFFERS)

    @property
    def num_normals(self) -> int:
        return int(self._buffers["normal_view_scores"].shape[1]) if self.is_fitted() else 0

    def _set(self, name: str, value: Tensor) -> None:
        self.register_buffer(name, value.detach().float().to(self._device_anchor.device))

    @torch.no_grad()
    def fit(
        self,
        maps: Tensor,
        *,
        homographies: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
        floor: float = 1.0,
        rule: ThresholdRule = "quantile",
        value: float = 0.95,
        fusion_strength: float = 0.0,
    ) -> None:
        """Fill every buffer from ``(n, V, H, W)`` LOO maps of ``n >= 2`` training normals.

        Args:
            maps: the normals' LOO maps (``leave_one_out_maps``), raw distances.
            homographies: ``(n, V, V, 3, 3)`` the normals' homographies at the maps' size
                (``MultiViewBatch.homographies``); needed for ``fusion_strength > 0``.
            neighbour_mask: ``(V, V)`` bool, the pairs fusion looks across.
            floor: the per-pixel spread is at least ``floor`` times the mean spread of its
                view (see the module docstring); 0 keeps only a tiny absolute floor.
            rule, value: the threshold rule (``set_thresholds``).
            fusion_strength: the view statistics are those of maps fused at this strength.
        """
        if maps.dim() != 4 or maps.shape[0] < 2:
            raise ValueError(
                "calibration needs LOO maps (n, V, H, W) of n >= 2 normals, got "
                f"{tuple(maps.shape)}"
            )
        if floor < 0:
            raise ValueError(f"the calibration floor must be >= 0, got {floor}")
        if not bool(torch.isfinite(maps).all()):
            raise ValueError("the LOO maps of the training normals hold NaN or inf")
        n, V = maps.shape[:2]
        if (homographies is None) != (neighbour_mask is None):
            raise ValueError("give the normals' homographies and the neighbour mask together")
        if homographies is not None:
            if tuple(homographies.shape) != (n, V, V, 3, 3):
                raise ValueError(
                    f"expected the normals' homographies (n, V, V, 3, 3) = {(n, V, V, 3, 3)}, "
                    f"got {tuple(homographies.shape)}"
                )
            if tuple(neighbour_mask.shape) != (V, V):
                raise ValueError(f"expected a ({V}, {V}) neighbour mask, got {neighbour_mask}")
            self._set("normal_homographies", homographies)
            self._set("neighbour_mask", neighbour_mask)
        else:
            for name in _GEOMETRY_BUFFERS:
                self._buffers.pop(name, None)
        maps = maps.float()
        center, spread = robust_center_scale(maps, 0)  # (V, H, W)
        view_floor = floor * spread.flatten(1).mean(1)  # (V,)
        spread = torch.maximum(spread, view_floor[:, None, None]).clamp_min(_tiny(center))
        self._set("position_center", center)
        self._set("position_scale", spread)
        self._set("normal_maps", maps)
        self.set_view_statistics(fusion_strength)
        self.set_thresholds(rule, value)

    def _mode_maps(self, maps: Tensor, mode: CalibrationMode) -> Tensor:
        """``(B, V, 1, H, W)`` raw maps -> the mode's maps before the per-view standardisation
        (position-normalised in mode ``position``, raw otherwise)."""
        if mode == "position":
            center, scale = self._buffers["position_center"], self._buffers["position_scale"]
            return (maps.float() - center[:, None]) / scale[:, None]
        return maps.float()

    @torch.no_grad()
    def set_view_statistics(self, fusion_strength: float) -> None:
        """Derive every mode's view centre, spread and normal view scores from the stored LOO
        maps, fused at ``fusion_strength`` (0: no fusion). Thresholds follow with
        ``set_thresholds``."""
        if "normal_maps" not in self._buffers:
            raise RuntimeError("the calibration is not fitted")
        if fusion_strength > 0 and not all(n in self._buffers for n in _GEOMETRY_BUFFERS):
            raise ValueError(
                f"model.fusion_strength {fusion_strength} needs the training normals' "
                "homographies, which this calibration was fitted without: refit, or use 0"
            )
        normal = self._buffers["normal_maps"][:, :, None]  # (n, V, 1, H, W)
        centers, scales, scores_all = [], [], []
        for mode in CALIBRATION_MODES:
            parts = []
            for start in range(0, normal.shape[0], _FUSION_CHUNK):
                chunk = self._mode_maps(normal[start : start + _FUSION_CHUNK], mode)
                if fusion_strength > 0:
                    chunk = fuse_maps(
                        chunk,
                        self._buffers["normal_homographies"][start : start + _FUSION_CHUNK],
                        self._buffers["neighbour_mask"].bool(),
                        fusion_strength,
                    )
                parts.append(view_scores(chunk))
            scores = torch.cat(parts)  # (n, V)
            if mode == "none":
                c, s = torch.zeros_like(scores[0]), torch.ones_like(scores[0])
            else:
                c, s = robust_center_scale(scores, 0)
                s = s.clamp_min(_tiny(c))
            centers.append(c)
            scales.append(s)
            scores_all.append((scores - c) / s)
        self._set("view_center", torch.stack(centers))
        self._set("view_scale", torch.stack(scales))
        self._set("normal_view_scores", torch.stack(scores_all))
        self._set("fusion_setting", torch.tensor([float(fusion_strength)]))

    def fusion_matches(self, fusion_strength: float) -> bool:
        """True when the view statistics were derived at ``fusion_strength``."""
        setting = self._buffers.get("fusion_setting")
        return setting is not None and math.isclose(
            float(setting[0]), float(fusion_strength), abs_tol=1e-9
        )

    @torch.no_grad()
    def set_thresholds(self, rule: ThresholdRule, value: float) -> None:
        """Derive the thresholds of every mode from the stored normal scores.

        * ``quantile``: the ``value`` quantile (linear interpolation) of the normals' view
          scores, per view, and of their sample scores. A score above it is NG, so of ``n``
          distinct normal scores exactly ``n - 1 - floor((n - 1) value)`` are NG: about
          ``1 - value`` of the normals.
        * ``sigma``: ``median + value * 1.4826 MAD`` of the same scores. In the standardised
          modes a view's threshold is then ``value`` itself (its scores have median 0, spread 1).
        """
        if "normal_view_scores" not in self._buffers:
            raise RuntimeError("the calibration is not fitted")
        if rule == "quantile":
            if not 0.0 < value < 1.0:
                raise ValueError(f"threshold_quantile must be in (0, 1), got {value}")
        elif rule == "sigma":
            if value <= 0:
                raise ValueError(f"threshold_sigma must be > 0, got {value}")
        else:
            raise ValueError(f"threshold rule must be one of {THRESHOLD_RULES}, got {rule!r}")
        views = self._buffers["normal_view_scores"]  # (M, n, V)
        samples = views.amax(dim=-1)  # (M, n)
        if rule == "quantile":
            view_threshold = torch.quantile(views, value, dim=1)
            sample_threshold = torch.quantile(samples, value, dim=1)
        else:
            center, spread = robust_center_scale(views, 1)
            view_threshold = center + value * spread
            center, spread = robust_center_scale(samples, 1)
            sample_threshold = center + value * spread
        self._set("view_threshold", view_threshold)
        self._set("sample_threshold", sample_threshold)
        setting = torch.tensor([float(THRESHOLD_RULES.index(rule)), float(value)])
        self._set("threshold_setting", setting)

    def thresholds_match(self, rule: ThresholdRule, value: float) -> bool:
        """True when the stored thresholds were derived with ``rule`` and ``value``."""
        setting = self._buffers.get("threshold_setting")
        if setting is None or setting.numel() != 2:
            return False
        return int(setting[0]) == THRESHOLD_RULES.index(rule) and math.isclose(
            float(setting[1]), float(value), rel_tol=1e-6
        )

    @torch.no_grad()
    def apply(
        self,
        raw_maps: Tensor,
        mode: CalibrationMode,
        *,
        homographies: Tensor | None = None,
        neighbour_mask: Tensor | None = None,
        fusion_strength: float = 0.0,
    ) -> CalibratedScores:
        """Normalised maps, scores, OK/NG labels and masks of ``(B, V, 1, H, W)`` raw maps.

        ``fusion_strength > 0`` fuses the mode's maps across the views (module docstring) with
        the batch's ``homographies`` ``(B, V, V, 3, 3)`` and ``neighbour_mask``; the view
        statistics must have been derived at the same strength (``set_view_statistics``).
        """
        if mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration must be one of {CALIBRATION_MODES}, got {mode!r}")
        if not self.is_fitted():
            raise RuntimeError("the calibration is not fitted")
        if not self.fusion_matches(fusion_strength):
            raise RuntimeError(
                f"the view statistics were derived at fusion strength "
                f"{float(self._buffers['fusion_setting'][0])}, not {fusion_strength}: call "
                "set_view_statistics first"
            )
        center = self._buffers["position_center"]
        if raw_maps.dim() != 5 or tuple(raw_maps.shape[1:]) != (
            center.shape[0],
            1,
            *center.shape[1:],
        ):
            raise ValueError(
                f"the calibration was fitted on maps (V, 1, H, W) = "
                f"{(center.shape[0], 1, *center.shape[1:])}; got maps {tuple(raw_maps.shape)}"
            )
        m = CALIBRATION_MODES.index(mode)
        maps = self._mode_maps(raw_maps, mode)
        if fusion_strength > 0:
            if homographies is None or neighbour_mask is None:
                raise ValueError("fusion needs the batch's homographies and neighbour mask")
            maps = fuse_maps(maps, homographies, neighbour_mask, fusion_strength)
        if mode != "none":
            shape = (1, -1, 1, 1, 1)
            maps = (maps - self._buffers["view_center"][m].view(shape)) / self._buffers[
                "view_scale"
            ][m].view(shape)
        per_view = view_scores(maps)
        per_sample = sample_scores(per_view)
        view_threshold = self._buffers["view_threshold"][m]
        return CalibratedScores(
            maps=maps,
            view_scores=per_view,
            sample_scores=per_sample,
            view_labels=(per_view > view_threshold).long(),
            sample_labels=(per_sample > self._buffers["sample_threshold"][m]).long(),
            masks=maps > view_threshold.view(1, -1, 1, 1, 1),
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # Shapes depend on the data (views, map size, number of normals), and a fresh module
        # has no buffers: create them at the incoming shapes before the standard copy.
        for name in (*_BUFFERS, *_GEOMETRY_BUFFERS):
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor):
                self.register_buffer(
                    name,
                    torch.empty(value.shape, dtype=value.dtype, device=self._device_anchor.device),
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        if not self.is_fitted():
            return "unfitted"
        v, h, w = self._buffers["position_center"].shape
        return f"normals={self.num_normals}, views={v}, maps={h}x{w}"
