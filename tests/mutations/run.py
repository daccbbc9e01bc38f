"""The mutation pass of ``tests/README.md``: break the code on purpose, one place at a time,
and check that the tests named for that place turn red.

Each mutation replaces one exact piece of text in one module (it must occur exactly once), runs
the listed tests (``pytest -x -q``, one torch thread), and restores the file byte for byte,
also when interrupted. Usage, from the repository root::

    OMP_NUM_THREADS=1 python tests/mutations/run.py            # every mutation
    OMP_NUM_THREADS=1 python tests/mutations/run.py aupro knn  # some, by name

It prints one markdown row per mutation (the first failing test, ``-x``, or SURVIVED), keeps
each run's pytest output in ``$MUTATION_LOGS`` (default ``/tmp/vsad-mutations``) and exits 1
if any mutation survived. When code moves, update ``path``/``old`` here; a mutation whose text is
not found is reported as STALE, never as caught.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOGS = Path(os.environ.get("MUTATION_LOGS", "/tmp/vsad-mutations"))
"""Each mutation's pytest output, to check that a test failed for the break's reason."""


@dataclass(frozen=True)
class Mutation:
    name: str
    behaviour: str
    path: str
    where: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = [
    Mutation(
        "mvam_direction",
        "MVAM's homography direction (view v looks through H[v, u])",
        "vsad_lightning/models/mvam.py",
        "_geometry",
        "H = homographies.to(dtype)[:, views[:, None], partners]",
        "H = homographies.to(dtype)[:, partners, views[:, None]]",
        ("tests/test_mvam.py",),
    ),
    Mutation(
        "pixel_centre",
        "pixel centres at (i + 0.5, j + 0.5)",
        "vsad_lightning/geometry/projection.py",
        "pixel_centre_grid",
        "torch.arange(height, dtype=dtype, device=device) + 0.5,\n"
        "        torch.arange(width, dtype=dtype, device=device) + 0.5,",
        "torch.arange(height, dtype=dtype, device=device) + 0.0,\n"
        "        torch.arange(width, dtype=dtype, device=device) + 0.0,",
        ("tests/test_geometry.py", "tests/test_mvam.py"),
    ),
    Mutation(
        "knn_mean",
        "kNN distance is the nearest row's (min), not the mean over the bank",
        "vsad_lightning/bank/knn.py",
        "nearest_distance",
        "    return nearest_neighbour(queries, bank, backend=backend, "
        "max_chunk_bytes=max_chunk_bytes)[0]",
        "    return torch.cdist(queries.float(), bank.float()).mean(dim=1)",
        ("tests/test_knn.py", "tests/test_scoring.py"),
    ),
    Mutation(
        "sample_max",
        "a sample is as anomalous as its worst view (max over views)",
        "vsad_lightning/models/scoring.py",
        "sample_scores",
        "    return scores.amax(dim=-1)",
        "    return scores.mean(dim=-1)",
        ("tests/test_scoring.py",),
    ),
    Mutation(
        "aupro_limit",
        "AUPRO integrates FPR up to 0.3",
        "vsad_lightning/metrics/anomaly.py",
        "AnomalyMetrics.__init__",
        "        aupro_max_fpr: float = 0.3,",
        "        aupro_max_fpr: float = 1.0,",
        (
            "tests/test_metrics.py::test_hand_computed_aupro_and_auroc",
            "tests/test_metrics.py::test_binned_pixel_metrics_match_exact_references_across_scales_and_ties",
        ),
    ),
    Mutation(
        "bank_gather",
        "under DDP every rank's bank holds every rank's rows",
        "vsad_lightning/models/model.py",
        "VSADModel.fit_memory_bank (in-memory gather)",
        "                else {level: state.gather_rows(rows) for level, rows in local.items()}",
        "                else local",
        ("tests/test_system.py::test_ddp_two_processes_build_the_same_bank_as_one",),
    ),
    Mutation(
        "resume_skip",
        "a resumed epoch skips the batches already trained on",
        "vsad_lightning/data/datamodule.py",
        "ResumableShuffleSampler.__iter__",
        "            indices = indices[pending[1] :]",
        "            indices = indices",
        ("tests/test_faults.py::test_resume_after_crash_trains_exactly_like_an_uninterrupted_run",),
    ),
    Mutation(
        "lr_warp",
        "L_r compares view v with view u sampled through H[v, u]",
        "vsad_lightning/models/frm.py",
        "consistency_loss",
        "            homographies[:, src, dst].reshape(B * P, 3, 3),",
        "            homographies[:, dst, src].reshape(B * P, 3, 3),",
        ("tests/test_frm.py", "tests/test_objective.py"),
    ),
    Mutation(
        "neighbour_mask",
        "MVAM attends only to the neighbour graph's views",
        "vsad_lightning/models/mvam.py",
        "neighbour_groups",
        "    mask = neighbour_mask.clone()\n",
        "    mask = torch.ones_like(neighbour_mask)\n",
        ("tests/test_mvam.py",),
    ),
    Mutation(
        "calibration_loo",
        "a training normal is scored without its own bank entries (LOO)",
        "vsad_lightning/models/calibration.py",
        "leave_one_out_maps",
        "                exclude=None if exclude is None else chunk,",
        "                exclude=None,",
        ("tests/test_calibration.py",),
    ),
    Mutation(
        "ddp_nan_reduce",
        "one rank's non-finite loss skips the step on every rank",
        "vsad_lightning/system/module.py",
        "VSADModule.training_step",
        '            bad = self.trainer.strategy.reduce(bad, reduce_op="max")',
        "            pass",
        ("tests/test_ddp_nan.py",),
    ),
]


def run(mutation: Mutation) -> tuple[str, list[str]]:
    """``(verdict, failing tests)``: ``caught``, ``SURVIVED`` or ``STALE``."""
    path = REPO / mutation.path
    original = path.read_bytes()
    text = original.decode()
    if text.count(mutation.old) != 1:
        return "STALE", []
    try:
        path.write_text(text.replace(mutation.old, mutation.new))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": str(REPO)}  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-rf", "-p", "no:cacheprovider",
             *mutation.tests],
            cwd=REPO, env=env, capture_output=True, text=True,
        )  # fmt: skip
    finally:
        path.write_bytes(original)
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / f"{mutation.name}.log").write_text(proc.stdout + proc.stderr)
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    if proc.returncode == 1 and failed:
        return "caught", failed
    if proc.returncode == 0:
        return "SURVIVED", []
    return f"ERROR (pytest exit {proc.returncode})", [proc.stdout[-500:]]


def main(names: list[str]) -> int:
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    print("| break | where | change | verdict: tests that failed |")
    print("| --- | --- | --- | --- |")
    survived = False
    for mutation in chosen:
        verdict, failed = run(mutation)
        survived |= verdict != "caught"
        change = f"`{mutation.old.strip()}` → `{mutation.new.strip()}`".replace("\n", " ")
        tests = ", ".join(f"`{t}`" for t in failed)
        print(
            f"| {mutation.behaviour} | `{mutation.path}` `{mutation.where}` | {change} | "
            f"{verdict}: {tests} |",
            flush=True,
        )
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
