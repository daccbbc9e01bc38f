"""Benchmark: exact kNN distances of one test sample's positions against a memory bank.

Usage: ``python benchmarks/knn.py [--quick]`` (prints a table; not a test).

Workload (DESIGN.md, Inference and scoring): a bank of N rows of width D, and the positions of
one test sample as queries (5 views x 64 x 64 = 20480 rows). Methods:

* ``ours``      ``vsad_lightning.models.knn.nearest_distance(backend="torch")``: chunked fused
                addmm + running argmin + exact recomputation of the winning row.
* ``mm``        a plain ``torch.mm`` of the same (Q x D)(D x N) shape, chunked exactly like
                ``ours`` (no min, no norms): the practical GEMM limit on this machine.
* ``cdist``     ``torch.cdist(q, bank).min(1)`` in one call, when its Q x N matrix fits in memory.
* ``cdist-1k``  what a naive user (and anomalib's PatchCore, per batch) does when it does not: a
                loop over chunks of 1024 queries, ``torch.cdist`` to the whole bank, ``min``.
* ``faiss``     ``faiss.IndexFlatL2`` (add + search k=1, sqrt), when faiss is installed.

Each method runs in its own subprocess, so peak memories do not contaminate each other: the
child builds the data, resets its peak-RSS counter (``/proc/self/clear_refs``), runs the method
once and reports ``VmHWM`` minus the RSS before it. One-time work per bank (``ours``: the
cached bank mean and norms; ``faiss``: the index build) is timed apart as ``setup`` since it is
shared by every test sample; the peak memory includes it. The data are low-rank Gaussian rows
(a seeded (N, 64) Gaussian times a (64, D) one), which are cheap to generate; exact brute-force
cost does not depend on the values.

A full sample at N = 1e6 (2 Q N D = 2.6e13 flops at D = 640) takes minutes per method on a
2-core CPU, so each method is timed on a subset of the sample's queries sized by
``--flops-per-run`` (at least 1024 for ``cdist-1k``, 256 otherwise) and its time is scaled
linearly to 20480 queries; such rows are marked ``*``. Every method but one-call ``cdist`` is
linear in Q and chunked, so the peak memory of a subset is the full sample's; one-call ``cdist``
therefore only ever runs on the full sample (N = 1e5; at N = 1e6 its 82 GB matrix cannot exist).

The coreset section times ``greedy_coreset`` (ratio 0.1, D = 640) at N = 1e4 and 1e5.

The last line is ``knn: speedup_vs_cdist=<x> peak_mem_ratio=<y> gflops_vs_mm=<z>`` for
N = 1e6, D = 640 (``--quick``: the largest N it runs), where the cdist reference is ``cdist``
when it fits, else ``cdist-1k``; ``peak_mem_ratio`` = ours / the reference's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SAMPLE_QUERIES = 5 * 64 * 64
NAIVE_CHUNK = 1024
METHODS = ("ours", "mm", "cdist", "cdist-1k", "faiss")


# ----------------------------------------------------------------------------- child process
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _make_data(num_bank: int, num_queries: int, dim: int):
    import torch

    g = torch.Generator().manual_seed(0)
    basis = torch.randn(64, dim, generator=g) / 8.0
    bank = torch.randn(num_bank, 64, generator=g) @ basis
    # Always draw a whole sample and slice it: every subset is a prefix of the same queries.
    sample = torch.randn(SAMPLE_QUERIES, 64, generator=torch.Generator().manual_seed(1))
    queries = sample[:num_queries] @ basis
    return queries, bank


def _setup(method: str, bank):
    """One-time work per bank, reused by every later search (timed separately)."""
    if method == "ours":
        from vsad_lightning.models.knn import _bank_stats

        return _bank_stats(bank)  # mean and norms, cached on the bank tensor
    if method == "faiss":
        import faiss

        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank.numpy())
        return index
    return None  # torch.cdist and mm keep nothing between calls


def _search(method: str, state, queries, bank, max_chunk_bytes: int):
    import torch

    from vsad_lightning.models.knn import chunk_sizes, nearest_distance

    if method == "ours":
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
    if method == "faiss":
        squared, _ = state.search(queries.numpy(), 1)
        return torch.from_numpy(squared[:, 0]).clamp_(min=0).sqrt_()
    raise ValueError(method)


def child(method: str, num_bank: int, dim: int, num_queries: int, max_chunk_bytes: int) -> None:
    import torch

    with torch.no_grad():
        queries, bank = _make_data(num_bank, num_queries, dim)
        torch.mm(queries[:256], bank[:256].T)  # start the BLAS thread pool outside the timing
        reset = _reset_peak()
        before = _status_kib("VmRSS") if reset else _status_kib("VmHWM")
        start = time.perf_counter()
        state = _setup(method, bank)
        setup_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result = _search(method, state, queries, bank, max_chunk_bytes)
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")  # setup included: faiss's index copy is real memory
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": seconds,
                "setup_seconds": setup_seconds,
                "peak_mib": max(0, peak - before) / 1024,
                "mean_distance": None if result is None else float(result[:256].double().mean()),
                "peak_reset": reset,
            }
        )
    )


def child_coreset(num_rows: int, dim: int, ratio: float, threads: int) -> None:
    import torch

    from vsad_lightning.models.memory_bank import greedy_coreset

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
    if method == "cdist-1k":
        return 4 * min(q, NAIVE_CHUNK) * n + 2 * bank_copy
    if method == "faiss":
        return bank_copy + 4 * q * 1024
    return max_chunk_bytes + 8 * q * d


def _spawn(args: list[str]) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"{' '.join(args)} failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")


def _faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


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
    parser.add_argument("--no-coreset", action="store_true", help="skip the coreset timing")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        if kind == "coreset":
            child_coreset(int(rest[0]), int(rest[1]), float(rest[2]), int(rest[3]))
        else:
            child(kind, int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
        return

    import torch

    if args.quick:
        configs = [(10_000, 640), (100_000, 640)]
        headline = (100_000, 640)
        coreset_sizes = [10_000]
    else:
        configs = [(n, d) for n in (100_000, 1_000_000) for d in (320, 640, 960)]
        headline = (1_000_000, 640)
        coreset_sizes = [10_000, 100_000]
    methods = [m for m in METHODS if m != "faiss" or _faiss_installed()]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
        f"queries per sample = {SAMPLE_QUERIES}; max_chunk_bytes = {args.max_chunk_bytes}"
    )
    header = (
        f"{'N':>9} {'D':>4} {'method':>9} {'Q timed':>8} {'setup s':>8} {'time/sample s':>14} "
        f"{'peak MiB':>9} {'GFLOP/s':>8} {'mean d[:256]':>12}"
    )
    print(header)
    print("-" * len(header))
    results: dict[tuple[int, int, str], dict] = {}
    notes: list[str] = []
    for num_bank, dim in configs:
        for method in methods:
            matrix_gb = 4 * SAMPLE_QUERIES * num_bank / 1e9
            if method == "cdist":
                timed_q = SAMPLE_QUERIES
            else:
                fitting = int(args.flops_per_run / (2 * num_bank * dim)) // 256 * 256
                # Enough queries that per-call costs (centring each bank chunk, cdist's bank
                # copy) weigh as they do on a whole sample; faiss is slow, so it gets fewer.
                least = {"ours": 2048, "mm": 2048, "cdist-1k": NAIVE_CHUNK}.get(method, 256)
                timed_q = min(SAMPLE_QUERIES, max(least, fitting))
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
                        f"{matrix_gb:.1f} GB); the reference is cdist-1k, the 1024-query loop "
                        "a naive user writes"
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
                ]
            )
            scale = SAMPLE_QUERIES / timed_q
            out["sample_seconds"] = out["seconds"] * scale
            out["gflops"] = 2 * timed_q * num_bank * dim / out["seconds"] / 1e9
            results[(num_bank, dim, method)] = out
            mean = "" if out["mean_distance"] is None else f"{out['mean_distance']:.5f}"
            mark = "*" if scale != 1 else " "
            print(
                f"{num_bank:>9} {dim:>4} {method:>9} {timed_q:>8} {out['setup_seconds']:>8.2f} "
                f"{out['sample_seconds']:>13.2f}{mark} {out['peak_mib']:>9.0f} "
                f"{out['gflops']:>8.1f} {mean:>12}",
                flush=True,
            )

    print()
    for note in notes:
        print("note:", note)
    print("* timed on a subset of the queries, time scaled linearly to one sample")
    print("\nratios per configuration (ref = cdist if it ran, else cdist-1k):")
    for num_bank, dim in configs:
        ours = results.get((num_bank, dim, "ours"))
        ref = results.get((num_bank, dim, "cdist")) or results.get((num_bank, dim, "cdist-1k"))
        mm = results.get((num_bank, dim, "mm"))
        fa = results.get((num_bank, dim, "faiss"))
        if not ours:
            continue
        line = f"  N={num_bank:>8} D={dim:>4}:"
        if ref:
            line += (
                f" speedup vs cdist {ref['sample_seconds'] / ours['sample_seconds']:.2f}x,"
                f" peak mem ours/cdist {ours['peak_mib'] / max(ref['peak_mib'], 1):.3f},"
            )
        if mm:
            line += f" GFLOP/s ours/mm {ours['gflops'] / mm['gflops']:.2f},"
        if fa:
            line += f" faiss/ours time {fa['sample_seconds'] / ours['sample_seconds']:.2f}"
        print(line)

    if not args.no_coreset:
        print("\ngreedy coreset build (ratio 0.1, D=640, projection 128):")
        for num_rows in coreset_sizes:
            # Default threads only at 1e4: on a shared 2-core machine OpenMP synchronisation
            # of these small per-step vector ops made 2 threads ~10x slower than 1.
            for threads in (0, 1) if num_rows <= 10_000 else (1,):
                out = _spawn(["--worker", "coreset", str(num_rows), "640", "0.1", str(threads)])
                print(
                    f"  N={num_rows:>7}: {out['seconds']:6.1f} s for {out['kept']} rows "
                    f"({out['threads']} threads{', default' if threads == 0 else ''})",
                    flush=True,
                )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")

    num_bank, dim = headline
    ours = results[(num_bank, dim, "ours")]
    ref = results.get((num_bank, dim, "cdist")) or results[(num_bank, dim, "cdist-1k")]
    mm = results[(num_bank, dim, "mm")]
    if args.quick:
        print(f"(--quick: the line below is for N={num_bank}, D={dim}, not N=1e6)")
    print(
        f"knn: speedup_vs_cdist={ref['sample_seconds'] / ours['sample_seconds']:.2f} "
        f"peak_mem_ratio={ours['peak_mib'] / max(ref['peak_mib'], 1):.3f} "
        f"gflops_vs_mm={ours['gflops'] / mm['gflops']:.2f}"
    )


if __name__ == "__main__":
    main()
