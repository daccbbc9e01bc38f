"""The typed containers that flow from the datasets to the system.

Shapes follow docs/conventions.md#tensor-shapes. ``V`` is the number of views, ``H, W`` the
image size after the DataModule's transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class MultiViewSample:
    """One physical object seen from ``V`` views (what a dataset yields).

    Attributes:
        images: ``(V, 3, H, W)`` float32 in [-1, 1].
        masks: ``(V, 1, H, W)`` float32, exactly 0 or 1.
        view_labels: ``(V,)`` int64, 1 where the view shows a defect (has a mask).
        sample_label: 0-dim int64, 1 when any view is anomalous.
        homographies: ``(V, V, 3, 3)`` float32; ``[v, u]`` maps pixel-centre coordinates of
            view ``v`` to view ``u`` at this sample's image resolution; identity on the diagonal.
        sample_id: the sample key, e.g. ``audiojack_0001_OK``.
        category: the dataset category.
        view_names: the view tokens in order, e.g. ``["C1", ..., "C5"]``.
        image_paths: the source file of each view (for reports and pictures).
        registration: ``(V, 3, 3)`` float32; ``[v]`` maps pixel centres of the ORIGINAL view
            ``v`` to its registered (reference) frame at the image resolution; ``images`` and
            ``homographies`` are in the registered frames, ``masks`` in the original ones
            (``data.register_views``, docs/method.md#registration). The identity when
            registration is off (``None`` given).
    """

    images: Tensor
    masks: Tensor
    view_labels: Tensor
    sample_label: Tensor
    homographies: Tensor
    sample_id: str
    category: str
    view_names: list[str]
    image_paths: list[str] = field(default_factory=list)
    registration: Tensor | None = None

    def __post_init__(self) -> None:
        if self.registration is None:
            self.registration = torch.eye(3).repeat(self.images.shape[0], 1, 1)


@dataclass
class MultiViewBatch:
    """A batch of multi-view samples.

    Attributes:
        images: ``(B, V, 3, H, W)`` float32 in [-1, 1].
        masks: ``(B, V, 1, H, W)`` float32, exactly 0 or 1.
        view_labels: ``(B, V)`` int64.
        sample_labels: ``(B,)`` int64; 1 when any of the sample's views is anomalous.
        homographies: ``(B, V, V, 3, 3)`` float32, ``[b, v, u]`` maps view ``v`` to view ``u``
            in pixel-centre coordinates at image resolution ``(W, H)``.
        neighbour_mask: ``(V, V)`` bool, ``[v, u]`` True when ``u`` is a neighbour of ``v``
            (never on the diagonal).
        sample_ids, categories: one entry per sample.
        view_names: the view tokens, shared by the batch.
        image_paths: ``B`` lists of ``V`` paths.
        registration: ``(B, V, 3, 3)`` float32, ``MultiViewSample.registration`` stacked
            (identity when registration is off, or ``None`` given).
    """

    images: Tensor
    masks: Tensor
    view_labels: Tensor
    sample_labels: Tensor
    homographies: Tensor
    neighbour_mask: Tensor
    sample_ids: list[str]
    categories: list[str]
    view_names: list[str]
    image_paths: list[list[str]] = field(default_factory=list)
    registration: Tensor | None = None

    def __post_init__(self) -> None:
        if self.registration is None:
            B, V = self.images.shape[:2]
            self.registration = torch.eye(3, device=self.images.device).repeat(B, V, 1, 1)

    @property
    def batch_size(self) -> int:
        return self.images.shape[0]

    @property
    def num_views(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        """``(W, H)`` of the images, the resolution the homographies refer to."""
        return self.images.shape[-1], self.images.shape[-2]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultiViewBatch:
        """A copy with every tensor on ``device`` (the lists are shared, not copied)."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def pin_memory(self) -> MultiViewBatch:
        """Called by ``DataLoader(pin_memory=True)`` for custom batch types."""
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **pinned)


def collate_multiview(
    samples: Sequence[MultiViewSample], neighbour_mask: Tensor | None = None
) -> MultiViewBatch:
    """Stack samples into a ``MultiViewBatch``.

    All samples must share the view tokens and image size; mixing them would silently
    misalign views, so it is an error that names the offending sample.

    Args:
        samples: what the dataset yielded.
        neighbour_mask: ``(V, V)`` bool; ``None`` means every other view is a neighbour.
    """
    if len(samples) == 0:
        raise ValueError("collate_multiview got an empty list of samples")
    first = samples[0]
    for s in samples[1:]:
        if s.view_names != first.view_names:
            raise ValueError(
                f"sample {s.sample_id!r} has views {s.view_names}, but sample "
                f"{first.sample_id!r} in the same batch has {first.view_names}"
            )
        if s.images.shape != first.images.shape:
            raise ValueError(
                f"sample {s.sample_id!r} has images of shape {tuple(s.images.shape)}, but "
                f"sample {first.sample_id!r} in the same batch has {tuple(first.images.shape)}"
            )
    num_views = len(first.view_names)
    if neighbour_mask is None:
        neighbour_mask = ~torch.eye(num_views, dtype=torch.bool)
    if neighbour_mask.shape != (num_views, num_views):
        raise ValueError(
            f"neighbour_mask has shape {tuple(neighbour_mask.shape)}, expected "
            f"({num_views}, {num_views}) for views {first.view_names}"
        )
    return MultiViewBatch(
        images=torch.stack([s.images for s in samples]),
        masks=torch.stack([s.masks for s in samples]),
        view_labels=torch.stack([s.view_labels for s in samples]),
        sample_labels=torch.stack([s.sample_label for s in samples]),
        homographies=torch.stack([s.homographies for s in samples]),
        neighbour_mask=neighbour_mask.to(torch.bool),
        sample_ids=[s.sample_id for s in samples],
        categories=[s.category for s in samples],
        view_names=list(first.view_names),
        image_paths=[list(s.image_paths) for s in samples],
        registration=torch.stack([s.registration for s in samples]),
    )
