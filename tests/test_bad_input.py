"""Bad input through the real console scripts: one readable line, exit code 2.

Each case corrupts a fresh copy of the small synthetic Real-IAD root (``synthetic_root_cached``,
true homographies as its cache) and runs ``vsad-fit`` (or ``vsad-homography``) as a user
would. Every case must fail during data validation, before any training, and leave nothing
behind: no run folder ``version_N`` and no new or half-written file in the dataset's cache.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from vsad_lightning.cli._common import one_line, report_data_errors
from vsad_lightning.cli.run import fit_main
from vsad_lightning.cli.run import test_main as vsad_test_main
from vsad_lightning.data import images as images_module
from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.data.images import (
    probe_image,
    read_image_rgb,
    read_mask,
    write_jpeg,
    write_mask_png,
    write_png,
)
from vsad_lightning.data.realiad import RealIADDataset
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import CACHE_DIR_NAME

CATEGORY = "brick"

SLOW = pytest.mark.slow  # each console-script case takes ~10-60 s (mostly imports; shared CPU)


# ----------------------------------------------------------------------------- the dataset


def split_file(root: Path) -> Path:
    return root / "realiad_jsons" / f"{CATEGORY}.json"


def category_dir(root: Path) -> Path:
    (folder,) = root.glob(f"realiad_*/{CATEGORY}")
    return folder


def edit_split(root: Path, edit: Callable[[dict], None]) -> None:
    document = json.loads(split_file(root).read_text())
    edit(document)
    split_file(root).write_text(json.dumps(document))


def first_entry(root: Path, split: str, view: str, masked: bool | None = None) -> dict:
    """The first JSON entry of ``split`` for ``view`` (sorted by path: deterministic); with
    ``masked=True`` one that lists a mask, with ``masked=False`` one of an ``OK`` sample."""
    entries = json.loads(split_file(root).read_text())[split]
    chosen = sorted(
        (
            e
            for e in entries
            if f"_{view}_" in Path(e["image_path"]).name
            and (
                masked is None
                or (e["mask_path"] is not None if masked else e["anomaly_class"] == "OK")
            )
        ),
        key=lambda e: e["image_path"],
    )
    return chosen[0]


def sample_of(entry: dict) -> str:
    """``brick_0003_OK`` from ``OK/S0003/brick_0003_OK_C3_<stamp>.jpg``."""
    return "_".join(Path(entry["image_path"]).stem.split("_")[:3])


# ----------------------------------------------------------------------------- the cases
# Each case corrupts ``root`` and returns (extra command-line arguments, regexes the one
# error line must match: what was wrong, and where).


def truncated_jpeg(root: Path, tmp: Path):
    entry = first_entry(root, "train", "C3")
    path = category_dir(root) / entry["image_path"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [], [re.escape(path.name), "truncated JPEG", f"sample '{sample_of(entry)}' view C3"]


def corrupt_jpeg(root: Path, tmp: Path):
    entry = first_entry(root, "test", "C2")
    path = category_dir(root) / entry["image_path"]
    path.write_bytes(b"\xff\xd8 this is not JPEG data at all \xff\xd9")
    return [], [re.escape(path.name), "cannot be decoded", f"sample '{sample_of(entry)}' view C2"]


def view_other_size(root: Path, tmp: Path):
    entry = first_entry(root, "train", "C4")
    write_jpeg(category_dir(root) / entry["image_path"], np.full((64, 72, 3), 128, np.uint8))
    return [], [
        f"sample '{sample_of(entry)}' view C4 is 72x64 px, but view C1",
        "all views of a sample must have the same size",
    ]


def mask_other_size(root: Path, tmp: Path):
    entry = first_entry(root, "test", "C1", masked=True)
    write_mask_png(category_dir(root) / entry["mask_path"], np.ones((60, 64), bool))
    return [], [
        re.escape(Path(entry["mask_path"]).name),
        f"sample '{sample_of(entry)}' view C1 is 64x60 px, but its image .* is 64x64 px",
    ]


def mask_on_ok_sample(root: Path, tmp: Path):
    ok = first_entry(root, "test", "C2", masked=False)
    ng = first_entry(root, "test", "C2", masked=True)

    def edit(doc: dict) -> None:
        next(e for e in doc["test"] if e["image_path"] == ok["image_path"])["mask_path"] = ng[
            "mask_path"
        ]

    edit_split(root, edit)
    return [], [r"test\[\d+\]", f"sample '{sample_of(ok)}' view C2 is 'OK' but lists a mask"]


def four_of_five_views(root: Path, tmp: Path):
    entry = first_entry(root, "train", "C4")
    edit_split(
        root,
        lambda doc: doc["train"].remove(
            next(e for e in doc["train"] if e["image_path"] == entry["image_path"])
        ),
    )
    return [], [f"sample '{sample_of(entry)}' has no view \\['C4'\\]", "it has"]


def duplicated_view(root: Path, tmp: Path):
    entry = first_entry(root, "train", "C2")
    edit_split(root, lambda doc: doc["train"].append(dict(entry)))
    return [], [r"train\[\d+\]", f"sample '{sample_of(entry)}' lists view C2 twice"]


def entry_missing_key(root: Path, tmp: Path):
    edit_split(root, lambda doc: doc["train"][3].pop("anomaly_class"))
    return [], [r"brick\.json train\[3\]", r"missing keys \['anomaly_class'\]"]


def entry_wrong_type(root: Path, tmp: Path):
    def edit(doc: dict) -> None:
        doc["test"][5]["mask_path"] = 7

    edit_split(root, edit)
    return [], [r"brick\.json test\[5\]", "'mask_path' must be a string or null, got 7"]


def unknown_category(root: Path, tmp: Path):
    return ["--data.category", "zipper"], [
        "unknown Real-IAD category 'zipper'",
        r"available: \['brick'\]",
    ]


def empty_category(root: Path, tmp: Path):
    return ["--data.category", ""], ["the Real-IAD category is empty"]


def _edit_cache(root: Path, pair: str, H: list[list[float]]) -> None:
    path = cache_path_for(root, CATEGORY, 64)
    document = json.loads(path.read_text())
    document["pairs"][pair]["H"] = H
    path.write_text(json.dumps(document))  # json writes NaN as NaN, which json reads back


def nan_homography(root: Path, tmp: Path):
    _edit_cache(root, "C1->C2", [[float("nan"), 0, 0], [0, 1, 0], [0, 0, 1]])
    return [], ["homography cache .*homographies_brick_64.json", "'C1->C2'", "NaN or inf"]


def singular_homography(root: Path, tmp: Path):
    _edit_cache(root, "C3->C4", [[1, 2, 0], [2, 4, 0], [0, 0, 1]])
    return [], ["homography cache .*homographies_brick_64.json", "'C3->C4'", "singular"]


def sd2_folder_missing(root: Path, tmp: Path):
    folder = tmp / "no_such_sd2"
    return ["--model.backbone", "sd2", "--model.backbone_path", str(folder)], [
        f"the SD2 folder {re.escape(str(folder))}/ does not exist",
        "unet/, vae/, scheduler/",
    ]


def sd2_folder_incomplete(root: Path, tmp: Path):
    folder = tmp / "sd2"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text("{}")
    return ["--model.backbone", "sd2", "--model.backbone_path", str(folder)], [
        f"{re.escape(str(folder / 'vae'))}/ is missing",
        "unet/, vae/, scheduler/",
    ]


FIT_CASES = [
    truncated_jpeg,
    corrupt_jpeg,
    view_other_size,
    mask_other_size,
    mask_on_ok_sample,
    four_of_five_views,
    duplicated_view,
    entry_missing_key,
    entry_wrong_type,
    unknown_category,
    empty_category,
    nan_homography,
    singular_homography,
    sd2_folder_missing,
    sd2_folder_incomplete,
]  # unloadable SD2 parts, a wrong prompt embedding: tests/test_backbones.py, in process


# ----------------------------------------------------------------------------- checks


def files_below(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_one_error_line(proc, patterns: list[str]) -> str:
    """Exit code 2, no traceback, exactly one ``error:`` line (the last line of stderr)
    matching every pattern."""
    stderr = proc.stderr
    assert proc.returncode == 2, f"exit code {proc.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    return errors[0]


def assert_no_run_folder(runs: Path) -> None:
    versions = sorted(str(p) for p in runs.rglob("version_*"))
    assert not versions, f"a failed run left run folders behind: {versions}"


@pytest.fixture
def corrupted(synthetic_root_cached, copy_dataset, tmp_path):
    """``corrupt(case) -> (root, extra args, patterns, files before the run)``."""

    def corrupt(case):
        root = copy_dataset(synthetic_root_cached, tmp_path / "data")
        args, patterns = case(root, tmp_path)
        return root, args, patterns, files_below(root)

    return corrupt


def fit_args(root: Path, runs: Path, tiny_fit_args: list[str], extra: list[str]) -> list[str]:
    return [
        *tiny_fit_args,
        "--data.root", str(root), "--data.category", CATEGORY,
        "--trainer.default_root_dir", str(runs), *extra,
    ]  # fmt: skip


@SLOW
@pytest.mark.parametrize("case", FIT_CASES, ids=lambda case: case.__name__)
def test_vsad_fit_rejects_bad_input_with_one_line(
    case, corrupted, console_script, tiny_fit_args, tmp_path
):
    root, extra, patterns, before = corrupted(case)
    runs = tmp_path / "runs"
    proc = console_script("vsad-fit", *fit_args(root, runs, tiny_fit_args, extra))
    assert_one_error_line(proc, patterns)
    assert_no_run_folder(runs)
    # Nothing written into the dataset: no cache rebuilt over the bad one, no temporary file.
    assert files_below(root) == before


@SLOW
@pytest.mark.parametrize(
    "case", [truncated_jpeg, sd2_folder_missing], ids=lambda case: case.__name__
)
def test_vsad_debug_shows_the_traceback(case, corrupted, console_script, tiny_fit_args, tmp_path):
    # One case per place an error is raised: the data checks inside the Trainer (prepare_data)
    # and the model's constructor (inside LightningCLI). The wrapper is the same for all.
    root, extra, patterns, _ = corrupted(case)
    runs = tmp_path / "runs"
    proc = console_script(
        "vsad-fit", *fit_args(root, runs, tiny_fit_args, extra), env={"VSAD_DEBUG": "1"}
    )
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert re.search(r"vsad_lightning\.errors\.DataError: .*" + patterns[-1], proc.stderr)
    assert_no_run_folder(runs)


@SLOW
def test_config_typo_is_rejected_by_the_parser(
    synthetic_root_cached, console_script, tiny_fit_args, tmp_path
):
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  lambda_rr: 0.2\n")  # lambda_r misspelt
    runs = tmp_path / "runs"
    args = fit_args(synthetic_root_cached, runs, tiny_fit_args, ["--config", str(typo)])
    proc = console_script("vsad-fit", *args)
    # The parser's refusal (exit 2, usage, then one error line): what the user must see is the
    # misspelt key; the rest of the wording is jsonargparse's, not checked here.
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "lambda_rr" in last, last
    assert_no_run_folder(runs)


@SLOW
def test_vsad_homography_bad_jpeg_leaves_no_cache(
    synthetic_root, copy_dataset, console_script, tmp_path
):
    root = copy_dataset(synthetic_root, tmp_path / "data")
    _, patterns = truncated_jpeg(root, tmp_path)
    proc = console_script(
        "vsad-homography", "--root", str(root), "--category", CATEGORY, "--resolution", "64",
        "--samples", "8", "--quiet",
    )  # fmt: skip
    assert_one_error_line(proc, patterns)
    assert not (root / "vsad_cache").exists() or not any((root / "vsad_cache").iterdir())


# ----------------------------------------------------------------------------- in process


def test_header_probe_sizes_and_rejects_damaged_files(tmp_path):
    write_jpeg(tmp_path / "a.jpg", np.zeros((30, 40, 3), np.uint8))
    write_png(tmp_path / "m.png", np.zeros((30, 41), np.uint8))
    assert probe_image(tmp_path / "a.jpg") == (40, 30)
    assert probe_image(tmp_path / "m.png") == (41, 30)
    png = (tmp_path / "m.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) - 20])
    with pytest.raises(DataError, match=r"mask .*cut\.png is a truncated PNG"):
        probe_image(tmp_path / "cut.png", "mask")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(DataError, match=r"text\.jpg cannot be decoded"):
        probe_image(tmp_path / "text.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png is empty"):
        probe_image(tmp_path / "empty.png")


@pytest.mark.parametrize("mode", ["header", "decode"])
def test_file_check_lists_every_bad_sample_in_one_line(
    mode, synthetic_root_cached, copy_dataset, tmp_path
):
    root = copy_dataset(synthetic_root_cached, tmp_path / "data")
    dataset = RealIADDataset(root, CATEGORY, "train", 64)
    dataset.check_files(mode, "training")  # the intact copy passes
    bad = [dataset.records[i] for i in (1, 4, 6)]
    for record in bad:
        path = record.views[2].image_path
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError) as info:
        dataset.check_files(mode, "training")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"image of sample '{bad[0].sample_id}' view C3")
    assert "truncated JPEG" in message
    assert f"(and 2 more bad samples of the training split of category '{CATEGORY}': " in message
    assert f"['{bad[1].sample_id}', '{bad[2].sample_id}'])" in message
    dataset.check_files("none")  # the documented way out: no check at all


def test_one_line_joins_a_wrapped_library_message():
    assert one_line("could not load X:\n  Error no file named\n\n config.json ") == (
        "could not load X: Error no file named config.json"
    )


def test_only_unreliable_pairs_between_neighbours_are_reported(
    synthetic_root_cached, synthetic_spec, copy_dataset, tmp_path, recwarn
):
    root = copy_dataset(synthetic_root_cached, tmp_path / "data")
    path = cache_path_for(root, CATEGORY, 64)
    document = json.loads(path.read_text())
    for pair in ("C2->C4", "C4->C2", "C1->C5"):  # C2, C4: opposite side views, no neighbours
        document["pairs"][pair]["status"] = "unreliable"
    path.write_text(json.dumps(document))
    dm = MultiViewDataModule(str(root), CATEGORY, resolution=64, image_size=32)
    dm.setup("fit")
    assert dm.unreliable_neighbour_pairs() == ["C1->C5"]
    report = dm.homography_report()
    assert report["unreliable_pairs"] == ["C1->C5"] and report["views"] == synthetic_spec.views
    # One unreliable direction takes the pair out of the graph in both directions.
    assert report["removed_pairs"] == ["C1->C5", "C5->C1"]
    assert report["pairs"]["C2->C4"]["status"] == "unreliable"  # the evidence stays complete
    removed = "removed from the neighbour graph as unreliable"
    warned = [str(w.message) for w in recwarn if removed in str(w.message)]
    assert len(warned) == 1 and f"2 neighbour pairs {removed}: C1->C5, C5->C1" in warned[0]
    # The batch's graph has no edge there, so nothing looks across the pair.
    batch = next(iter(dm.train_dataloader()))
    assert not batch.neighbour_mask[0, 4] and not batch.neighbour_mask[4, 0]
    assert batch.neighbour_mask[0, 1] and batch.neighbour_mask[4, 3]
    assert report["neighbour_mask"] == batch.neighbour_mask.tolist()
    dm.setup("test")  # set up again: no second warning
    assert len([w for w in recwarn if removed in str(w.message)]) == 1
    # Four views: C5 is gone, and the ring of side views C2, C3, C4 closes: C2, C4 neighbour.
    subset = MultiViewDataModule(
        str(root), CATEGORY, resolution=64, image_size=32, views=["C1", "C2", "C3", "C4"]
    )
    subset.setup("test")
    assert subset.unreliable_neighbour_pairs() == ["C2->C4", "C4->C2"]
    assert subset.removed_neighbour_pairs() == ["C2->C4", "C4->C2"]
    assert subset.homography_report()["views"] == ["C1", "C2", "C3", "C4"]
    assert subset.homography_report()["cache_views"] == synthetic_spec.views


# ============================================================================ hostile input
# One table: every row is a hostile input or a bad config value. Each must end in exit code 2,
# exactly one ``error:`` line (the last line of stderr) matching the row's patterns, no
# traceback, no run folder left behind, and the dataset's bytes unchanged (hashed before and
# after). Rows run ``vsad-fit`` in process (the console script's own ``main``: no start-up
# cost); the rows that need another user or a file-size limit run the console script itself.


def digest_tree(root: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``root`` (symlinks not followed)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and os.access(p, os.R_OK)
    }


def png_header_claiming(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header claims ``width x height`` px (a decompression bomb's
    header: the pixels would cost ``3 W H`` bytes to decode)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def cache_file(root: Path) -> Path:
    return cache_path_for(root, CATEGORY, 64)


def edit_cache(root: Path, edit: Callable[[dict], None]) -> None:
    document = json.loads(cache_file(root).read_text())
    edit(document)
    cache_file(root).write_text(json.dumps(document))


# Each row: (name, corrupt(root, tmp) -> (extra args, [patterns])).
def _config(*args: str, patterns: list[str]):
    return lambda root, tmp: (list(args), patterns)


def bomb_header(root: Path, tmp: Path):
    entry = first_entry(root, "train", "C2")
    path = category_dir(root) / entry["image_path"]
    path.write_bytes(png_header_claiming(60000, 60000))
    return [], [re.escape(path.name), "claims 60000x60000 px", "VSAD_MAX_IMAGE_PIXELS"]


def bomb_header_no_cache(root: Path, tmp: Path):
    # No cache yet (an empty --data.cache_dir): homography estimation reads the image first.
    args, patterns = bomb_header(root, tmp)
    (tmp / "empty_cache").mkdir()
    return [*args, "--data.cache_dir", str(tmp / "empty_cache")], patterns


def cache_binary(root: Path, tmp: Path):
    cache_file(root).write_bytes(bytes(range(256)) * 4)
    return [], [re.escape(str(cache_file(root))), "not UTF-8"]


def cache_pairs_list(root: Path, tmp: Path):
    edit_cache(root, lambda d: d.update(pairs=list(d["pairs"].values())))
    return [], [re.escape(str(cache_file(root))), "'pairs' must be an object"]


def cache_image_size_zero(root: Path, tmp: Path):
    edit_cache(root, lambda d: d.update(image_size=[0, 0]))
    return [], [re.escape(str(cache_file(root))), r"'image_size' must be \[W, H\] positive"]


def cache_is_a_folder(root: Path, tmp: Path):
    path = cache_file(root)
    path.unlink()
    path.mkdir()
    return [], [re.escape(str(path)), "is a folder; expected a JSON file"]


def cache_of_another_category(root: Path, tmp: Path):
    edit_cache(root, lambda d: d.update(category="gravel"))
    return [], [re.escape(str(cache_file(root))), "cache of category 'gravel'", "'brick'"]


def split_json_latin1(root: Path, tmp: Path):
    document = json.loads(split_file(root).read_text())
    document["meta"] = {"note": "pièce défectueuse"}
    split_file(root).write_bytes(json.dumps(document, ensure_ascii=False).encode("latin-1"))
    return [], [re.escape(str(split_file(root))), "not UTF-8", "UTF-8 JSON"]


def same_sample_in_both_splits(root: Path, tmp: Path):
    def leak(document: dict) -> None:
        document["test"].append(dict(document["train"][3]))

    edit_split(root, leak)
    n_test = len(json.loads(split_file(root).read_text())["test"]) - 1
    return [], ["in both splits", r"train\[3\]", rf"test\[{n_test}\]", "brick_"]


HOSTILE_CASES = {
    "t_star_beyond_schedule": _config(
        "--model.t_star", "5000", patterns=[r"model\.t_star must be in \[1, 999\]", "5000"]
    ),
    "negative_sigma": _config("--model.sigma", "-1", patterns=[r"model\.sigma must be >= 0"]),
    "window_0": _config("--model.window", "0", patterns=[r"model\.window .*odd"]),
    "window_2": _config("--model.window", "2", patterns=[r"model\.window .*odd", "got 2"]),
    "num_heads_3": _config("--model.num_heads", "3", patterns=["divisible by num_heads"]),
    "image_size_60": _config(
        "--data.image_size",
        "60",
        "--model.unet_image_size",
        "60",
        patterns=["image_size 60", "multiple"],
    ),  # fmt: skip
    "unet_above_image_size": _config(
        "--data.image_size",
        "32",
        patterns=[r"unet_image_size 64 must be in \(0, image_size = 32\]"],
    ),
    "image_size_null_raw_resolution": _config(
        "--data.image_size",
        "null",
        "--data.resolution",
        "raw",
        patterns=[r"data\.image_size is null", r"data\.resolution is 'raw', not a size in px"],
    ),  # fmt: skip
    "inversion_steps_0": _config(
        "--model.inversion_steps", "0", patterns=[r"model\.inversion_steps must be >= 1"]
    ),
    "feature_level_9": _config(
        "--model.feature_levels", "[9]", patterns=["feature level 9 does not exist"]
    ),
    "coreset_ratio_0": _config(
        "--bank.coreset_ratio", "0", patterns=["coreset_ratio", r"\(0, 1\]"]
    ),
    "negative_lr": _config("--model.lr", "-1", patterns=[r"model\.lr must be >= 0"]),
    "negative_num_workers": _config(
        "--data.num_workers", "-1", patterns=[r"data\.num_workers must be >= 0"]
    ),
    "positional_bank_with_coreset": _config(
        "--bank.coreset_ratio", "0.5", patterns=["positional", r"bank\.coreset_ratio to 1\.0"]
    ),
    "negative_checkpoint_steps": _config(
        "--checkpoint_every_n_steps", "-1", patterns=["checkpoint_every_n_steps must be >= 0"]
    ),
    "bomb_header": bomb_header,
    "bomb_header_no_cache": bomb_header_no_cache,
    "cache_binary": cache_binary,
    "cache_pairs_list": cache_pairs_list,
    "cache_image_size_zero": cache_image_size_zero,
    "cache_is_a_folder": cache_is_a_folder,
    "cache_of_another_category": cache_of_another_category,
    "split_json_latin1": split_json_latin1,
    "same_sample_in_both_splits": same_sample_in_both_splits,
}


def assert_one_error_text(code: int | None, stderr: str, patterns: list[str]) -> str:
    """``assert_one_error_line`` for an in-process run (exit code and captured stderr)."""
    return assert_one_error_line(
        SimpleNamespace(returncode=code, stderr=stderr), patterns
    )  # same contract as the console script


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
@pytest.mark.parametrize("name", list(HOSTILE_CASES))
def test_hostile_input_ends_in_one_error_line(
    name, synthetic_root_cached, copy_dataset, tiny_fit_args, tmp_path, capfd, one_torch_thread
):
    root = copy_dataset(synthetic_root_cached, tmp_path / "data")
    extra, patterns = HOSTILE_CASES[name](root, tmp_path)
    before = digest_tree(root)
    runs = tmp_path / "runs"
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        fit_main(fit_args(root, runs, tiny_fit_args, extra))
    assert_one_error_text(info.value.code, capfd.readouterr().err, patterns)
    assert_no_run_folder(runs)
    assert digest_tree(root) == before


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_truncated_checkpoint_given_to_vsad_test(
    synthetic_root_cached, tiny_fit_args, tmp_path, capfd, one_torch_thread
):
    ckpt = tmp_path / "cut.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(50_000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:60_000])  # a copy cut short (a full disk, a kill)
    runs = tmp_path / "runs"
    before = digest_tree(synthetic_root_cached)
    args = [*fit_args(synthetic_root_cached, runs, tiny_fit_args, []), "--ckpt_path", str(ckpt)]
    capfd.readouterr()
    with pytest.raises(SystemExit) as info:
        vsad_test_main(args)
    err = capfd.readouterr().err
    assert_one_error_text(info.value.code, err, [re.escape(str(ckpt)), "cannot be read"])
    assert_no_run_folder(runs)  # no test/version_0 either
    assert digest_tree(synthetic_root_cached) == before


# ------------------------------------------- rows that need file permissions or a size limit
def _without_root_powers() -> list[str]:
    """A command prefix under which file modes apply: root normally ignores them, so as root
    drop the capabilities that override them (``setpriv``, util-linux)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: file modes cannot be enforced")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def _run_fit(args: list[str], prefix: list[str] = (), **popen) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("VSAD_DEBUG", None)
    env.pop("VSAD_CACHE_DIR", None)
    return subprocess.run(
        [*prefix, str(Path(sys.executable).parent / "vsad-fit"), *args],
        capture_output=True, text=True, timeout=600, env=env, **popen,
    )  # fmt: skip


def _set_modes(root: Path, folder_mode: int) -> None:
    for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        folder.chmod(folder_mode)


@SLOW
def test_read_only_dataset_without_cache_says_how_to_move_the_cache(
    synthetic_root_cached, copy_dataset, tiny_fit_args, tmp_path
):
    root = copy_dataset(synthetic_root_cached, tmp_path / "data")
    shutil.rmtree(root / CACHE_DIR_NAME)  # no cache yet: vsad-fit must write one
    before = digest_tree(root)
    runs = tmp_path / "runs"
    _set_modes(root, 0o555)  # a read-only dataset
    try:
        proc = _run_fit(fit_args(root, runs, tiny_fit_args, []), _without_root_powers())
    finally:
        _set_modes(root, 0o755)
    assert_one_error_line(
        proc,
        [re.escape(str(cache_file(root))), "Permission denied", "--data.cache_dir",
         "VSAD_CACHE_DIR"],
    )  # fmt: skip
    assert_no_run_folder(runs)
    assert digest_tree(root) == before


@SLOW
def test_unreadable_cache_of_another_user(
    synthetic_root_cached, copy_dataset, tiny_fit_args, tmp_path
):
    root = copy_dataset(synthetic_root_cached, tmp_path / "data")
    before = digest_tree(root)
    runs = tmp_path / "runs"
    cache_file(root).chmod(0o000)  # as another user's private file looks to us
    try:
        proc = _run_fit(fit_args(root, runs, tiny_fit_args, []), _without_root_powers())
    finally:
        cache_file(root).chmod(0o644)
    assert_one_error_line(
        proc, [re.escape(str(cache_file(root))), "cannot be read", "Permission denied"]
    )
    assert_no_run_folder(runs)
    assert digest_tree(root) == before


def _limit_file_size(limit: int):
    def set_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return set_limit


@SLOW
def test_full_disk_while_writing_the_cache(
    synthetic_root_cached, copy_dataset, tiny_fit_args, tmp_path
):
    root = copy_dataset(synthetic_root_cached, tmp_path / "data")
    caches = tmp_path / "caches"  # no cache there yet: vsad-fit estimates and writes one
    before = digest_tree(root)
    runs = tmp_path / "runs"
    proc = _run_fit(
        fit_args(root, runs, tiny_fit_args, ["--data.cache_dir", str(caches)]),
        preexec_fn=_limit_file_size(2000),  # `ulimit -f`: the cache JSON is larger
    )
    assert_one_error_line(proc, [re.escape(str(caches)), "File too large"])
    assert_no_run_folder(runs)
    assert digest_tree(root) == before
    assert not list(caches.glob("*")), "a half-written cache or temporary file was left"


# --------------------------------------------- accepted with a documented conversion
def test_non_rgb_views_are_converted_as_documented(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    # RGBA: the alpha channel is dropped, the colour under it kept as stored.
    alpha = np.dstack([bgr, np.zeros((6, 7), np.uint8)])
    cv2.imwrite(str(tmp_path / "rgba.png"), alpha)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "rgba.png"), rgb)
    # 16 bit: scaled to 8 bit, round(v / 257).
    deep = rgb.astype(np.uint16) * 257 + 100
    cv2.imwrite(str(tmp_path / "deep.png"), np.ascontiguousarray(deep[..., ::-1]))
    np.testing.assert_array_equal(
        read_image_rgb(tmp_path / "deep.png"), np.round(deep / 257).astype(np.uint8)
    )
    # Grey: repeated into R, G and B.
    cv2.imwrite(str(tmp_path / "grey.png"), rgb[..., 0])
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "grey.png"), rgb[..., [0, 0, 0]])
    # CMYK JPEG: converted to RGB by the decoder, close to Pillow's own conversion.
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    with Image.open(tmp_path / "cmyk.jpg") as reference:
        expected = np.asarray(reference.convert("RGB"), dtype=np.int16)
    got = read_image_rgb(tmp_path / "cmyk.jpg")
    assert got.shape == (6, 7, 3) and np.abs(got.astype(np.int16) - expected).max() <= 2


def test_mask_threshold_is_half_scale_so_jpeg_ringing_is_not_a_defect(tmp_path):
    mask = np.zeros((64, 64), bool)
    mask[20:40, 25:35] = True
    write_mask_png(tmp_path / "mask.png", mask)
    grey = np.where(mask, 255, 0).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "mask.jpg"), grey, [cv2.IMWRITE_JPEG_QUALITY, 75])
    ringing = cv2.imread(str(tmp_path / "mask.jpg"), cv2.IMREAD_UNCHANGED)
    assert ((ringing > 0) & ~mask).sum() > 0  # the JPEG grew the mask under "> 0"
    np.testing.assert_array_equal(read_mask(tmp_path / "mask.png"), mask)
    assert (read_mask(tmp_path / "mask.jpg") != mask).sum() <= 4  # the drawn area, kept
    cv2.imwrite(str(tmp_path / "labels.png"), mask.astype(np.uint8))  # a 0/1 label image
    np.testing.assert_array_equal(read_mask(tmp_path / "labels.png"), mask)
    cv2.imwrite(str(tmp_path / "mask16.png"), np.where(mask, 40000, 30000).astype(np.uint16))
    np.testing.assert_array_equal(read_mask(tmp_path / "mask16.png"), mask)


def test_exif_orientation_is_used_as_stored_with_a_warning(tmp_path):
    stored = np.zeros((4, 8, 3), np.uint8)
    stored[:, :4] = 255
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    images_module._WARNED_EXIF.clear()
    with pytest.warns(UserWarning, match=r"rotated\.jpg has EXIF orientation 6: it is used as"):
        assert probe_image(tmp_path / "rotated.jpg") == (8, 4)
    assert read_image_rgb(tmp_path / "rotated.jpg").shape == (4, 8, 3)  # not rotated


def test_image_size_cap_is_read_from_the_header_and_can_be_raised(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(png_header_claiming(20000, 20000))  # 400 MP claimed in 100 bytes
    with pytest.raises(DataError, match=r"huge\.png claims 20000x20000 px .*VSAD_MAX_IMAGE_PIX"):
        read_image_rgb(path)
    monkeypatch.setenv("VSAD_MAX_IMAGE_PIXELS", str(20000 * 20000))
    assert probe_image(path) == (20000, 20000)  # the documented override
    monkeypatch.setenv("VSAD_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(DataError, match="VSAD_MAX_IMAGE_PIXELS='lots' is not an integer"):
        probe_image(path)


def test_a_full_storage_met_by_a_library_write_is_one_line(tmp_path, capsys):
    @report_data_errors
    def writes(code: int) -> int:
        raise OSError(code, os.strerror(code), str(tmp_path / "events.out.tfevents.1"))

    for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS):
        with pytest.raises(SystemExit) as info:
            writes(code)
        assert info.value.code == 2
        assert capsys.readouterr().err == (
            f"error: could not write {tmp_path / 'events.out.tfevents.1'} ({os.strerror(code)})\n"
        )
    with pytest.raises(FileNotFoundError):  # not a storage problem: a bug, with its traceback
        writes(errno.ENOENT)
