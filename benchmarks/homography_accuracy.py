"""Benchmark: per-sample homographies against each sample's true ones (realistic synthetic rig).

Usage (not a test)::

    vsad-synth --rig realistic --out ROOT --categories all
    python benchmarks/homography_accuracy.py --root ROOT [--categories brick,gravel]
        [--split test] [--out benchmarks/results/homography_accuracy.md]

For every category of ``ROOT`` (those with ``ROOT/synthetic_truth/<category>_samples.json``,
the per-sample truth ``vsad-synth --rig realistic`` writes) and every sample of ``--split``,
the neighbour pairs of Real-IAD's ``top_and_ring`` graph (C1<->C2..C5, C2<->C3, C3<->C4,
C4<->C5, C5<->C2; both directions, 16 ordered pairs) are estimated by:

* ``prior``    the category cache alone (``vsad-homography``: SIFT on 8 normal training
               samples, pooled MAGSAC; built into ``ROOT/vsad_cache`` when missing);
* ``plain``    per-sample SIFT + ratio test + MAGSAC: the category estimator run on this one
               sample (``estimate_pair_from_features`` with its defaults, but 12 minimum
               inliers); the prior where it is unreliable;
* ``matched``  ``estimate_sample_homographies(refine=False)``: prior-guided matching and one
               MAGSAC fit;
* ``ours``     ``estimate_sample_homographies`` (matched, then the dense refinement, then
               the sanity checks), what ``vsad-homography --per-sample`` writes.

The category cache marks some side-to-side pairs unreliable (SIFT does not match two side
cameras 90 degrees apart often enough); it holds no homography for them, so ``prior``,
``plain`` and ``matched`` are compared on the pairs it holds (``cache pairs``), and ``ours``
is reported on those, on the others (``bridged``: composed through the top view from the
sample's own estimates, then refined directly; ``bridge_view``) and on all of them.

Error of one ordered pair of one sample: the mean transfer error (``transfer_error``, pixels)
over a 4 px grid of source-view points in the central half of the view (x and y in
``[W/4, 3W/4]``: on the part in every view of the rig; the truth file does not say where the
part is) whose image under the true homography lies inside the target view. The table
reports the median (and 90th percentile) of that error over all pairs of all samples, the
statuses of ``ours``, and ``ours``' milliseconds per sample per stage on one thread
(``cv2.setNumThreads(1)``, ``torch.set_num_threads(1)``; median over the samples).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import cpu_model  # noqa: E402

from vsad_lightning.data.dataset import read_sample_views  # noqa: E402
from vsad_lightning.data.homographies import ensure_homography_cache  # noqa: E402
from vsad_lightning.data.realiad import index_realiad  # noqa: E402
from vsad_lightning.geometry.cache import HomographyCache  # noqa: E402
from vsad_lightning.geometry.estimation import (  # noqa: E402
    detect_features,
    estimate_pair_from_features,
    transfer_error,
)
from vsad_lightning.geometry.per_sample import (  # noqa: E402
    SAMPLE_STATUSES,
    SampleHomographyFile,
    estimate_sample_homographies,
    graph_pairs,
    prior_pairs,
)

METHODS = ("prior", "plain", "matched", "ours")
STAGES = ("features", "match", "dense_images", "refine", "total")
TRUTH_DIR = "synthetic_truth"
GRID_STEP = 4


def evaluation_points(H_true: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Source points of the central half of the view whose true image is inside the target."""
    W, H = size
    xs = np.arange(W // 4, 3 * W // 4, GRID_STEP) + 0.5
    ys = np.arange(H // 4, 3 * H // 4, GRID_STEP) + 0.5
    points = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)
    mapped = points @ H_true[:, :2].T + H_true[:, 2]
    projected = mapped[:, :2] / mapped[:, 2:]
    inside = (mapped[:, 2] > 0) & np.all((projected >= 0) & (projected <= [W, H]), axis=1)
    return points[inside]


def plain_estimates(images: dict, prior: HomographyCache, pairs) -> dict[str, np.ndarray]:
    """Per-sample SIFT + MAGSAC for each ordered pair, the prior where the fit is unreliable."""
    features = {view: detect_features(image) for view, image in images.items()}
    out = {}
    for src, dst in pairs:
        key = HomographyCache.pair_key(src, dst)
        fit = estimate_pair_from_features([features[src]], [features[dst]], min_inliers=12)
        out[key] = np.asarray(fit.H if fit.status == "ok" else prior.pairs[key].H)
    return out


def evaluate_category(root: Path, category: str, split: str, resolution: int) -> dict:
    truth = SampleHomographyFile.load(root / TRUTH_DIR / f"{category}_samples.json")
    prior = ensure_homography_cache(root, category, resolution)
    records, views = index_realiad(root, category, split, resolution)
    pairs = graph_pairs(prior, views, "top_and_ring")
    reliable = [p for p in pairs if p in set(prior_pairs(prior, views))]
    errors: dict[str, list[float]] = {m: [] for m in METHODS}
    bridged: list[float] = []
    statuses = dict.fromkeys(SAMPLE_STATUSES, 0)
    stage_ms: dict[str, list[float]] = {s: [] for s in STAGES}
    size = None
    for record in records:
        images, _ = read_sample_views(record)
        images = dict(zip(views, images, strict=True))
        size = (images[views[0]].shape[1], images[views[0]].shape[0])
        if tuple(truth.image_size) != size:
            raise SystemExit(f"{category}: truth at {truth.image_size}, images at {size}")
        timings: dict[str, float] = {}
        ours = estimate_sample_homographies(images, prior, pairs, timings=timings)
        for stage in STAGES:
            stage_ms[stage].append(timings[stage])
        matched = estimate_sample_homographies(images, prior, reliable, refine=False)
        plain = plain_estimates(images, prior, reliable)
        sample_truth = truth.get(record.sample_id, f"{root / TRUTH_DIR}/{category}_samples.json")
        for src, dst in pairs:
            key = HomographyCache.pair_key(src, dst)
            H_true = sample_truth.H[key]
            points = evaluation_points(H_true, size)
            statuses[ours.status[key]] += 1
            if (src, dst) not in reliable:
                bridged.append(float(transfer_error(ours.H[key], H_true, points).mean()))
                continue
            estimates = {
                "prior": np.asarray(prior.pairs[key].H),
                "plain": plain[key],
                "matched": matched.H[key],
                "ours": ours.H[key],
            }
            for method, H in estimates.items():
                errors[method].append(float(transfer_error(H, H_true, points).mean()))
    return {
        "category": category,
        "samples": len(records),
        "pairs": len(reliable),
        "bridged_pairs": len(pairs) - len(reliable),
        "size": size,
        "errors": {m: np.asarray(v) for m, v in errors.items()},
        "bridged": np.asarray(bridged),
        "all": np.asarray(errors["ours"] + bridged),
        "statuses": statuses,
        "ms": {s: float(np.median(v)) for s, v in stage_ms.items()},
    }


def _cell(values: np.ndarray) -> str:
    if values.size == 0:
        return "-"
    return f"{np.median(values):.3f} ({np.percentile(values, 90):.2f})"


def format_table(results: list[dict], command: str) -> str:
    lines = [
        "# Per-sample homography accuracy (realistic synthetic rig)",
        "",
        f"Command: `{command}`",
        f"Machine: {cpu_model()}, one thread; Python {platform.python_version()}, "
        f"OpenCV {cv2.__version__}.",
        "",
        "Median over (test samples x ordered top_and_ring pairs) of the per-pair mean transfer "
        "error in px at 256 px against each sample's true homography (90th percentile in "
        "brackets); methods, points and the two kinds of pairs in the script's docstring. "
        "Milliseconds: CPU time of `estimate_sample_homographies` per sample (all pairs), "
        "median over the samples.",
        "",
        "| category | samples | cache pairs: prior | plain SIFT+MAGSAC | matched | ours | "
        "bridged pairs: ours | **ours, all pairs** | ours: refined / matched / prior / "
        "composed / unreliable | ms per sample: features, match, dense images, refine; "
        "total |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r["errors"]
        s = r["statuses"]
        ms = r["ms"]
        lines.append(
            f"| {r['category']} | {r['samples']} | "
            + " | ".join(_cell(e[m]) for m in METHODS)
            + f" | {_cell(r['bridged'])} ({r['bridged_pairs']} pairs) | **{_cell(r['all'])}** | "
            + " / ".join(str(s[k]) for k in SAMPLE_STATUSES)
            + f" | {ms['features']:.0f}, {ms['match']:.0f}, {ms['dense_images']:.0f}, "
            f"{ms['refine']:.0f}; **{ms['total']:.0f}** |"
        )
    worst = max(float(np.median(r["all"])) for r in results)
    lines += ["", f"Worst category median of ours over all pairs: {worst:.3f} px."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--categories", default="all", help="'all' or comma-separated names")
    parser.add_argument("--split", choices=("train", "test"), default="test")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "homography_accuracy.md"
    )
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    if args.categories == "all":
        names = sorted(
            p.name[: -len("_samples.json")] for p in (args.root / TRUTH_DIR).glob("*_samples.json")
        )
    else:
        names = [n.strip() for n in args.categories.split(",") if n.strip()]
    if not names:
        raise SystemExit(f"no per-sample truth in {args.root / TRUTH_DIR}")
    results = []
    for name in names:
        start = time.perf_counter()
        result = evaluate_category(args.root, name, args.split, args.resolution)
        results.append(result)
        medians = ", ".join(f"{m} {np.median(result['errors'][m]):.3f}" for m in METHODS)
        print(
            f"{name}: cache pairs {medians}; ours on all pairs {np.median(result['all']):.3f} px "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    command = "python benchmarks/homography_accuracy.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    table = format_table(results, command)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
