"""MVAM cost per decoder level: forward + backward time and the bytes it gathers.

Run: ``python benchmarks/bench_mvam.py [--sections tiny sd2 scaling] [--repeats 5] [--json out]``.

Each *section* is a function returning rows (dicts); ``SECTIONS`` maps names to them, so a new
comparison (e.g. the plain U-Net against the view-aligned one) is one more function and one
more entry. Sections:

- ``tiny``: the embedded tiny backbone (channels 32/64/128, 128-pixel images, pixel-unshuffle
  by 4 → 32x32 latents, demo ``attention_dim`` 32), one MVAM per decoder level.
- ``sd2``: Stable Diffusion 2's decoder widths at a 16x16 latent (128-pixel images; the up
  blocks run at 2x2, 4x4, 8x8 and 16x16 with 1280/1280/640/320 channels), ``attention_dim`` 64.
- ``scaling``: 320/640/1280 channels on the same 16x16 map, then 32/64/128 attention widths at
  320 channels: the gathered bytes follow ``attention_dim`` and ignore the channel count.
- ``unet``: a whole training step of the tiny backbone, plain U-Net against the view-aligned
  one (MVAM only, FRM only, both, both with gradient checkpointing); see ``unet_section``.
- ``unet-sd2``: the same at Stable Diffusion 2 base's widths (320/640/1280/1280, random
  weights, 128 px -> 16x16 latents), decoder trainable (``train_unet="decoder"``).
- ``overhead`` (only when named): MVAM + FRM over the plain U-Net at SD2 widths and
  ``--sizes`` (default 256 and 512 px), the previous MVAM and the current one interleaved in one
  run, for a training step and for inference; see ``overhead_section``.

One sample of 5 views (Real-IAD), ``top_and_ring`` neighbours, R = 3, fp32 on CPU unless
``--bf16``. On a shared machine run with ``OMP_NUM_THREADS=1``: with more threads than free
cores the timings swing by 10x or more.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mvam_levels import bench_mvam_level  # noqa: E402

TINY_LEVELS = [  # (decoder up block, channels, latent side) for 128-pixel images
    (0, 128, 8),
    (1, 64, 16),
    (2, 32, 32),
]
SD2_LEVELS = [(0, 1280, 2), (1, 1280, 4), (2, 640, 8), (3, 320, 16)]


def tiny_section(args: argparse.Namespace) -> list[dict]:
    rows = []
    for block, channels, side in TINY_LEVELS:
        row = bench_mvam_level(
            channels, side, side, attention_dim=32, repeats=args.repeats, autocast_bf16=args.bf16
        )
        rows.append({"section": "tiny", "level": f"up{block}", **row})
    return rows


def sd2_section(args: argparse.Namespace) -> list[dict]:
    rows = []
    for block, channels, side in SD2_LEVELS:
        row = bench_mvam_level(
            channels, side, side, attention_dim=64, repeats=args.repeats, autocast_bf16=args.bf16
        )
        rows.append({"section": "sd2", "level": f"up{block}", **row})
    return rows


def scaling_section(args: argparse.Namespace) -> list[dict]:
    rows = []
    for channels, dim in [(320, 64), (640, 64), (1280, 64), (320, 32), (320, 128)]:
        row = bench_mvam_level(
            channels, 16, 16, attention_dim=dim, repeats=args.repeats, autocast_bf16=args.bf16
        )
        rows.append({"section": "scaling", "level": "16x16", **row})
    return rows


# ==============================================================================================
# Section "unet": the plain U-Net against the view-aligned one (a whole training step).
# ----------------------------------------------------------------------------------------------
# One step of ``diffusion_objective`` (forward + backward, the same L_d + 0.1 L_r in every row)
# on the tiny backbone: 128-pixel images (32x32 latents, 48 channels), one sample of 5 views,
# ``top_and_ring`` neighbours, ``train_unet="all"``, demo ``attention_dim`` 32. Rows: ``plain``
# (no MVAM, no FRM), ``mvam`` (6 MVAMs, one per decoder ResBlock), ``frm`` (FRM on the last two
# levels), ``both`` (MVAM and FRM) and ``ckpt`` (both, with gradient checkpointing). The
# zero-initialised outputs (MVAM W_o, FRM W_2) are set to small random values so the backward
# pass does all of its work. Column ``C`` is the number of MVAMs; ``h x w`` the latent size.
UNET_VARIANTS = [  # (row name, use_mvam, use_frm, gradient_checkpointing)
    ("plain", False, False, False),
    ("mvam", True, False, False),
    ("frm", False, True, False),
    ("both", True, True, False),
    ("ckpt", True, True, True),
]


def _sd2_width_backbone(latent_side: int):
    """SD2 base's U-Net layout and widths, random weights, with a zero prompt (no download)."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from vsad_lightning.models.backbones import tiny_noise_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent_side,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    )
    return SimpleNamespace(
        unet=unet,
        scheduler=tiny_noise_scheduler(),
        prompt_embedding=torch.zeros(1, 77, 1024),
        downsample_factor=8,
        latent_channels=4,
    )


def unet_section(args: argparse.Namespace) -> list[dict]:
    return _unet_rows(args, "tiny", image=128, attention_dim=32, train_unet="all")


def unet_sd2_section(args: argparse.Namespace) -> list[dict]:
    # SD2 widths at a small latent (128 px -> 16x16); decoder trainable so the plain row has a
    # backward pass too.
    return _unet_rows(args, "sd2", image=128, attention_dim=64, train_unet="decoder")


def _unet_rows(
    args: argparse.Namespace, widths: str, image: int, attention_dim: int, train_unet: str
) -> list[dict]:

    from _mvam_levels import level_homographies, measure_step

    from vsad_lightning.geometry.projection import neighbour_mask
    from vsad_lightning.models.backbones import build_backbone
    from vsad_lightning.models.objective import diffusion_objective
    from vsad_lightning.models.unet import ViewAlignedUNet

    views = 5
    rows = []
    for name, use_mvam, use_frm, checkpointing in UNET_VARIANTS:
        if widths == "tiny":
            backbone = build_backbone("tiny", image_size=image)
        else:
            backbone = _sd2_width_backbone(image // 8)
        torch.manual_seed(0)
        model = ViewAlignedUNet(
            backbone.unet,
            attention_dim=attention_dim,
            use_mvam=use_mvam,
            use_frm=use_frm,
            train_unet=train_unet,
            gradient_checkpointing=checkpointing,
        )
        with torch.no_grad():
            for aligner in model.aligners.values():
                aligner.to_out.weight.normal_(std=0.02)
            for refiner in model.refiners.values():
                refiner.out.weight.normal_(std=0.02)
        side = image // backbone.downsample_factor
        latents = torch.randn(1, views, backbone.latent_channels, side, side)
        H = level_homographies(1, views, image, image)
        mask = neighbour_mask("top_and_ring", views)

        def step(model=model, latents=latents, H=H, mask=mask, backbone=backbone) -> None:
            model.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                out = diffusion_objective(
                    model,
                    latents,
                    backbone.scheduler,
                    backbone.prompt_embedding,
                    H,
                    (image, image),
                    mask,
                    generator=torch.Generator().manual_seed(0),
                )
            out.loss.backward()

        measured = measure_step(step, args.repeats)
        rows.append(
            {
                "section": "unet" if widths == "tiny" else "unet-sd2",
                "level": name,
                "channels": len(model.aligners),
                "h": side,
                "w": side,
                "views": views,
                "batch": 1,
                "attention_dim": attention_dim if use_mvam else 0,
                "candidates": 1 + (views - 1) * 9 if use_mvam else 0,
                "dtype": "bf16-autocast" if args.bf16 else "fp32",
                "gathered_bytes": None,
                "input_bytes": latents.numel() * 4,
                **measured,
                "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
            }
        )
    return rows


# ==============================================================================================
# Section "overhead": MVAM + FRM over the plain U-Net, the previous MVAM and the current one
# side by side, interleaved in one run (so both ratios see the same machine load).
# ----------------------------------------------------------------------------------------------
# SD2 base's widths (random weights), ``--sizes`` image sides (latent = side / 8), one sample of
# 5 views, ``top_and_ring``, decoder trainable, ``attention_dim`` 64. Per repeat, in this order:
# the plain U-Net (MVAM hooks pass the ResBlock output through, FRM off), MVAM + FRM with the
# previous MVAM forward (every other view gathered, non-neighbours masked:
# benchmarks/_mvam_before.py), and MVAM + FRM as it is now (neighbour pairs only). Rows: a
# training step (``diffusion_objective`` forward + backward) and an inference pass
# (``no_grad``, one U-Net call with feature capture).
def overhead_section(args: argparse.Namespace) -> list[dict]:
    import contextlib

    from _mvam_before import before

    import vsad_lightning.models.unet as unet_module

    @contextlib.contextmanager
    def plain(model):
        hook = unet_module._AlignerHook.__call__
        unet_module._AlignerHook.__call__ = lambda self, module, inputs, output: output
        model.use_frm = False
        try:
            yield
        finally:
            unet_module._AlignerHook.__call__ = hook
            model.use_frm = True

    rows = []
    for image in args.sizes:
        rows += _overhead_rows(args, image, plain, before)
    return rows


def _overhead_rows(args: argparse.Namespace, image: int, plain, before) -> list[dict]:
    import contextlib
    import statistics
    import time

    from _mvam_levels import level_homographies

    from vsad_lightning.geometry.projection import neighbour_mask
    from vsad_lightning.models.objective import diffusion_objective
    from vsad_lightning.models.unet import ViewAlignedUNet

    views, rows = 5, []
    backbone = _sd2_width_backbone(image // 8)
    torch.manual_seed(0)
    model = ViewAlignedUNet(backbone.unet, attention_dim=64, train_unet="decoder")
    with torch.no_grad():
        for aligner in model.aligners.values():
            aligner.to_out.weight.normal_(std=0.02)
        for refiner in model.refiners.values():
            refiner.out.weight.normal_(std=0.02)
    side = image // 8
    latents = torch.randn(1, views, backbone.latent_channels, side, side)
    H = level_homographies(1, views, image, image)
    mask = neighbour_mask("top_and_ring", views)

    def train_step() -> None:
        model.zero_grad(set_to_none=True)
        out = diffusion_objective(
            model, latents, backbone.scheduler, backbone.prompt_embedding, H,
            (image, image), mask, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        out.loss.backward()

    def inference() -> None:
        with torch.no_grad():
            t = torch.full((1,), 200, dtype=torch.long)
            model(latents, t, backbone.prompt_embedding, H, (image, image), mask)

    variants = {"plain": lambda: plain(model), "before": before, "now": contextlib.nullcontext}
    if args.skip_before:  # plain and now only: a third less time (512 px steps take minutes)
        del variants["before"]
    for kind, run in (("train step", train_step), ("inference", inference)):
        times: dict[str, list[float]] = {name: [] for name in variants}
        for repeat in range(args.repeats + 1):  # the first round warms up, untimed
            for name, context in variants.items():
                with context():
                    start = time.perf_counter()
                    run()
                    if repeat:
                        times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {"section": "overhead", "image": image, "kind": kind, "repeats": args.repeats}
        row.update({f"{name}_s": value for name, value in med.items()})
        row["overhead_now"] = med["now"] / med["plain"] - 1
        previous = ""
        if "before" in med:
            row["overhead_before"] = med["before"] / med["plain"] - 1
            previous = f"before {med['before']:.2f} s (+{100 * row['overhead_before']:.0f} %), "
        print(
            f"overhead {image} px {kind}: plain {med['plain']:.2f} s, MVAM+FRM {previous}now "
            f"{med['now']:.2f} s (+{100 * row['overhead_now']:.0f} %)",
            flush=True,
        )
        rows.append(row)
    return rows


SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {
    "tiny": tiny_section,
    "sd2": sd2_section,
    "scaling": scaling_section,
    "unet": unet_section,
    "unet-sd2": unet_sd2_section,
    "overhead": overhead_section,
}


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def print_rows(rows: list[dict]) -> None:
    rows = [r for r in rows if r["section"] != "overhead"]  # printed as they are measured
    header = (
        f"{'section':8} {'level':6} {'C':>5} {'h x w':>7} {'D':>4} {'K':>3} "
        f"{'fwd+bwd ms (min/med)':>20} "
        f"{'gathered MiB':>12} {'input MiB':>9} {'prof peak MiB':>13} {'RSS peak MiB':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['section']:8} {r['level']:6} {r['channels']:>5} {r['h']:>3}x{r['w']:<3} "
            f"{r['attention_dim']:>4} {r['candidates']:>3} "
            f"{1000 * r['time_min_s']:>9.1f} /{1000 * r['time_s']:>9.1f} "
            f"{_mb(r['gathered_bytes']):>12} {_mb(r['input_bytes']):>9} "
            f"{_mb(r['profiler_peak_bytes']):>13} {_mb(r['rss_peak_delta_bytes']):>12}"
        )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = [name for name in SECTIONS if name != "overhead"]
    parser.add_argument("--sections", nargs="+", default=default, choices=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--sizes", nargs="+", type=int, default=[256, 512], help="image sides of 'overhead'"
    )
    parser.add_argument("--bf16", action="store_true", help="run MVAM under bf16 autocast")
    parser.add_argument(
        "--skip-before",
        action="store_true",
        help="'overhead': time the plain U-Net and MVAM + FRM now, not the previous MVAM",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    rows = [row for name in args.sections for row in SECTIONS[name](args)]
    print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
