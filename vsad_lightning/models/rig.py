"""``Rig``: the camera rig a model was fitted on, kept inside the model.

A model scores only with the geometry it was fitted with: the view names in order, the
neighbour graph (minus unreliable pairs, ``MultiViewDataModule.neighbour_graph_mask``) and the
category's homographies at the model's image size. They are buffers and extra state of this
module, so they travel in every checkpoint and bundle, and ``vsad predict`` and
``VSADInferencer`` need no training data root.

With per-sample homographies (``data.per_sample_homographies``) the category cache itself is
kept as well (JSON, in the extra state): it is the prior of
``geometry.per_sample.estimate_sample_homographies``, which ``sample_homographies`` runs on a
new sample's own images, exactly as the datamodule does for a split (same pairs, same sizes),
so the scores of a sample are those ``vsad-test`` gives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.per_sample import estimate_sample_homographies, graph_pairs
from vsad_lightning.geometry.projection import scale_homography

_BUFFERS = ("neighbour_mask", "homographies")


class Rig(nn.Module):
    """View names, neighbour mask and homographies of the fitted rig.

    Buffers: ``neighbour_mask`` ``(V, V)`` bool and ``homographies`` ``(V, V, 3, 3)`` float32 at
    ``image_size`` (``[v, u]`` maps view ``v`` to ``u``, pixel centres). Extra state (plain
    containers, loadable with ``weights_only=True``): ``view_names``, ``neighbour_graph``,
    ``image_size`` ``(W, H)``, ``per_sample`` and ``prior`` (the category cache as JSON, kept
    only when ``per_sample``), ``register_views``. Empty until ``set``; an empty rig loads
    from checkpoints written before the rig existed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("neighbour_mask", torch.zeros(0, 0, dtype=torch.bool))
        self.register_buffer("homographies", torch.zeros(0, 0, 3, 3))
        self.view_names: list[str] = []
        self.neighbour_graph: str = ""
        self.image_size: tuple[int, int] | None = None
        self.per_sample = False
        self.prior: dict | None = None
        self.register_views = False

    def is_set(self) -> bool:
        return bool(self.view_names)

    @torch.no_grad()
    def set(
        self,
        view_names: Sequence[str],
        neighbour_mask: Tensor,
        homographies: Tensor,
        image_size: tuple[int, int],
        *,
        neighbour_graph: str = "",
        prior: HomographyCache | None = None,
        per_sample: bool = False,
        register_views: bool = False,
    ) -> None:
        """Store the rig (``homographies`` already at ``image_size``)."""
        V = len(view_names)
        if tuple(neighbour_mask.shape) != (V, V) or tuple(homographies.shape) != (V, V, 3, 3):
            raise ValueError(
                f"rig of views {list(view_names)}: neighbour mask {tuple(neighbour_mask.shape)} "
                f"and homographies {tuple(homographies.shape)} do not fit {V} views"
            )
        if per_sample and prior is None:
            raise ValueError("a rig with per-sample homographies needs the category cache")
        device = self.homographies.device
        self.neighbour_mask = neighbour_mask.detach().to(device=device, dtype=torch.bool).clone()
        self.homographies = homographies.detach().to(device=device, dtype=torch.float32).clone()
        self.view_names = list(view_names)
        self.neighbour_graph = neighbour_graph
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.per_sample = bool(per_sample)
        self.prior = prior.to_json() if (per_sample and prior is not None) else None
        self.register_views = bool(register_views)

    def set_from_datamodule(self, datamodule, image_size: tuple[int, int]) -> None:
        """The rig of a ``MultiViewDataModule`` after ``setup``: its views, the neighbour mask
        the batches carry, the category cache's homographies rescaled to ``image_size``."""
        cache: HomographyCache = datamodule.homographies
        views = list(datamodule.view_names)
        H = scale_homography(cache.matrices(views).to(torch.float64), cache.image_size, image_size)
        self.set(
            views,
            datamodule.neighbour_graph_mask(),
            H.to(torch.float32),
            image_size,
            neighbour_graph=datamodule.neighbour_graph,
            prior=cache,
            per_sample=bool(datamodule.per_sample_homographies),
            register_views=bool(getattr(datamodule, "register_views", False)),
        )

    def require(self) -> None:
        if not self.is_set():
            raise DataError(
                "this model holds no camera rig (a checkpoint written before the rig was stored "
                "in it): score it through vsad-test / vsad-predict with the training data's "
                "config, or refit"
            )
        if self.register_views:
            raise DataError(
                "this model was fitted with data.register_views, which needs the reference "
                "sample's images; score it through vsad-test / vsad-predict with the training "
                "data's config"
            )

    def check_views(self, views: Sequence[str], what: str = "the sample") -> None:
        if list(views) != self.view_names:
            raise DataError(
                f"{what} has views {list(views)}, but the model was fitted on views "
                f"{self.view_names} (in this order)"
            )

    def prior_cache(self) -> HomographyCache | None:
        return None if self.prior is None else HomographyCache.from_json(self.prior, "<model rig>")

    def sample_homographies(self, images: Sequence[np.ndarray] | None = None) -> Tensor:
        """``(V, V, 3, 3)`` float32 homographies of one sample at ``image_size``.

        The category's; with ``per_sample`` and ``images`` (``V`` stored ``(H, W, 3)`` uint8
        RGB views, before any resize) the sample's own neighbour pairs are estimated from
        them with the category cache as prior, as ``MultiViewDataModule`` does for a split
        (``data.sample_homographies.ensure_sample_homographies``).
        """
        self.require()
        out = self.homographies.detach().cpu().clone()
        if not self.per_sample or images is None:
            return out
        prior = self.prior_cache()
        pairs = graph_pairs(prior, self.view_names, self.neighbour_graph, bridged=False)
        if not pairs:
            return out
        named = dict(zip(self.view_names, images, strict=True))
        estimate = estimate_sample_homographies(named, prior, pairs)
        size = (int(estimate.image_size[0]), int(estimate.image_size[1]))
        index = {view: i for i, view in enumerate(self.view_names)}
        for key, H in estimate.H.items():
            src, dst = key.split("->")
            H64 = torch.from_numpy(np.asarray(H, dtype=np.float64))
            out[index[src], index[dst]] = scale_homography(H64, size, self.image_size).float()
        return out

    # ------------------------------------------------------------------- state handling
    def get_extra_state(self) -> dict:
        return {
            "view_names": list(self.view_names),
            "neighbour_graph": self.neighbour_graph,
            "image_size": None if self.image_size is None else list(self.image_size),
            "per_sample": self.per_sample,
            "prior": self.prior,
            "register_views": self.register_views,
        }

    def set_extra_state(self, state: dict) -> None:
        self.view_names = list(state.get("view_names") or [])
        self.neighbour_graph = str(state.get("neighbour_graph") or "")
        size = state.get("image_size")
        self.image_size = None if size is None else (int(size[0]), int(size[1]))
        self.per_sample = bool(state.get("per_sample", False))
        self.prior = state.get("prior")
        self.register_views = bool(state.get("register_views", False))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        # The shapes depend on the rig: take the incoming ones. A checkpoint written before
        # the rig existed has none of these keys and leaves the rig empty.
        for name in _BUFFERS:
            value = state_dict.get(prefix + name)
            if isinstance(value, Tensor):
                current = self._buffers[name]
                self._buffers[name] = torch.empty(
                    value.shape, dtype=current.dtype, device=current.device
                )
        ours = [prefix + name for name in (*_BUFFERS, "_extra_state")]
        absent = [key for key in ours if key not in state_dict]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        for key in absent:
            if key in missing_keys:
                missing_keys.remove(key)
