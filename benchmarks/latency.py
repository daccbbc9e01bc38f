"""Per-sample inference latency by stage, and samples/s, for the tiny config and SD2 widths.

Usage:
    python benchmarks/latency.py [--configs tiny sd2] [--sizes 256] [--repeats 2]
        [--out benchmarks/results/latency_cpu.md]
    python benchmarks/latency.py --device cuda --dtype bf16 --sizes 256 512
        (writes benchmarks/results/latency_<gpu name>.md unless --out is given)

One test sample = 5 views, scored as ``VSADModule.score`` does (docs/method.md#scoring),
split into the stages it runs in order:

* ``encode``     images -> scaled latents (``z = s E(I)``),
* ``inversion``  DDIM inversion of the latents to ``t*`` (``inversion_steps`` U-Net passes with
                 MVAM; 0 passes in ``noise`` mode),
* ``features``   the capture pass at ``t*`` (one U-Net pass, features after FRM),
* ``knn``        exact nearest-bank-row distance of every feature position, per level,
* ``post``       upsampling, level weighting, Gaussian smoothing, view and sample scores.

Configurations:

* ``tiny``: ``configs/demo.yaml``'s model section as it is (the embedded default), at each size,
  scoring included: its positional bank, its latent level (``latent_weight``) and its
  ``feature_norm``; the U-Net at ``model.unet_image_size`` (the views area-resized for it, the
  latent level at the views' size, as ``VSADModel.unet_latents``).
* ``tiny_full_unet``: the same with the U-Net at the views' size (the demo before
  ``unet_image_size``): the two rows side by side show what that option saves.
* ``sd2``: Stable Diffusion 2 base's U-Net layout and widths (320/640/1280/1280, cross-attention
  1024, a zero prompt) and its VAE layout (128/256/512/512, 4 latent channels, scaling
  0.18215), random weights (nothing is downloaded), with VSADModule's defaults: levels
  ``[-2, -1]``, attention_dim 64, t* = 200, 5 inversion steps.

The banks are random rows: a global bank gets ``--bank-ratio`` of a Real-IAD category's
features per level (default: a 1% coreset, 250 samples x 5 views x h x w x 0.01;
benchmarks/bank_scale.py), a positional bank every feature map of the 250 samples (it has no
coreset). The brute-force search's cost does not depend on the values and grows linearly with N
(benchmarks/knn.py); random rows have a flat spectrum, so ``auto`` never takes the projected
search here.
Weights are random too: latency does not depend on their values.

Old and new side by side (``--compare``, default on): every repeat scores the sample with the
code paths as they were before the speed work (row ``before``: the MVAM forward that gathered
every other view, benchmarks/_mvam_before.py, and the positional search without the norm cache,
benchmarks/_positional_before.py) and then as they are now (row ``now``), interleaved, so both
see the same load on a shared machine; a last row gives the ratio per stage.

Timing: ``--warmup`` untimed samples (default 1), then the median of ``--repeats`` samples
per stage; on CUDA each stage ends with ``torch.cuda.synchronize()``. ``--dtype bf16`` runs
the encoder and U-Net under ``torch.autocast`` (the kNN stays float32: exact search).
Batch = 1 sample; samples/s = 1 / the total.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import cpu_model  # noqa: E402

VIEWS = 5
TRAIN_SAMPLES = 250
STAGES = ("encode", "inversion", "features", "knn", "post")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_parts(image: int, full_unet: bool = False) -> tuple[SimpleNamespace, dict]:
    """``configs/demo.yaml``'s model; ``full_unet``: its U-Net at the views' size instead of
    ``model.unet_image_size`` (how the demo ran before that option)."""
    import yaml

    from vsad_lightning.models.backbones import build_backbone

    with open(os.path.join(REPO, "configs", "demo.yaml")) as f:
        model = yaml.safe_load(f)["model"]
    unet_size = model.get("unet_image_size")
    model["unet_image_size"] = image if full_unet or unet_size is None else min(unet_size, image)
    parts = build_backbone(
        "tiny", image_size=model["unet_image_size"], tiny_encoder=model["tiny_encoder"]
    )
    return parts, model


def sd2_parts(image: int) -> tuple[SimpleNamespace, dict]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from vsad_lightning.models.backbones import tiny_noise_scheduler
    from vsad_lightning.models.encoders import VAEEncoder

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=image // 8,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=image,
        scaling_factor=0.18215,
    ).eval()
    parts = SimpleNamespace(
        unet=unet,
        encoder=VAEEncoder(vae),
        scheduler=tiny_noise_scheduler(),  # SD2's schedule (see backbones.tiny_noise_scheduler)
        prompt_embedding=torch.zeros(1, 77, 1024),
    )
    # VSADModule's defaults (vsad_lightning/system/module.py).
    model = {
        "feature_levels": [-2, -1],
        "attention_dim": 64,
        "num_heads": 4,
        "window": 3,
        "num_frequencies": 4,
        "feature_mode": "inversion",
        "t_star": 200,
        "inversion_steps": 5,
        "sigma": 4.0,
        "knn_backend": "auto",
        "neighbour_graph": "top_and_ring",
    }
    return parts, model


CONFIGS = {
    "tiny": tiny_parts,
    "tiny_full_unet": lambda image: tiny_parts(image, full_unet=True),
    "sd2": sd2_parts,
}


class Pipeline:
    """The pieces ``VSADModule.score`` chains, callable one stage at a time."""

    def __init__(self, parts, model: dict, image: int, device, dtype, bank_ratio: float) -> None:
        from _mvam_levels import level_homographies

        from vsad_lightning.bank.storage import MemoryBank
        from vsad_lightning.geometry.projection import neighbour_mask
        from vsad_lightning.models.features import FeatureExtractor
        from vsad_lightning.models.unet import ViewAlignedUNet

        self.device, self.dtype, self.image = device, dtype, image
        self.unet_image = int(model.get("unet_image_size") or image)  # model.unet_image_size
        self.encoder = parts.encoder.to(device).eval()
        self.scheduler = parts.scheduler
        self.prompt = parts.prompt_embedding.to(device)
        self.unet = ViewAlignedUNet(
            parts.unet,
            feature_levels=model["feature_levels"],
            attention_dim=model["attention_dim"],
            num_heads=model["num_heads"],
            window=model["window"],
            num_frequencies=model["num_frequencies"],
            train_unet="none",
        ).to(device)
        self.unet.eval()
        self.extractor = FeatureExtractor(
            mode=model["feature_mode"], t_star=model["t_star"], num_steps=model["inversion_steps"]
        )
        self.sigma = model["sigma"]
        self.backend = model["knn_backend"]
        # The config's scoring options (configs/demo.yaml sets all three; sd2: the defaults).
        self.latent_weight = float(model.get("latent_weight", 0.0))
        self.feature_norm = model.get("feature_norm", "none")
        self.radius = model["positional_radius"] if model.get("bank_mode") == "positional" else None
        self.homographies = level_homographies(1, VIEWS, image, image).to(device)
        self.mask = neighbour_mask("top_and_ring", VIEWS).to(device)
        self.images = torch.rand(1, VIEWS, 3, image, image, device=device)
        self.bank = MemoryBank().to(device)
        self.bank_ratio = bank_ratio
        self.bank_rows: dict[int, tuple[int, int]] = {}

    def _ensure_bank(self, features: dict) -> None:
        """Random banks of the projected size, shaped by the first sample's features.

        A positional bank keeps every training feature map (no coreset: whole maps of all
        ``TRAIN_SAMPLES``); a global one ``bank_ratio`` of the rows (a coreset's size).
        """
        if self.bank_rows:
            return
        generator = torch.Generator().manual_seed(0)
        for level, feats in features.items():
            _, _, channels, h, w = feats.shape
            if self.radius is not None:
                rows, grid = TRAIN_SAMPLES * VIEWS * h * w, (VIEWS, h, w)
            else:
                rows, grid = max(1, round(TRAIN_SAMPLES * VIEWS * h * w * self.bank_ratio)), None
            bank = torch.randn(rows, channels, generator=generator)
            self.bank.set_level(level, bank, grid=grid)
            self.bank_rows[level] = (rows, channels)

    def autocast(self):
        enabled = self.dtype != torch.float32
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    def encode(self, images=None):
        images = self.images if images is None else images
        return self.encoder(images.flatten(0, 1)).unflatten(0, (1, VIEWS))

    def unet_latents(self, latents):
        """What ``VSADModel.unet_latents`` feeds the U-Net: the views resized by area to
        ``unet_image_size``, encoded (the full-size latents when the sizes are equal)."""
        if self.unet_image == self.image:
            return latents
        size = (self.unet_image, self.unet_image)
        small = torch.nn.functional.interpolate(self.images.flatten(0, 1), size=size, mode="area")
        return self.encode(small.unflatten(0, (1, VIEWS)))

    def run(self, z, t: int, capture: bool):
        timesteps = torch.full((1,), t, dtype=torch.long, device=self.device)
        return self.unet(
            z,
            timesteps,
            self.prompt,
            self.homographies,
            (self.image, self.image),
            self.mask,
            capture=capture,
        )

    @torch.no_grad()
    def sample(self, before: bool = False) -> dict[str, float]:
        """One sample through every stage: seconds per stage.

        ``before``: with the code paths as they were before the speed work (the previous MVAM
        forward, benchmarks/_mvam_before.py, and the previous positional search,
        benchmarks/_positional_before.py), to time old and new side by side in one run.
        """
        if not before:
            return self._sample()
        from _mvam_before import before as mvam_before
        from _positional_before import positional_search

        import vsad_lightning.bank.storage as storage

        current = storage.positional_search
        storage.positional_search = positional_search
        try:
            with mvam_before():
                return self._sample()
        finally:
            storage.positional_search = current

    def _sample(self) -> dict[str, float]:
        from vsad_lightning.models.features import LATENT_LEVEL, normalise_features
        from vsad_lightning.models.scoring import (
            anomaly_maps,
            level_distance_maps,
            sample_scores,
            view_scores,
        )

        times = {}

        def mark(stage: str, start: float) -> float:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            times[stage] = now - start
            return now

        start = time.perf_counter()
        with self.autocast():
            latents = self.encode().float()
            unet_latents = self.unet_latents(latents).float()
            start = mark("encode", start)
            z_star = self.extractor._noised_latents(
                self.run,
                unet_latents,
                self.scheduler.alphas_cumprod,
                self.scheduler.config.prediction_type,
            )
            start = mark("inversion", start)
            features = dict(self.run(z_star, self.extractor.t_star, True).features)
            if self.latent_weight > 0:
                features[LATENT_LEVEL] = latents  # model.latent_weight: one more level
            features = {level: f.float() for level, f in features.items()}
            features = normalise_features(features, self.feature_norm)
            start = mark("features", start)
        self._ensure_bank(features)  # first sample only; not timed
        start = time.perf_counter()
        distances = level_distance_maps(
            self.bank, features, backend=self.backend, positional_radius=self.radius
        )
        start = mark("knn", start)
        weights = {level: 1.0 for level in distances}
        if LATENT_LEVEL in weights:
            weights[LATENT_LEVEL] = self.latent_weight
        maps = anomaly_maps(distances, (self.image, self.image), weights, sigma=self.sigma)
        sample_scores(view_scores(maps)).cpu()
        mark("post", start)
        return times


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["tiny", "sd2"],
        choices=list(CONFIGS),
        help="tiny: configs/demo.yaml's model (its U-Net at model.unet_image_size); "
        "tiny_full_unet: the same with the U-Net at the views' size; sd2: SD2 widths",
    )
    parser.add_argument("--sizes", nargs="+", type=int, default=[256])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed samples first (tiny)")
    parser.add_argument(
        "--sd2-warmup",
        type=int,
        default=None,
        help="untimed samples for sd2 (default: --warmup; 0 on a CPU, where one sd2 sample "
        "takes minutes and its one-time costs are negligible)",
    )
    parser.add_argument(
        "--bank-ratio",
        type=float,
        default=0.01,
        help="bank rows per level as a fraction of 250 samples x 5 views x h x w (default 0.01)",
    )
    parser.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the code paths as they were before the speed work, interleaved with "
        "the current ones (rows 'before' and 'now' and their ratio)",
    )
    parser.add_argument("--out", help="markdown output (default: results/latency_<hw>.md)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    hw = hardware(device)
    out_path = args.out
    if out_path is None:
        tag = "cpu" if device.type == "cpu" else re.sub(r"[^A-Za-z0-9]+", "_", hw).strip("_")
        out_path = os.path.join(REPO, "benchmarks", "results", f"latency_{tag.lower()}.md")

    from vsad_lightning.utils.io import atomic_write_text

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    command = "python " + " ".join(["benchmarks/latency.py", *sys.argv[1:]])
    say("# Inference latency per test sample (5 views), by stage\n")
    say(
        f"Generated by `{command}` on **{hw}**, torch {torch.__version__}, dtype {args.dtype}, "
        f"load average {os.getloadavg()[0]:.1f} at the start. Median of {args.repeats} samples "
        "after the warm-up samples in the table; random weights (latency does not depend on "
        f"them); random banks: global ones of {args.bank_ratio:g} x 250 samples x 5 views x h x w "
        "rows per level (a coreset), positional ones of all 250 samples' feature maps.\n"
    )
    say(
        "| config | code | image | U-Net image | U-Net passes | warm-up samples | bank | "
        "bank rows per level (N x C) | "
        + " | ".join(f"{s} s" for s in STAGES)
        + " | total s | samples/s |"
    )
    say("|---|---|---|---|---|---|---|---|" + "---|" * (len(STAGES) + 2))
    for config in args.configs:
        for image in args.sizes:
            parts, model = CONFIGS[config](image)
            pipeline = Pipeline(parts, model, image, device, dtype, args.bank_ratio)
            del parts
            sd2 = config == "sd2"
            warmup = args.sd2_warmup if sd2 and args.sd2_warmup is not None else args.warmup
            paths = ["before", "now"] if args.compare else ["now"]
            runs: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
            for repeat in range(warmup + args.repeats):
                for path in paths:  # interleaved: old and new see the same machine load
                    times = pipeline.sample(before=path == "before")  # 1st: kNN caches too
                    if repeat >= warmup:
                        runs[path].append(times)
            passes = (model["inversion_steps"] if model["feature_mode"] == "inversion" else 0) + 1
            banks = ", ".join(f"{n:,}x{c}" for n, c in pipeline.bank_rows.values())
            bank_kind = (
                f"positional r={pipeline.radius}" if pipeline.radius is not None else "global"
            ) + (f", latent x{pipeline.latent_weight:g}" if pipeline.latent_weight > 0 else "")
            medians = {}
            for path in paths:
                medians[path] = {s: statistics.median(r[s] for r in runs[path]) for s in STAGES}
                total = sum(medians[path].values())
                say(
                    f"| {config} | {path} | {image} | {pipeline.unet_image} | {passes} | {warmup} "
                    f"| {bank_kind} | "
                    f"{banks} | "
                    + " | ".join(f"{medians[path][s]:.3f}" for s in STAGES)
                    + f" | {total:.3f} | {1 / total if total > 0 else math.inf:.3f} |"
                )
            if args.compare:
                ratio = {s: medians["before"][s] / max(medians["now"][s], 1e-9) for s in STAGES}
                total = sum(medians["before"].values()) / sum(medians["now"].values())
                say(
                    f"| {config} | speed-up (before / now) | {image} | | | | | | "
                    + " | ".join(f"{ratio[s]:.2f}x" for s in STAGES)
                    + f" | {total:.2f}x | |"
                )
            del pipeline
            # Written after every row: a slow configuration cut short keeps the earlier ones.
            atomic_write_text(out_path, "\n".join(lines) + "\n")
    say(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    print(f"latency: {out_path}")


if __name__ == "__main__":
    main()
