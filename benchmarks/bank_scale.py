"""Memory-bank scale: projected size for a Real-IAD category, streaming build memory and time.

Usage: ``python benchmarks/bank_scale.py [--quick] [--out benchmarks/results/bank_scale.md]``.

Five parts (docs/method.md#memory-bank; ``--parts`` picks them):

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
4. **A category, built and scored** (``--category-samples``, default 1,000; ``--parts 4`` to
   skip parts 2-3): SD2's two scored levels at 256 px (640 x 32 x 32 and 320 x 32 x 32 per
   view, 5 views), synthetic features with a decaying spectrum (rows = ``z diag(s) Q`` over 32
   directions with ``s_k = exp(-k / 8)``, plus isotropic noise holding ~0.2 % of the variance,
   like the measured banks whose 99 % of the variance sits in a few dozen directions; not
   i.i.d. noise), streamed through ``StreamingBankBuilder`` in float16 into a float16
   ``MemoryBank``, then two test samples scored: ``positional`` (every map kept, radius 2) and
   ``global`` (``--category-ratio`` coreset, default 0.01, the ``auto`` search). Each in its own
   subprocess; peak RSS = VmHWM above the RSS before the build. ``--category-modes`` picks the
   modes, ``--category-run`` builds fewer samples and extrapolates.
5. **Coreset selection vs N, plain and pruned side by side**: ``greedy_coreset`` with
   ``method="plain"`` (every row against every new centre) and ``method="pruned"`` (blocks of
   nearby rows, lazy catch-up) on the same rows with part 4's spectrum, as the builder's
   128-column projections; the plain loop only up to ``--coreset-plain-max`` (its work grows as
   ratio N^2), the pruned one up to 5.12 M rows, a 1,000-sample category's level.
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


CATEGORY_LEVELS = {2: (640, 32), 3: (320, 32)}  # SD2 up block: (channels, side) at 256 px


def _spectrum_basis(generator, channels: int):
    """``(32, channels)``: 32 random orthonormal directions scaled by ``s_k = exp(-k / 8)``, the
    decaying spectrum of parts 4 and 5."""
    import torch

    q, _ = torch.linalg.qr(torch.randn(channels, 32, generator=generator))
    return (q * torch.exp(-torch.arange(32.0) / 8.0)).T.contiguous()


def _category_rows(generator, samples: int, channels: int, side: int, basis):
    """``(samples V side^2, C)`` float32 rows with the decaying spectrum of part 4."""
    import torch

    rows = samples * VIEWS * side * side
    z = torch.randn(rows, basis.shape[0], generator=generator)
    out = z @ basis
    out += 0.01 * torch.randn(rows, channels, generator=generator)
    return out


def category_child(mode: str, samples: int, ratio: float) -> None:
    import statistics

    import torch

    from vsad_lightning.bank.builder import StreamingBankBuilder
    from vsad_lightning.bank.storage import MemoryBank

    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    bases = {
        level: _spectrum_basis(generator, channels)
        for level, (channels, _) in CATEGORY_LEVELS.items()
    }
    reset = reset_peak_rss()
    before = status_kib("VmRSS") if reset else status_kib("VmHWM")
    start = time.perf_counter()
    builder = StreamingBankBuilder(
        coreset_ratio=1.0 if mode == "positional" else ratio, dtype=torch.float16
    )
    batch = 4
    with torch.no_grad():
        for b0 in range(0, samples, batch):
            n = min(batch, samples - b0)
            for level, (channels, side) in CATEGORY_LEVELS.items():
                rows = _category_rows(generator, n, channels, side, bases[level])
                builder.add(level, rows, n)
        del rows
        bank = MemoryBank(dtype=torch.float16)
        for level, rows in builder.build():
            side = CATEGORY_LEVELS[level][1]
            bank.set_level(level, rows, grid=(VIEWS, side, side) if mode == "positional" else None)
            del rows
    build_seconds = time.perf_counter() - start
    build_peak = status_kib("VmHWM")
    times = []
    with torch.no_grad():
        for _ in range(3):  # the first builds the per-bank caches (norms, index): not counted
            start = time.perf_counter()
            for level, (channels, side) in CATEGORY_LEVELS.items():
                rows = _category_rows(generator, 1, channels, side, bases[level])
                feats = rows.view(1, VIEWS, side, side, channels).permute(0, 1, 4, 2, 3)
                if mode == "positional":
                    bank.positional_distances(level, feats, 2)
                else:
                    bank.distances(level, rows)
            times.append(time.perf_counter() - start)
    peak = status_kib("VmHWM")
    print(
        "RESULT "
        + json.dumps(
            {
                "build_seconds": build_seconds,
                "score_seconds": statistics.median(times[1:]),
                "build_peak_gib": max(0, build_peak - before) / 2**20,
                "peak_gib": max(0, peak - before) / 2**20,
                "bank_gib": sum(bank.bank(level).numel() * 2 for level in bank.levels) / 2**30,
                "rows": {str(level): bank.bank(level).shape[0] for level in bank.levels},
                "ratio": 1.0 if mode == "positional" else ratio,
            }
        )
    )


def category_section(args, say) -> None:
    full = args.category_samples
    say(
        f"\n## 4. One category built and scored (SD2 levels 640x32x32 + 320x32x32 at 256 px, "
        f"5 views, float16, decaying spectrum)\n\n{full:,} samples asked"
        + (
            f"; measured at {args.category_run:,} samples and extrapolated to N: the bank, the "
            "positional build and search are linear in N, the global coreset's greedy selection "
            "is O(ratio N^2); the positional peaks grow by the bank's extra bytes (the search and "
            "build buffers are bounded by max_chunk_bytes and piece_rows), the global ones "
            "linearly (the coreset's projected rows grow with N)"
            if args.category_run < full
            else ""
        )
        + ". Peak GiB = VmHWM above the RSS before the build (2 torch threads).\n"
    )
    say(
        "| mode | samples | coreset ratio | bank rows per level | bank GiB | build s | "
        "build peak GiB | peak GiB (build + scoring) | s per test sample |"
    )
    say("|---|---|---|---|---|---|---|---|---|")
    for mode in args.category_modes:
        out = _spawn_category(mode, args.category_run, args.category_ratio)
        rows = ", ".join(f"{n:,}" for n in out["rows"].values())
        say(
            f"| {mode} | {args.category_run:,} | {out['ratio']} | {rows} | {out['bank_gib']:.2f} | "
            f"{out['build_seconds']:.1f} | {out['build_peak_gib']:.2f} | {out['peak_gib']:.2f} | "
            f"{out['score_seconds']:.2f} |"
        )
        if args.category_run < full:
            k = full / args.category_run
            build = out["build_seconds"] * (k if mode == "positional" else k * k)
            # Positional: the bank grows with N, the search's and the builder's buffers are
            # bounded (max_chunk_bytes, piece_rows), so the peaks grow by the bank's extra
            # bytes. Global: the coreset's projected rows and selection (~3 N k floats) grow
            # with N too, so the peaks are scaled linearly (an upper estimate).
            if mode == "positional":
                grow_build = grow = (k - 1) * out["bank_gib"]
            else:
                grow_build = (k - 1) * out["build_peak_gib"]
                grow = (k - 1) * out["peak_gib"]
            say(
                f"| {mode}, extrapolated | {full:,} | {out['ratio']} | x{k:g} | "
                f"{out['bank_gib'] * k:.2f} | ~{build:.0f} | "
                f"~{out['build_peak_gib'] + grow_build:.1f} | "
                f"~{out['peak_gib'] + grow:.1f} | ~{out['score_seconds'] * k:.1f} |"
            )


def _spectrum_rows(num_rows: int, dim: int = PROJECTION_DIM, seed: int = 0):
    """``(num_rows, dim)`` rows as the builder's projections of part 4's features look: 32
    directions with ``s_k = exp(-k / 8)`` plus 1 % isotropic noise."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    basis = _spectrum_basis(generator, dim)
    out = torch.empty(num_rows, dim)
    for r0 in range(0, num_rows, 1 << 20):  # pieces: no second full-size temporary
        r1 = min(num_rows, r0 + (1 << 20))
        torch.matmul(torch.randn(r1 - r0, 32, generator=generator), basis, out=out[r0:r1])
        out[r0:r1] += 0.01 * torch.randn(r1 - r0, dim, generator=generator)
    return out


def selection_section(args, say) -> None:
    """5. The greedy selection alone, plain and pruned side by side on the same rows."""
    import torch

    from vsad_lightning.bank.coreset import greedy_coreset

    say(
        f"\n## 5. Coreset selection time vs N: plain and pruned greedy, side by side\n\n"
        f"`greedy_coreset(method=...)` on the same rows, as the builder hands them over: "
        f"projected to {PROJECTION_DIM} columns (`_spectrum_rows`: 32 directions, "
        f"`s_k = exp(-k/8)`, 1 % isotropic noise), {torch.get_num_threads()} torch threads, "
        "one after the other in this process. 'same rows' compares the two selections as sets; "
        "their order may differ where two rows are equally far up to rounding.\n"
    )
    say("| ratio | N | kept | plain s | pruned s | plain / pruned | same rows |")
    say("|---|---|---|---|---|---|---|")
    plain_max = 40_960 if args.quick else args.coreset_plain_max
    plan = {
        0.01: [81_920, 327_680, 1_310_720, 5_120_000],
        0.1: [40_960, 81_920, 327_680, 1_280_000],
    }
    if args.quick:
        plan = {0.01: [40_960, 163_840], 0.1: [20_480, 40_960]}
    for ratio, ns in plan.items():
        for n in ns:
            rows = _spectrum_rows(n)
            start = time.perf_counter()
            pruned = greedy_coreset(rows, ratio, method="pruned")
            pruned_s = time.perf_counter() - start
            plain_s, same, speedup = "not run", "", ""
            if ratio * n * n <= 0.01 * plain_max**2:  # the plain loop's work, ratio N^2
                start = time.perf_counter()
                plain = greedy_coreset(rows, ratio, method="plain")
                seconds = time.perf_counter() - start
                plain_s, speedup = f"{seconds:.1f}", f"{seconds / pruned_s:.1f}x"
                same = "yes" if set(plain.tolist()) == set(pruned.tolist()) else "no"
            say(
                f"| {ratio} | {n:,} | {pruned.numel():,} | {plain_s} | {pruned_s:.1f} | "
                f"{speedup} | {same} |"
            )
            del rows


def _spawn_category(mode: str, samples: int, ratio: float) -> dict:
    return spawn_worker(__file__, ["--category-worker", mode, str(samples), str(ratio)])


def _spawn(*args) -> dict:
    return spawn_worker(__file__, ["--worker", *args])


# ------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--out", help="also write the report as a markdown file")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--category-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3, 4, 5])
    parser.add_argument("--category-samples", type=int, default=1000)
    parser.add_argument(
        "--category-run",
        type=int,
        default=None,
        help="samples actually built in part 4 (default: --category-samples); the rest is "
        "extrapolated",
    )
    parser.add_argument("--category-ratio", type=float, default=0.01)
    parser.add_argument(
        "--category-modes", nargs="+", default=["positional", "global"], help="part 4's modes"
    )
    parser.add_argument(
        "--coreset-plain-max",
        type=int,
        default=327_680,
        help="part 5: the plain greedy is timed where ratio N^2 <= 0.01 x this^2 (it is "
        "O(ratio N^2): the default times it up to 327,680 rows at ratio 0.01, 103,622 at 0.1)",
    )
    args = parser.parse_args()
    if args.worker:
        method, samples, rows_per_sample, dim, ratio = args.worker
        child(method, int(samples), int(rows_per_sample), int(dim), float(ratio))
        return
    if args.category_worker:
        mode, samples, ratio = args.category_worker
        category_child(mode, int(samples), float(ratio))
        return
    if args.category_run is None:
        args.category_run = args.category_samples

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
    if 2 in args.parts or 3 in args.parts:
        build_sections(args, say, sizes)
    if 4 in args.parts:
        category_section(args, say)
    if 5 in args.parts:
        selection_section(args, say)
    say(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if args.out:
        from vsad_lightning.utils.io import atomic_write_text

        atomic_write_text(args.out, "\n".join(lines) + "\n")


def build_sections(args, say, sizes) -> None:
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


if __name__ == "__main__":
    main()
