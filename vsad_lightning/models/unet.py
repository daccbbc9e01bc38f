"""``ViewAlignedUNet``: a diffusers U-Net with MVAM and FRM installed by forward hooks.

docs/method.md#view-aligned-u-net. The wrapper runs the U-Net on all views of all samples at once,
``(B·V, c, h, w)``, and hooks the decoder:

- **MVAM after every decoder ResBlock.** A forward hook on ``unet.up_blocks[i].resnets[j]``
  reshapes the ResBlock's output ``(B·V, C, h, w)`` to ``(B, V, C, h, w)``, aligns it across
  views with ``self.aligners["up{i}_res{j}"]`` and hands the result back to the U-Net (so the
  block's attention layer, the next ResBlock and everything after see the aligned features).
- **FRM on the feature levels.** A forward hook on ``unet.up_blocks[i]`` for every feature level
  ``i`` applies ``self.refiners[str(i)]`` to the block's OUTPUT, i.e. after its last ResBlock (+
  MVAM), its last attention layer and, when the block has one, its upsampler. The refined map
  goes back into the U-Net stream, so the denoising loss L_d trains FRM too, and it is the
  map captured as feature ``F^(i)`` (after FRM). Consequently a block with an upsampler yields
  features at twice its internal resolution; ``ViewAlignedOutput.level_homographies`` are
  scaled to each captured map's actual size.

The aligner and refiner weights live in this wrapper (``self.aligners``, ``self.refiners``),
not in the U-Net: ``unet.state_dict()`` and ``unet.save_pretrained`` are unchanged.

Per-call data (homographies, neighbour mask, ``B`` and ``V``) is kept in ``self._context`` from
one forward call until the next: with gradient checkpointing the ResBlocks (and their hooks)
run again during backward, after ``forward`` has returned, and must still see the call's data.
Capturing assigns ``features[level] = ...`` so a recomputation cannot duplicate a feature.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from vsad_lightning.geometry.projection import scale_homography
from vsad_lightning.models.frm import FRM
from vsad_lightning.models.mvam import MVAM


@dataclass
class ViewAlignedOutput:
    """What ``ViewAlignedUNet.forward`` returns.

    Attributes:
        noise_pred: ``(B, V, c, h, w)``, the U-Net's prediction (epsilon or v, per the
            scheduler's ``prediction_type``).
        features: ``{level: (B, V, C_l, h_l, w_l)}`` captured after FRM; empty when
            ``capture=False``.
        level_homographies: ``{level: (B, V, V, 3, 3)}`` scaled to each feature's ``(w_l, h_l)``.
    """

    noise_pred: Tensor
    features: dict[int, Tensor]
    level_homographies: dict[int, Tensor]


@dataclass
class _CallContext:
    """The data of one forward call that the hooks need (see the module docstring)."""

    batch_size: int
    num_views: int
    homographies: Tensor  # (B, V, V, 3, 3) at image resolution
    image_size: tuple[int, int]  # (W, H)
    neighbour_mask: Tensor  # (V, V) bool
    capture: bool
    features: dict[int, Tensor] = field(default_factory=dict)
    scaled: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    layouts: dict = field(default_factory=dict)  # MVAM's geometry per map size (MVAM.forward)

    def homographies_at(self, width: int, height: int) -> Tensor:
        """Homographies scaled to a ``(width, height)`` map, computed once per size and call."""
        key = (width, height)
        if key not in self.scaled:
            self.scaled[key] = scale_homography(self.homographies, self.image_size, key)
        return self.scaled[key]

    def to_views(self, x: Tensor, where: str) -> Tensor:
        """``(B·V, C, h, w)`` -> ``(B, V, C, h, w)``."""
        if x.shape[0] != self.batch_size * self.num_views:
            raise RuntimeError(
                f"{where} received a batch of {x.shape[0]} maps, but the current "
                f"ViewAlignedUNet call has B·V = {self.batch_size}·{self.num_views}; run the "
                "U-Net through ViewAlignedUNet.forward, not directly"
            )
        return x.unflatten(0, (self.batch_size, self.num_views))


class _AlignerHook:
    """Forward hook of one decoder ResBlock: apply its MVAM to the ResBlock's output.

    A small class rather than a closure so that ``copy.deepcopy`` and pickling of the wrapper
    rebind the hook to the copy's aligners.
    """

    def __init__(self, owner: ViewAlignedUNet, key: str) -> None:
        self.owner = owner
        self.key = key

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        ctx = self.owner._require_context(self.key)
        x = ctx.to_views(output, f"decoder ResBlock {self.key}")
        h, w = x.shape[-2:]
        aligned = self.owner.aligners[self.key](
            x, ctx.homographies_at(w, h), ctx.neighbour_mask, layout_cache=ctx.layouts
        )
        return aligned.flatten(0, 1)


class _LevelHook:
    """Forward hook of one feature-level up block: FRM on its output, then capture."""

    def __init__(self, owner: ViewAlignedUNet, level: int) -> None:
        self.owner = owner
        self.level = level

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> Tensor:
        ctx = self.owner._require_context(f"up{self.level}")
        x = ctx.to_views(output, f"up block {self.level}")
        if self.owner.use_frm:
            x = self.owner.refiners[str(self.level)](x)
        if ctx.capture:
            ctx.features[self.level] = x  # assign: a recomputation must not duplicate it
        return x.flatten(0, 1)


class ViewAlignedUNet(nn.Module):
    """A diffusers ``UNet2DConditionModel`` run jointly on the views of each sample.

    Args:
        unet: the U-Net (its weights are left in place; see ``train_unet``).
        feature_levels: decoder up-block indices whose outputs are the features ``F^(l)``;
            negative indices count from the last block. Default: the last two blocks (the
            paper's levels 3 and 4; ``(2, 3)`` for SD2). Stored non-negative and sorted.
        attention_dim, num_heads, window, num_frequencies: MVAM's ``D``, heads, ``R`` and
            ``L`` (docs/method.md#mvam).
        use_mvam: install an MVAM after every decoder ResBlock (ablation switch).
        use_frm: apply FRM to every feature level (ablation switch); features are captured at
            the same place either way.
        train_unet: ``none`` (U-Net frozen), ``decoder`` (up blocks, ``conv_norm_out`` and
            ``conv_out`` trainable) or ``all`` (docs/method.md#training). MVAM and FRM always train.
        gradient_checkpointing: ``unet.enable_gradient_checkpointing()`` (non-reentrant, so the
            aligners of a frozen U-Net still receive gradients).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        feature_levels: Sequence[int] = (-2, -1),
        attention_dim: int = 64,
        num_heads: int = 4,
        window: int = 3,
        num_frequencies: int = 4,
        use_mvam: bool = True,
        use_frm: bool = True,
        train_unet: Literal["none", "decoder", "all"] = "none",
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.use_mvam = use_mvam
        self.use_frm = use_frm
        self.train_unet = train_unet
        num_blocks = len(unet.up_blocks)
        self.feature_levels = self._normalise_levels(feature_levels, num_blocks)
        self._context: _CallContext | None = None

        # Build the new modules where the U-Net lives (also the meta device, for layout checks).
        device = next(unet.parameters()).device
        self.aligners = nn.ModuleDict()
        self.refiners = nn.ModuleDict()
        self._hook_handles = []
        if use_mvam:
            for i, block in enumerate(unet.up_blocks):
                for j, resnet in enumerate(block.resnets):
                    key = f"up{i}_res{j}"
                    self.aligners[key] = MVAM(
                        resnet.out_channels,
                        attention_dim=attention_dim,
                        num_heads=num_heads,
                        window=window,
                        num_frequencies=num_frequencies,
                    ).to(device)
                    self._hook_handles.append(resnet.register_forward_hook(_AlignerHook(self, key)))
        channels = self.level_channels()
        for level in self.feature_levels:
            if use_frm:
                self.refiners[str(level)] = FRM(channels[level]).to(device)
            self._hook_handles.append(
                unet.up_blocks[level].register_forward_hook(_LevelHook(self, level))
            )

        self._set_trainable(train_unet)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()

    # ------------------------------------------------------------------------------ set-up
    @staticmethod
    def _normalise_levels(levels: Sequence[int], num_blocks: int) -> list[int]:
        if len(levels) == 0:
            raise ValueError("feature_levels must name at least one decoder up block")
        normalised = []
        for level in levels:
            if not -num_blocks <= level < num_blocks:
                raise ValueError(
                    f"feature level {level} does not exist: the U-Net has {num_blocks} up "
                    f"blocks (valid indices {-num_blocks}..{num_blocks - 1})"
                )
            normalised.append(level % num_blocks)
        if len(set(normalised)) != len(normalised):
            raise ValueError(f"feature_levels {list(levels)} name the same up block twice")
        return sorted(normalised)

    def _set_trainable(self, train_unet: str) -> None:
        if train_unet == "none":
            self.unet.requires_grad_(False)
        elif train_unet == "decoder":
            self.unet.requires_grad_(False)
            for part in (self.unet.up_blocks, self.unet.conv_norm_out, self.unet.conv_out):
                if part is not None:
                    part.requires_grad_(True)
        elif train_unet == "all":
            self.unet.requires_grad_(True)
        else:
            raise ValueError(f"train_unet must be 'none', 'decoder' or 'all', got {train_unet!r}")
        self.aligners.requires_grad_(True)
        self.refiners.requires_grad_(True)

    def level_channels(self) -> dict[int, int]:
        """``{level: C_l}``: channels of each feature level's output (after any upsampler)."""
        return {
            level: self.unet.up_blocks[level].resnets[-1].out_channels
            for level in self.feature_levels
        }

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """MVAM and FRM parameters plus the U-Net parameters ``train_unet`` unfroze."""
        return (p for p in self.parameters() if p.requires_grad)

    def remove_hooks(self) -> None:
        """Detach MVAM and FRM from the U-Net (it then computes what it computed before)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()

    def _require_context(self, where: str) -> _CallContext:
        if self._context is None:
            raise RuntimeError(
                f"the hook of {where} fired outside a ViewAlignedUNet call: run the U-Net through "
                "ViewAlignedUNet.forward, which provides the homographies"
            )
        return self._context

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        latents: Tensor,
        timesteps: Tensor,
        encoder_hidden_states: Tensor,
        homographies: Tensor,
        image_size: tuple[int, int],
        neighbour_mask: Tensor,
        capture: bool = True,
    ) -> ViewAlignedOutput:
        """Run the U-Net on every view of every sample.

        Args:
            latents: ``(B, V, c, h, w)`` noised latents.
            timesteps: ``(B,)`` one timestep per sample, shared by its views (a 0-dim tensor
                is shared by every sample).
            encoder_hidden_states: ``(1 or B, L, D)``, broadcast to the ``B·V`` U-Net inputs.
            homographies: ``(B, V, V, 3, 3)`` at image resolution ``image_size``.
            image_size: ``(W, H)`` of the images the homographies refer to.
            neighbour_mask: ``(V, V)`` bool.
            capture: capture the feature levels (off during DDIM inversion steps).
        """
        if latents.dim() != 5:
            raise ValueError(f"latents must be (B, V, c, h, w), got shape {tuple(latents.shape)}")
        B, V = latents.shape[:2]
        if tuple(homographies.shape) != (B, V, V, 3, 3):
            raise ValueError(
                f"homographies must be (B, V, V, 3, 3) = {(B, V, V, 3, 3)}, got "
                f"{tuple(homographies.shape)}"
            )
        if tuple(neighbour_mask.shape) != (V, V):
            raise ValueError(
                f"neighbour_mask must be (V, V) = {(V, V)}, got {tuple(neighbour_mask.shape)}"
            )
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(B)
        if tuple(timesteps.shape) != (B,):
            raise ValueError(f"timesteps must be (B,) = ({B},), got {tuple(timesteps.shape)}")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] not in (1, B):
            raise ValueError(
                f"encoder_hidden_states must be (1 or B, L, D) with B = {B}, got "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        if encoder_hidden_states.shape[0] == 1:
            conditioning = encoder_hidden_states.expand(B * V, -1, -1)
        else:
            conditioning = encoder_hidden_states.repeat_interleave(V, dim=0)

        ctx = _CallContext(
            batch_size=B,
            num_views=V,
            homographies=homographies,
            image_size=(int(image_size[0]), int(image_size[1])),
            neighbour_mask=neighbour_mask.to(device=latents.device, dtype=torch.bool),
            capture=capture,
        )
        # Kept after this call returns: checkpointed ResBlocks re-run their hooks in backward.
        self._context = ctx
        noise_pred = self.unet(
            latents.flatten(0, 1),
            timesteps.repeat_interleave(V),
            encoder_hidden_states=conditioning,
            return_dict=False,
        )[0]
        features = dict(ctx.features)
        ctx.features = {}  # drop the context's references to this call's features
        level_homographies = {
            level: ctx.homographies_at(f.shape[-1], f.shape[-2]) for level, f in features.items()
        }
        return ViewAlignedOutput(noise_pred.unflatten(0, (B, V)), features, level_homographies)
