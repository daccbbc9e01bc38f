"""Bad input through the real console scripts: one readable line, exit code 2.

Each case corrupts a fresh copy of the small synthetic Real-IAD root (``synthetic_root_cached``,
true homographies as its cache) and runs ``vsad-fit`` (or ``vsad-homography``) as a user
would. Every case must fail during data validation, before any training, and leave nothing
behind: no run folder ``version_N`` and no new or half-written file in the dataset's cache.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from vsad_lightning.cli._common import one_line
from vsad_lightning.data.datamodule import MultiViewDataModule
from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.data.images import probe_image, write_jpeg, write_mask_png, write_png
from vsad_lightning.data.realiad import RealIADDataset
from vsad_lightning.errors import DataError

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
    # jsonargparse's own message (exit code 2 as well): usage, then the option it refused.
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: Group 'model' does not accept option 'lambda_rr'"
    )
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
