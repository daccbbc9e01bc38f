"""Data safety and loading safety, through the real console scripts.

One synthetic Real-IAD root goes through ``vsad-homography``, ``vsad-fit``, ``vsad-test`` and
``vsad-predict``. Every file of the dataset is hashed before and after: nothing may change, and
nothing may appear except inside the documented cache folder ``<root>/vsad_cache/``. The
checkpoints ``vsad-fit`` writes must load with ``torch.load(..., weights_only=True)``, and a
checkpoint holding an arbitrary object (a pickle bomb) must be refused with one clear line.
The cache marks two neighbouring pairs unreliable: the run warns and lists them in its
``homographies.json`` (they leave the neighbour graph).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from vsad_lightning.callbacks.outputs import HOMOGRAPHY_REPORT
from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.data.synthetic import TRUTH_DIR
from vsad_lightning.geometry.cache import CACHE_DIR_ENV, CACHE_DIR_NAME

pytestmark = pytest.mark.slow  # four console scripts, one short training run

CATEGORY = "brick"
UNRELIABLE = ["C2->C3", "C3->C2"]  # neighbours in the demo's top_and_ring graph


def digest_tree(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def outside_cache(digests: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in digests.items() if Path(k).parts[0] != CACHE_DIR_NAME}


def assert_ok(proc) -> None:
    assert proc.returncode == 0, (
        f"{proc.args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


@pytest.fixture(scope="module")
def pipeline(synthetic_root, copy_dataset, console_script, tiny_fit_args, tmp_path_factory) -> dict:
    """Run the four console scripts on one dataset copy, hashing it before and after each."""
    work = tmp_path_factory.mktemp("safety")
    root = copy_dataset(synthetic_root, work / "data")
    # The predict input: two test samples re-laid as the folder layout, outside the dataset.
    entries = json.loads((root / "realiad_jsons" / f"{CATEGORY}.json").read_text())["test"]
    by_sample: dict[str, list[dict]] = {}
    for entry in entries:  # file stem: brick_0009_OK_C3_<stamp>
        by_sample.setdefault("_".join(Path(entry["image_path"]).stem.split("_")[:3]), []).append(
            entry
        )
    samples = work / "new_parts"
    for sample in sorted(by_sample)[:2]:
        (samples / sample).mkdir(parents=True)
        for entry in by_sample[sample]:
            view = Path(entry["image_path"]).stem.split("_")[3]
            shutil.copy(
                root / "realiad_64" / CATEGORY / entry["image_path"],
                samples / sample / f"{view}.jpg",
            )

    hashes = {"start": digest_tree(root)}
    size = "64"
    proc = console_script(
        "vsad-homography", "--root", str(root), "--category", CATEGORY, "--resolution", size,
        "--samples", "4", "--quiet",
    )  # fmt: skip
    assert_ok(proc)
    hashes["homography"] = digest_tree(root)

    # A cache whose two neighbouring pairs are unreliable: the true one, edited as
    # vsad-homography would mark pairs with too few inliers.
    cache = cache_path_for(root, CATEGORY, size)
    document = json.loads((root / TRUTH_DIR / f"{CATEGORY}.json").read_text())
    for pair in UNRELIABLE:
        document["pairs"][pair]["status"] = "unreliable"
    cache.write_text(json.dumps(document))
    hashes["cache_edited"] = digest_tree(root)

    runs = work / "runs"
    common = ["--data.root", str(root), "--data.category", CATEGORY]
    fit = console_script(
        "vsad-fit", *tiny_fit_args, *common, "--trainer.default_root_dir", str(runs)
    )
    assert_ok(fit)
    hashes["fit"] = digest_tree(root)
    metrics = Path(fit.stdout.strip().splitlines()[-1].removeprefix("metrics: "))
    ckpt = metrics.parent / "checkpoints" / "final.ckpt"

    test = console_script(
        "vsad-test", *tiny_fit_args, *common, "--trainer.default_root_dir", str(work / "test"),
        "--ckpt_path", str(ckpt),
    )  # fmt: skip
    assert_ok(test)
    hashes["test"] = digest_tree(root)

    predict = console_script(
        "vsad-predict", *tiny_fit_args, *common, "--data.predict_root", str(samples),
        "--trainer.default_root_dir", str(work / "predict_runs"), "--ckpt_path", str(ckpt),
        "--output.dir", str(work / "predictions"),
    )  # fmt: skip
    assert_ok(predict)
    hashes["predict"] = digest_tree(root)
    return {"root": root, "hashes": hashes, "fit": fit, "run_dir": metrics.parent, "work": work}


def test_no_command_changes_or_adds_dataset_files_outside_the_cache(pipeline):
    hashes = pipeline["hashes"]
    start = hashes["start"]
    assert not any(Path(k).parts[0] == CACHE_DIR_NAME for k in start)
    for step in ("homography", "cache_edited", "fit", "test", "predict"):
        assert outside_cache(hashes[step]) == start, step
    # The only thing ever added: the category's cache, at its documented path.
    assert set(hashes["homography"]) - set(start) == {
        f"{CACHE_DIR_NAME}/homographies_{CATEGORY}_64.json"
    }
    # fit, test and predict only read the category cache (it exists: nothing re-estimated).
    category_cache = f"{CACHE_DIR_NAME}/homographies_{CATEGORY}_64.json"
    for step in ("fit", "test", "predict"):
        assert hashes[step][category_cache] == hashes["cache_edited"][category_cache], step
    # Per-sample homographies: fit writes its splits' files next to it, test reuses them;
    # predict scores with the checkpoint alone (the model estimates them) and writes nothing.
    samples = f"{CACHE_DIR_NAME}/homographies_{CATEGORY}_64_samples_"
    assert set(hashes["fit"]) - set(hashes["cache_edited"]) == {
        f"{samples}train.json",
        f"{samples}test.json",
    }
    assert hashes["test"] == hashes["fit"]
    assert hashes["predict"] == hashes["test"]


def test_unreliable_pairs_are_warned_about_and_listed_in_the_run(pipeline):
    stderr = pipeline["fit"].stderr
    assert (
        "2 neighbour pairs removed from the neighbour graph as unreliable: C2->C3, C3->C2" in stderr
    )
    report = json.loads((pipeline["run_dir"] / HOMOGRAPHY_REPORT).read_text())
    assert report["unreliable_pairs"] == UNRELIABLE and report["removed_pairs"] == UNRELIABLE
    assert report["neighbour_graph"] == "top_and_ring"
    assert not report["neighbour_mask"][1][2] and not report["neighbour_mask"][2][1]
    assert report["cache"].endswith(f"homographies_{CATEGORY}_64.json")
    assert all(report["pairs"][p]["status"] == "unreliable" for p in UNRELIABLE)


def plain(value) -> bool:
    """Only containers and scalars (what a weights-only load can rebuild without code)."""
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, str | int | float | bool | torch.Tensor)


@pytest.mark.parametrize("name", ["last.ckpt", "final.ckpt"])
def test_checkpoints_load_with_weights_only(pipeline, name):
    checkpoint = torch.load(
        pipeline["run_dir"] / "checkpoints" / name, map_location="cpu", weights_only=True
    )
    assert checkpoint["state_dict"] and plain(checkpoint["hyper_parameters"])
    assert plain(checkpoint.get("datamodule_hyper_parameters", {}))


class _Bomb:
    """Unpickling this runs ``os.mkdir(path)``: harmless, and visible when it happens."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_a_checkpoint_holding_an_arbitrary_object_is_refused(
    synthetic_root_cached, console_script, tiny_fit_args, tmp_path
):
    marker = tmp_path / "the_bomb_went_off"
    bomb = tmp_path / "bomb.ckpt"
    torch.save({"state_dict": {}, "extra": _Bomb(marker)}, bomb)

    proc = console_script(
        "vsad-test", *tiny_fit_args, "--data.root", str(synthetic_root_cached),
        "--data.category", CATEGORY, "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--ckpt_path", str(bomb),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert line.startswith(f"error: refusing to load checkpoint {bomb}: "), line
    assert "posix.mkdir" in line or "os.mkdir" in line, line
    assert not marker.exists(), "the checkpoint's code ran"

    # The bomb is live: a full unpickling (what weights_only=True prevents) runs it.
    torch.load(bomb, map_location="cpu", weights_only=False)
    assert marker.is_dir()


def test_cache_dir_leaves_the_dataset_untouched(
    synthetic_root, copy_dataset, tmp_path, monkeypatch
):
    root = copy_dataset(synthetic_root, tmp_path / "data")  # no cache yet
    before = digest_tree(root)
    caches = tmp_path / "caches"
    data = MultiViewDataModule(
        str(root), CATEGORY, resolution=64, image_size=32, cache_dir=str(caches)
    )
    data.prepare_data()  # estimates and writes the cache
    data.setup("fit")  # and the training split's per-sample homographies
    assert digest_tree(root) == before and not (root / CACHE_DIR_NAME).exists()
    written = sorted(p.name for p in caches.iterdir())
    assert f"homographies_{CATEGORY}_64.json" in written  # the category cache, and beside it
    assert all(name.startswith(f"homographies_{CATEGORY}_64") for name in written), written
    # The environment variable finds the same folder (nothing to estimate again).
    monkeypatch.setenv(CACHE_DIR_ENV, str(caches))
    assert MultiViewDataModule(str(root), CATEGORY, resolution=64).cache_path == (
        caches / f"homographies_{CATEGORY}_64.json"
    )
    assert cache_path_for(root, CATEGORY, 64).parent == caches
