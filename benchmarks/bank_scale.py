"""Memory-bank scale: projected size for a Real-IAD category, streaming build memory and time.

Usage: ``python benchmarks/bank_scale.py [--quick] [--out benchmarks/results/bank_scale.md]``.

Three parts (docs/method.md#memory-bank):

1. **Projection.** Bank rows per level = training samples x views x positions of the level, for
   Stable Diffusion 2 base's U-Net at 256x256 (and 512x512) input. The level shapes are read
   from diffusers' ``UNet2DConditionModel`` built with SD2's layout on the ``meta`` device (no
   weights, no download): channels of ``up_blocks[l].resnets[-1]`` and the spatial size after
   the down/up samplers, as ``ViewAlignedUNet`` captures them. Sizes for all rows and coreset
   ratios 0.1 / 0.01, in float32 and float16; "last two" levels are the default
   ``feature_levels: [-2, -1]``, "last three" adds ``-3``.
2. **Peak memory of the build** at a reduced scale, each in its own subprocess (peak RSS via
   ``VmHWM`` after resetting it, as ``benchmarks/_mvam_levels.py`` does): the callback's
   in-memory path (a list of batch rows, ``torch.cat``, ``greedy_coreset`` on all rows, index)
   against ``StreamingBankBuilder`` (spill file + projections only). Feature batches are drawn
   on the fly from a seeded generator, standing in for extraction, so only the build is
   measured.
3. **Coreset build time vs N** for the streaming builder (spill, projected greedy selection,
   read-back) at ratios 0.1 and 0.01, D = 640, and its ``N^2`` extrapolation to a full level.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import reset_peak_rss, spawn_worker, status_kib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TRAIN_SAMPLES = 250
VIEWS = 5
PROJECTION_DIM = 128


# --------------------------------------------------------------------------------- projection
def sd2_levels(image_side: int) -> dict[int, tuple[int, int]]:
    """``{up block: (channels, side)}`` of SD2 base's decoder for a square input image."""
    import torch
    from diffusers import UNet2DConditionModel

    latent = image_side // 8  # SD2's VAE downsamples by 8
    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=latent,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        )
    side = latent // 2 ** sum(b.downsamplers is not None for b in unet.down_blocks)
    levels = {}
    for index, block in enumerate(unet.up_blocks):
        if block.upsamplers is not None:
            side *= 2
        levels[index] = (block.resnets[-1].out_channels, side)
    return levels


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:,.2f}"


def projection_table(say) -> dict:
    say("## 1. Projected bank size, one Real-IAD category (SD2 base widths)\n")
    say(
        f"{TRAIN_SAMPLES} training samples x {VIEWS} views x positions per level; GB = 1e9 "
        "bytes. Streaming RAM (coreset 0.1) is the builder's peak estimated from its design: "
        "3 N x 128 float32 for the projected selection of the largest level, plus the kept rows "
        "of every level in float32 (as built) and in float16 (the bank's copy); its spill files "
        "need N x D x 4 bytes of disk per level. The in-memory path needs at least twice the "
        "'all fp32' column (batch list + concatenation).\n"
    )
    say(
        "| image | levels | level shapes (C x h x w) | rows N | all fp32 GB | all fp16 GB | "
        "coreset 0.1 fp16 GB | coreset 0.01 fp16 GB | streaming RAM GB (coreset 0.1) |"
    )
    say("|---|---|---|---|---|---|---|---|---|")
    out = {}
    for image in (256, 512):
        levels = sd2_levels(image)
        last = sorted(levels)[-3:]
        for name, chosen in (("last two", last[-2:]), ("last three", last)):
            rows = {lvl: TRAIN_SAMPLES * VIEWS * levels[lvl][1] ** 2 for lvl in chosen}
            elements = sum(rows[lvl] * levels[lvl][0] for lvl in chosen)
            largest = max(rows.values())
            streaming = 3 * largest * PROJECTION_DIM * 4
            shapes = ", ".join(
                f"{levels[lvl][0]}x{levels[lvl][1]}x{levels[lvl][1]}" for lvl in chosen
            )
            say(
                f"| {image} | {name} | {shapes} | {sum(rows.values()):,} | {_gb(4 * elements)} | "
                f"{_gb(2 * elements)} | {_gb(0.2 * elements)} | {_gb(0.02 * elements)} | "
                f"{_gb(streaming + 0.1 * (4 + 2) * elements)} |"
            )
            out[(image, name)] = {"rows": rows, "elements": elements}
    return out


# ----------------------------------------------------------------------------- build (child)


def child(method: str, samples: int, rows_per_sample: int, dim: int, ratio: float) -> None:
    import torch

    from vsad_lightning.bank.builder import StreamingBankBuilder
    from vsad_lightning.bank.coreset import greedy_coreset

    torch.set_num_threads(1)  # the coreset loop's small vector ops: see benchmarks/knn.py
    batch = 4
    generator = torch.Generator().manual_seed(0)

    def batches():
        for b0 in range(0, samples, batch):
            n = min(batch, samples - b0)
            yield torch.randn(n * rows_per_sample, dim, generator=generator), n

    reset = reset_peak_rss()
    before = status_kib("VmRSS") if reset else status_kib("VmHWM")
    start = time.perf_counter()
    with torch.no_grad():
        if method == "in-memory":
            # MemoryBankCallback's default path (one process): collect, cat, select, index.
            parts = [rows for rows, _ in batches()]
            rows = torch.cat(parts)
            del parts
            if ratio < 1.0:
                rows = rows[greedy_coreset(rows, ratio, projection_dim=PROJECTION_DIM)]
            bank = rows
        else:
            builder = StreamingBankBuilder(coreset_ratio=ratio, projection_dim=PROJECTION_DIM)
            for rows, n in batches():
                builder.add(0, rows, n)
            del rows
            bank = dict(builder.build())[0]
    seconds = time.perf_counter() - start
    peak = status_kib("VmHWM")
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": seconds,
                "peak_mib": max(0, peak - before) / 1024,
                "bank_rows": bank.shape[0],
                "bank_mib": bank.numel() * 4 / 2**20,
            }
        )
    )


def _spawn(*args) -> dict:
    return spawn_worker(__file__, ["--worker", *args])


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--out", help="also write the report as a markdown file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, samples, rows_per_sample, dim, ratio = args.worker
        child(method, int(samples), int(rows_per_sample), int(dim), float(ratio))
        return

    import platform

    import torch

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    command = "python " + " ".join(["benchmarks/bank_scale.py", *sys.argv[1:]])
    say("# Memory-bank scale\n")
    say(
        f"Generated by `{command}` on {platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__}, load average {os.getloadavg()[0]:.1f} at the start (a shared "
        "machine: timings are noisy).\n"
    )
    sizes = projection_table(say)

    # 2. Peak memory of the build at a reduced scale: SD2's 640-wide level at 256 px has
    # 5 x 32 x 32 rows per sample; fewer samples than a category.
    samples = 8 if args.quick else 20
    rows_per_sample, dim = VIEWS * 32 * 32, 640
    num_rows = samples * rows_per_sample
    say(
        f"\n## 2. Build peak memory at a reduced scale\n\n{samples} samples x {rows_per_sample} "
        f"rows (5 views x 32 x 32) x D = {dim}: N = {num_rows:,} rows, "
        f"{num_rows * dim * 4 / 2**20:,.0f} MiB of float32 features; one process, one thread. "
        "Peak = VmHWM above the RSS before the build.\n"
    )
    say("| coreset ratio | method | peak MiB | peak / features | bank rows | seconds |")
    say("|---|---|---|---|---|---|")
    features_mib = num_rows * dim * 4 / 2**20
    peaks = {}
    for ratio in (1.0, 0.01):
        for method in ("in-memory", "streaming"):
            out = _spawn(method, samples, rows_per_sample, dim, ratio)
            peaks[(ratio, method)] = out["peak_mib"]
            say(
                f"| {ratio} | {method} | {out['peak_mib']:,.0f} | "
                f"{out['peak_mib'] / features_mib:.2f} | {out['bank_rows']:,} | "
                f"{out['seconds']:.1f} |"
            )

    # 3. Coreset build time vs N (streaming builder, one thread).
    say("\n## 3. Streaming coreset build time vs N (D = 640, projection 128, one thread)\n")
    say("| ratio | N | seconds | seconds / N^2 x 1e9 |")
    say("|---|---|---|---|")
    plan = {0.1: [10_240, 20_480], 0.01: [10_240, 40_960]}
    if not args.quick:
        plan = {0.1: [10_240, 20_480, 40_960], 0.01: [20_480, 40_960, 102_400]}
    fits = {}
    for ratio, ns in plan.items():
        for n in ns:
            out = _spawn(
                "streaming", n // rows_per_sample or 1, min(n, rows_per_sample), 640, ratio
            )
            rows = (n // rows_per_sample or 1) * min(n, rows_per_sample)
            fits.setdefault(ratio, []).append(out["seconds"] / rows**2)
            per = out["seconds"] / rows**2 * 1e9
            say(f"| {ratio} | {rows:,} | {out['seconds']:.1f} | {per:.2f} |")
    full = sizes[(256, "last two")]["rows"]
    largest = max(full.values())
    say(
        f"\nGreedy selection is O(ratio N^2 k): extrapolating the largest measured N's "
        f"seconds / N^2 to one 256 px level of N = {largest:,} rows (one thread): "
        + ", ".join(f"ratio {r}: ~{f[-1] * largest**2 / 3600:.1f} h" for r, f in fits.items())
        + ". That is why the projected selection matters, and why a GPU (the same code runs "
        "on CUDA tensors) or a lower ratio is the practical route at full scale."
    )
    say(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.out:
        from vsad_lightning.utils.io import atomic_write_text

        atomic_write_text(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
