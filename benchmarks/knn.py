"""Benchmark: exact kNN distances of one test sample's positions against a memory bank.

Usage: ``python benchmarks/knn.py [--quick] [--out benchmarks/results/knn.md]`` (not a test).

Workload (docs/method.md#scoring): a bank of N rows of width D, and the positions of
one test sample as queries (5 views x 64 x 64 = 20480 rows). Methods:

* ``ours``      ``nearest_distance(backend="auto")``, what the configs run: the exact
                projected search when the bank's spectrum lets it pay (``projection_pays``;
                ``visited`` is then the fraction of (query, row) pairs whose full-width
                distance was computed), else the ``torch`` search. Its one-time index
                (covariance, eigh, projection of every row) is the ``setup`` column.
* ``torch``     ``nearest_distance(backend="torch")``: chunked fused addmm + running argmin +
                exact recomputation of the winning row (the brute-force exact search).
* ``pruned``    ``benchmarks/_pruned_search.py``: the exact pruned search (k-means clusters
                with radii, triangle-inequality bounds; it falls back to brute force by itself
                when more than half of the pairs survive the bounds). ``visited`` is the
                fraction of (query, row) pairs it compared.
* ``mm``        a plain ``torch.mm`` of the same (Q x D)(D x N) shape, chunked exactly like
                ``ours`` (no min, no norms): the practical GEMM limit on this machine.
* ``cdist``     ``torch.cdist(q, bank).min(1)`` in one call, when its Q x N matrix fits in memory.
* ``cdist-1k``  the same with only the QUERIES chunked (1024 per call, the whole bank each time),
                for when the one-call matrix cannot fit (N = 1e6: 82 GB): the cdist reference.
* ``anomalib``  an anomalib-style loop written here: per chunk of 1024 queries,
                ``|x|^2 - 2 x y^T + |y|^2`` against the whole bank, clamp, sqrt, min.
* ``faiss``     ``faiss.IndexFlatL2`` (add + search k=1, sqrt), when faiss is installed.

Banks (``--banks``): ``random``: low-rank Gaussian rows (a seeded (N, 64) Gaussian times a
(64, D) one; no cluster structure, like the tiny model's real features measured in
benchmarks/results/knn.md, whose spectra are steep too: 99 % of the variance in 13 of 48, 27
of 64 and 14 of 32 channels); ``noisy``: the random bank plus isotropic noise holding 1 % of
the variance, so it is full rank; ``clustered``: the best case for pruning, N / 1000 Gaussian
clusters (centres N(0, I), within-cluster std 0.1, ~1000 rows each) with queries drawn from
the same mixture. Only ``ours`` and ``pruned`` depend on the values; the brute-force methods
cost the same on every bank, so the other banks run only those two (``noisy``: only ``ours``)
and the random bank's rows are their references. A bank with a flat spectrum (isotropic
Gaussian rows) makes ``ours`` the ``torch`` search (``projection_pays`` is false): the
``torch`` rows are that case.

Each method runs in its own subprocess, so peak memories do not contaminate each other: the
child builds the data, resets its peak-RSS counter (``/proc/self/clear_refs``), runs the method
once and reports ``VmHWM`` minus the RSS before it. One-time work per bank (``ours``: the
cached bank mean and norms and the projection index; ``torch``: the mean and norms;
``pruned``: those and the cluster index; ``faiss``: the index build) is timed apart as
``setup`` since it is shared by every test sample; the peak memory includes it.

A full sample at N = 1e6 (2 Q N D = 2.6e13 flops at D = 640) takes minutes per method on a
2-core CPU, so each method is timed on a subset of the sample's queries sized by
``--flops-per-run`` (at least 1024, 256 for faiss) and its time is scaled
linearly to 20480 queries; such rows are marked ``*``. Every method but one-call ``cdist`` is
linear in Q and chunked, so the peak memory of a subset is the full sample's; one-call ``cdist``
therefore only ever runs on the full sample (N = 1e5; at N = 1e6 its 82 GB matrix cannot exist).

The coreset section times ``greedy_coreset`` (ratio 0.1, D = 640) at N = 1e4 and 1e5.

The last line is ``knn: speedup_vs_cdist=<x> peak_mem_ratio=<y> gflops_vs_mm=<z>`` for
N = 1e6, D = 640 (``--quick``: the largest N it runs) on the NOISY bank when it ran, else the
random one, where the cdist reference is ``cdist`` when it fits, else ``cdist-1k``;
``peak_mem_ratio`` = ours / the reference's; ``gflops_vs_mm`` counts the brute-force flops
``2 Q N D`` for every method, so a search that skips work can exceed 1. The lines before it,
``knn-random: ...`` and ``knn-clustered: ...``, give the same for the other banks (clustered:
the pruned search). The noisy bank is the headline because it is full rank, the harder case
for the projected bound.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _shared import cpu_model, reset_peak_rss, spawn_worker, status_kib  # noqa: E402

SAMPLE_QUERIES = 5 * 64 * 64
NAIVE_CHUNK = 1024
METHODS = ("ours", "torch", "pruned", "mm", "cdist", "cdist-1k", "anomalib", "faiss")
ROWS_PER_TRUE_CLUSTER = 1000
CLUSTER_STD = 0.1
NOISE_STD = 0.1
VALUE_DEPENDENT = ("ours", "pruned")
"""Methods whose cost depends on the bank's values; the others cost the same on every bank,
so only the random bank runs them (its rows are the references of the other banks)."""


# ----------------------------------------------------------------------------- child process


def _make_data(num_bank: int, num_queries: int, dim: int, kind: str = "random"):
    import torch

    g = torch.Generator().manual_seed(0)
    if kind == "clustered":
        clusters = max(1, num_bank // ROWS_PER_TRUE_CLUSTER)
        centres = torch.randn(clusters, dim, generator=g)
        bank = torch.randn(num_bank, dim, generator=g).mul_(CLUSTER_STD)
        bank += centres[torch.randint(clusters, (num_bank,), generator=g)]
        q = torch.Generator().manual_seed(1)
        which = torch.randint(clusters, (SAMPLE_QUERIES,), generator=q)[:num_queries]
        noise = torch.randn(SAMPLE_QUERIES, dim, generator=q)[:num_queries]
        return centres[which] + CLUSTER_STD * noise, bank
    basis = torch.randn(64, dim, generator=g) / 8.0
    bank = torch.randn(num_bank, 64, generator=g) @ basis
    # Always draw a whole sample and slice it: every subset is a prefix of the same queries.
    q = torch.Generator().manual_seed(1)
    sample = torch.randn(SAMPLE_QUERIES, 64, generator=q)
    queries = sample[:num_queries] @ basis
    if kind == "noisy":
        # Full rank: isotropic noise carrying 1 % of the variance (per-dimension variance of the
        # low-rank part is 1, of the noise NOISE_STD^2 = 0.01).
        bank += NOISE_STD * torch.randn(num_bank, dim, generator=g)
        queries += NOISE_STD * torch.randn(SAMPLE_QUERIES, dim, generator=q)[:num_queries]
    return queries, bank


def _setup(method: str, bank):
    """One-time work per bank, reused by every later search (timed separately)."""
    if method == "ours":
        from vsad_lightning.bank.common import bank_stats
        from vsad_lightning.bank.knn import projection_pays

        projection_pays(bank)  # builds and caches the projection index when it pays
        return bank_stats(bank)
    if method == "torch":
        from vsad_lightning.bank.common import bank_stats

        return bank_stats(bank)  # mean and norms, cached on the bank tensor
    if method == "pruned":
        from _pruned_search import _cluster_index

        return _cluster_index(bank)  # builds and caches the stats too
    if method == "faiss":
        import faiss

        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank.numpy())
        return index
    return None  # torch.cdist and mm keep nothing between calls


def _search(method: str, state, queries, bank, max_chunk_bytes: int):
    import torch
    from _pruned_search import pruned_search

    from vsad_lightning.bank.knn import (
        chunk_sizes,
        nearest_distance,
        projected_search,
        projection_pays,
    )

    if method == "pruned":
        distances, _, visited = pruned_search(queries, bank, max_chunk_bytes=max_chunk_bytes)
        return distances, visited
    if method == "ours":
        if projection_pays(bank):  # what backend="auto" does (cached index: no work here)
            distances, _, visited = projected_search(queries, bank, max_chunk_bytes=max_chunk_bytes)
            return distances, visited
        return nearest_distance(queries, bank, backend="torch", max_chunk_bytes=max_chunk_bytes)
    if method == "torch":
        return nearest_distance(queries, bank, backend="torch", max_chunk_bytes=max_chunk_bytes)
    if method == "mm":
        q_chunk, n_chunk = chunk_sizes(
            queries.shape[0], bank.shape[0], bank.shape[1], max_chunk_bytes
        )
        block = torch.empty(q_chunk * n_chunk)
        for n0 in range(0, bank.shape[0], n_chunk):
            bank_chunk = bank[n0 : n0 + n_chunk]
            for q0 in range(0, queries.shape[0], q_chunk):
                qc = queries[q0 : q0 + q_chunk]
                out = block[: qc.shape[0] * bank_chunk.shape[0]]
                torch.mm(qc, bank_chunk.T, out=out.view(qc.shape[0], bank_chunk.shape[0]))
        return None
    if method == "cdist":
        return torch.cdist(queries, bank).min(dim=1).values
    if method == "cdist-1k":
        parts = [
            torch.cdist(queries[i : i + NAIVE_CHUNK], bank).min(dim=1).values
            for i in range(0, queries.shape[0], NAIVE_CHUNK)
        ]
        return torch.cat(parts)
    if method == "anomalib":
        bank_sq = bank.square().sum(1)
        parts = []
        for i in range(0, queries.shape[0], NAIVE_CHUNK):
            x = queries[i : i + NAIVE_CHUNK]
            squared = x.square().sum(1, keepdim=True) - 2 * x @ bank.T + bank_sq
            parts.append(squared.clamp_(min=0).sqrt_().min(dim=1).values)
        return torch.cat(parts)
    if method == "faiss":
        squared, _ = state.search(queries.numpy(), 1)
        return torch.from_numpy(squared[:, 0]).clamp_(min=0).sqrt_()
    raise ValueError(method)


def child(
    method: str, num_bank: int, dim: int, num_queries: int, max_chunk_bytes: int, kind: str
) -> None:
    import torch

    with torch.no_grad():
        queries, bank = _make_data(num_bank, num_queries, dim, kind)
        torch.mm(queries[:256], bank[:256].T)  # start the BLAS thread pool outside the timing
        reset = reset_peak_rss()
        before = status_kib("VmRSS") if reset else status_kib("VmHWM")
        start = time.perf_counter()
        state = _setup(method, bank)
        setup_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result = _search(method, state, queries, bank, max_chunk_bytes)
        seconds = time.perf_counter() - start
        result, visited = result if isinstance(result, tuple) else (result, 1.0)
        peak = status_kib("VmHWM")  # setup included: faiss's index copy is real memory
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": seconds,
                "setup_seconds": setup_seconds,
                "peak_mib": max(0, peak - before) / 1024,
                "mean_distance": None if result is None else float(result[:256].double().mean()),
                "peak_reset": reset,
                "visited": visited,
            }
        )
    )


def child_coreset(num_rows: int, dim: int, ratio: float, threads: int) -> None:
    import torch

    from vsad_lightning.bank.coreset import greedy_coreset

    if threads > 0:
        torch.set_num_threads(threads)

    _, rows = _make_data(num_rows, 1, dim)
    start = time.perf_counter()
    keep = greedy_coreset(rows, ratio, projection_dim=128, seed=0)
    seconds = time.perf_counter() - start
    print(
        "RESULT "
        + json.dumps(
            {"seconds": seconds, "kept": int(keep.numel()), "threads": torch.get_num_threads()}
        )
    )


# ----------------------------------------------------------------------------- parent process
def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _estimated_extra_bytes(method: str, q: int, n: int, d: int, max_chunk_bytes: int) -> int:
    """Rough peak above the data, to skip runs that would exhaust the machine's memory."""
    bank_copy = 4 * n * (d + 2)  # torch.cdist's padded copy of the bank / faiss's own copy
    if method == "cdist":
        return 4 * q * n + 2 * bank_copy
    if method in ("cdist-1k", "anomalib"):
        return 4 * min(q, NAIVE_CHUNK) * n + 2 * bank_copy
    if method == "faiss":
        return bank_copy + 4 * q * 1024
    return max_chunk_bytes + 8 * q * d


def _spawn(args: list[str]) -> dict:
    return spawn_worker(__file__, args)


def _faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def prunability(checkpoint: str, rows_per_cluster: int = 32) -> None:
    """The pruned search on a fitted model's banks: each sample's rows against the others'.

    The bank rows are in ``b, v, y, x`` order (``flatten_features``) with the same count per
    training sample, read from ``MemoryBankCallback``'s build info. Small banks get small
    clusters (``rows_per_cluster``), so the index has as many clusters per row as a 1e6-row
    bank's. Prints the visited fraction (1.0: fell back to brute force) and the median nearest
    distance over the median pairwise distance (near 1: no cluster structure to exploit).
    """
    import _pruned_search as knn
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # final.ckpt keeps the bank's build info itself (older ones: the callback's state).
    info = state.get("memory_bank_build") or next(
        v for k, v in state.get("callbacks", {}).items() if "MemoryBankCallback" in k
    )
    samples = _samples_of(state)
    knn._ROWS_PER_CLUSTER = rows_per_cluster
    for key, bank in state["state_dict"].items():
        name = key.removeprefix("model.")  # VSADModule.model (older checkpoints: no prefix)
        if not name.startswith("memory_bank.bank_") or info.get("coreset_ratio", 1.0) != 1.0:
            continue
        per = bank.shape[0] // samples
        visited, ratios = [], []
        for s in range(samples):
            queries = bank[s * per : (s + 1) * per]
            rest = torch.cat([bank[: s * per], bank[(s + 1) * per :]])
            distances, _, fraction = knn.pruned_search(queries, rest)
            visited.append(fraction)
            pairs = torch.cdist(rest[::7][:2000], rest[1::11][:2000]).median()
            ratios.append(float(distances.median() / pairs))
        print(
            f"{name} {tuple(bank.shape)}: {samples} samples, visited fraction "
            f"{sum(visited) / samples:.3f}, median nearest / median pairwise distance "
            f"{sum(ratios) / samples:.2f}"
        )


def _samples_of(state: dict) -> int:
    """Training samples in the bank: rows of the finest level / (views x h x w) from hparams."""
    hp = state.get("datamodule_hyper_parameters") or {}
    root, category = hp.get("root"), hp.get("category")
    if root and category:
        import json
        from pathlib import Path

        spec = Path(root) / "realiad_jsons" / f"{category}.json"
        if spec.exists():
            train = json.loads(spec.read_text())["train"]
            return len({"_".join(Path(e["image_path"]).stem.split("_")[:3]) for e in train})
    raise SystemExit("error: cannot tell the number of training samples of this checkpoint")


def _hardware() -> str:

    model = cpu_model()
    return f"{model}, {os.cpu_count()} CPUs, {_mem_total_gib():.0f} GiB RAM"


def _mem_total_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N in {1e4, 1e5}, D = 640 only")
    parser.add_argument(
        "--flops-per-run",
        type=float,
        default=4e11,
        help="distance flops (2 Q N D) each timed run aims at; Q is cut to fit (default 4e11)",
    )
    parser.add_argument("--max-chunk-bytes", type=int, default=256 * 2**20)
    parser.add_argument(
        "--banks",
        nargs="+",
        default=["random", "noisy", "clustered"],
        choices=["random", "noisy", "clustered"],
    )
    parser.add_argument(
        "--grid",
        nargs="+",
        metavar="NxD",
        help="only these bank shapes, e.g. 1000000x640 (default: the full grid)",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--no-coreset", action="store_true", help="skip the coreset timing")
    parser.add_argument("--out", help="also write the output as a markdown file")
    parser.add_argument(
        "--prunability",
        metavar="CKPT",
        help="only report how much the pruned search saves on a checkpoint's real banks",
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prunability:
        prunability(args.prunability)
        return
    if args.worker:
        kind, *rest = args.worker
        if kind == "coreset":
            child_coreset(int(rest[0]), int(rest[1]), float(rest[2]), int(rest[3]))
        else:
            child(kind, int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), rest[4])
        return

    import torch

    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    if args.quick:
        grid = {
            "random": [(10_000, 640), (100_000, 640)],
            "clustered": [(100_000, 640)],
            "noisy": [(100_000, 640)],
        }
        headline = (100_000, 640)
        coreset_sizes = [10_000]
    else:
        grid = {
            "random": [(n, d) for n in (100_000, 1_000_000) for d in (320, 640, 960)],
            "clustered": [(100_000, 640), (1_000_000, 640)],
            "noisy": [(100_000, 640), (1_000_000, 640)],
        }
        headline = (1_000_000, 640)
        coreset_sizes = [10_000, 100_000]
    if args.grid:
        shapes = [tuple(int(float(x)) for x in item.split("x")) for item in args.grid]
        grid = {kind: shapes for kind in grid}
    configs = [(kind, n, d) for kind in args.banks for n, d in grid[kind]]
    methods = [m for m in args.methods if m != "faiss" or _faiss_installed()]
    say(f"hardware: {_hardware()}")
    say(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"load average {os.getloadavg()[0]:.1f}; "
        f"queries per sample = {SAMPLE_QUERIES}; max_chunk_bytes = {args.max_chunk_bytes}"
    )
    header = (
        f"{'bank':>9} {'N':>9} {'D':>4} {'method':>9} {'Q timed':>8} {'setup s':>8} "
        f"{'time/sample s':>14} {'peak MiB':>9} {'GFLOP/s':>8} {'visited':>8} {'mean d[:256]':>12}"
    )
    say(header)
    say("-" * len(header))
    results: dict[tuple[str, int, int, str], dict] = {}
    notes: list[str] = []
    for kind, num_bank, dim in configs:
        for method in methods:
            if kind == "clustered" and method != "pruned" and ("random", num_bank, dim) in configs:
                continue  # value-independent costs: the random bank's rows serve as reference
            if kind == "noisy" and method not in VALUE_DEPENDENT:
                continue  # likewise (pruned: falls back on unclustered rows, shown on random)
            matrix_gb = 4 * SAMPLE_QUERIES * num_bank / 1e9
            if method == "cdist":
                timed_q = SAMPLE_QUERIES
            else:
                fitting = int(args.flops_per_run / (2 * num_bank * dim)) // 256 * 256
                # At least 1024 queries, so per-call costs (centring each bank chunk: N D, vs
                # 2 Q N D for the search; cdist's bank copy) stay small as on a whole sample;
                # faiss is slow, so it gets fewer.
                least = 256 if method == "faiss" else NAIVE_CHUNK
                timed_q = min(SAMPLE_QUERIES, max(least, fitting))
                if method == "pruned" and kind == "clustered":
                    timed_q = SAMPLE_QUERIES  # pruned: cheap, and its cost is not linear in Q
                if method == "ours" and kind != "clustered":
                    timed_q = SAMPLE_QUERIES  # projected: cheap, and not linear in Q either
            need = _estimated_extra_bytes(method, timed_q, num_bank, dim, args.max_chunk_bytes)
            need += 4 * (num_bank + timed_q) * dim  # the data themselves
            available = _mem_available_bytes()
            if need > 0.7 * available:
                notes.append(
                    f"N={num_bank:.0e} D={dim} {method}: not run, needs ~{need / 2**30:.1f} GiB"
                    f" of {available / 2**30:.1f} GiB available"
                )
                if method == "cdist":
                    notes[-1] += (
                        f" (its {SAMPLE_QUERIES} x {num_bank} float32 matrix alone is "
                        f"{matrix_gb:.1f} GB); the reference is cdist-1k (queries chunked)"
                    )
                continue
            out = _spawn(
                [
                    "--worker",
                    method,
                    str(num_bank),
                    str(dim),
                    str(timed_q),
                    str(args.max_chunk_bytes),
                    kind,
                ]
            )
            scale = SAMPLE_QUERIES / timed_q
            out["sample_seconds"] = out["seconds"] * scale
            out["gflops"] = 2 * timed_q * num_bank * dim / out["seconds"] / 1e9
            results[(kind, num_bank, dim, method)] = out
            mean = "" if out["mean_distance"] is None else f"{out['mean_distance']:.5f}"
            mark = "*" if scale != 1 else " "
            say(
                f"{kind:>9} {num_bank:>9} {dim:>4} {method:>9} {timed_q:>8} "
                f"{out['setup_seconds']:>8.2f} {out['sample_seconds']:>13.2f}{mark} "
                f"{out['peak_mib']:>9.0f} {out['gflops']:>8.1f} {out['visited']:>8.4f} "
                f"{mean:>12}"
            )

    say()
    for note in notes:
        say("note: " + note)
    say("* timed on a subset of the queries, time scaled linearly to one sample")
    say("\nratios per configuration (ref = cdist if it ran, else cdist-1k):")
    for kind, num_bank, dim in configs:
        # The clustered bank runs only the pruned search: its ratios are the pruned search's.
        ours = results.get((kind, num_bank, dim, "ours")) or results.get(
            (kind, num_bank, dim, "pruned")
        )
        if not ours:
            continue
        line = f"  {kind:>9} N={num_bank:>8} D={dim:>4}:"
        ref = _reference(results, kind, num_bank, dim)
        if ref:
            line += (
                f" speedup vs cdist {ref['sample_seconds'] / ours['sample_seconds']:.2f}x,"
                f" peak mem ours/cdist {ours['peak_mib'] / max(ref['peak_mib'], 1):.3f},"
            )
        mm = results.get(("random", num_bank, dim, "mm"))
        if mm:
            line += f" GFLOP/s ours/mm {ours['gflops'] / mm['gflops']:.2f},"
        for other in ("torch", "pruned", "anomalib", "faiss"):
            got = results.get((kind, num_bank, dim, other)) or results.get(
                ("random", num_bank, dim, other)
            )
            if got:
                line += f" {other}/ours time {got['sample_seconds'] / ours['sample_seconds']:.2f},"
        say(line.rstrip(","))

    if not args.no_coreset:
        say("\ngreedy coreset build (ratio 0.1, D=640, projection 128):")
        for num_rows in coreset_sizes:
            # Default threads only at 1e4: on a shared 2-core machine OpenMP synchronisation
            # of these small per-step vector ops made 2 threads ~10x slower than 1.
            for threads in (0, 1) if num_rows <= 10_000 else (1,):
                out = _spawn(["--worker", "coreset", str(num_rows), "640", "0.1", str(threads)])
                say(
                    f"  N={num_rows:>7}: {out['seconds']:6.1f} s for {out['kept']} rows "
                    f"({out['threads']} threads{', default' if threads == 0 else ''})"
                )
    say(f"load average at the end: {os.getloadavg()[0]:.1f}")

    num_bank, dim = headline
    summary = {}
    for kind in args.banks:
        ours = results.get((kind, num_bank, dim, "ours")) or results.get(
            (kind, num_bank, dim, "pruned")
        )
        ref = _reference(results, kind, num_bank, dim)
        mm = results.get(("random", num_bank, dim, "mm"))
        if ours and ref and mm:
            summary[kind] = (
                f"speedup_vs_cdist={ref['sample_seconds'] / ours['sample_seconds']:.2f} "
                f"peak_mem_ratio={ours['peak_mib'] / max(ref['peak_mib'], 1):.3f} "
                f"gflops_vs_mm={ours['gflops'] / mm['gflops']:.2f}"
            )
    if args.quick:
        say(f"(--quick: the lines below are for N={num_bank}, D={dim}, not N=1e6)")
    # The headline is the full-rank noisy bank when it ran: the harder case for ``ours``.
    top = "noisy" if "noisy" in summary else "random"
    for kind in ("random", "noisy", "clustered"):
        if kind in summary and kind != top:
            say(f"knn-{kind}: {summary[kind]}")
    if top in summary:
        say(f"(the knn line below: the {top} bank)")
    if args.out:
        _write_markdown(args.out, lines + ([f"knn: {summary[top]}"] if top in summary else []))
    if top in summary:
        print(f"knn: {summary[top]}")


def _reference(results: dict, kind: str, num_bank: int, dim: int) -> dict | None:
    """cdist (one call) if it ran, else cdist-1k; from the random bank when this bank has none
    (brute-force cost does not depend on the values)."""
    for source in (kind, "random"):
        for method in ("cdist", "cdist-1k"):
            if (source, num_bank, dim, method) in results:
                return results[(source, num_bank, dim, method)]
    return None


def _write_markdown(path: str, lines: list[str]) -> None:
    from vsad_lightning.utils.io import atomic_write_text

    command = "python " + " ".join(["benchmarks/knn.py", *sys.argv[1:]])
    text = (
        "# kNN search: one test sample against a memory bank\n\n"
        f"Generated by `{command}` (timings on a shared machine are noisy).\n\n"
        "```\n" + "\n".join(lines) + "\n```\n"
    )
    atomic_write_text(path, text)


if __name__ == "__main__":
    main()
