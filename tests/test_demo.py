"""``make demo``'s entry point (``python -m vsad_lightning.cli.demo``) on a tiny setting.

The demo makes its data only when ``<out>/data`` holds none, so the test puts the session's
small synthetic category there and passes ``tiny_fit_args`` through (the demo forwards
unknown options to ``vsad-fit``): the same code path as ``make demo``, one short fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_fits_each_category_and_reports_the_mean(
    synthetic_root_cached, copy_dataset, tiny_fit_args, synthetic_spec, tmp_path
):
    out = tmp_path / "demo"
    copy_dataset(synthetic_root_cached, out / "data")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("VSAD_DEBUG", None)
    # Without --data.image_size: the demo config's null, the views at the data's resolution.
    at = tiny_fit_args.index("--data.image_size")
    fit_args = tiny_fit_args[:at] + tiny_fit_args[at + 2 :]
    proc = subprocess.run(
        [sys.executable, "-m", "vsad_lightning.cli.demo", "--out", str(out), *fit_args],
        capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    category = synthetic_spec.category
    assert f"=== {category} ===" in proc.stdout
    runs = out / "runs"
    metrics = json.loads((runs / "realiad" / category / "version_0" / "metrics.json").read_text())
    assert metrics["n_samples"] == synthetic_spec.samples_test
    hparams = (runs / "realiad" / category / "version_0" / "hparams.yaml").read_text()
    assert f"\nimage_size: {synthetic_spec.image_size}\n" in hparams  # --data.resolution's
    report = json.loads((runs / "report.json").read_text())
    assert [row["category"] for row in report["rows"]] == [category]
    assert report["mean"]["sample_auroc"] == pytest.approx(metrics["sample_auroc"])
    # The last lines the user reads: where TensorBoard and the pictures are, and the mean.
    assert f"TensorBoard: tensorboard --logdir {runs}" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    assert json.loads(last.removeprefix("mean: ")) == report["mean"]
    assert list((runs / "realiad" / category / "version_0" / "images").glob("*.png"))
