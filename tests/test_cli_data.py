"""``vsad-synth`` and ``vsad-homography``: in-process ``main`` and the installed console
scripts, the JSON contract, the printed table, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vsad_lightning.cli.homography import main as homography_main
from vsad_lightning.cli.synth import main as synth_main
from vsad_lightning.data.synthetic import TRUTH_DIR
from vsad_lightning.geometry.cache import HomographyCache
from vsad_lightning.geometry.estimation import transfer_error

BIN = Path(sys.executable).parent
VIEWS = ["C1", "C2", "C3", "C4", "C5"]
SIZE = 128


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli") / "data"
    args = ["--out", str(root), "--categories", "gravel", "--seed", "4", "--image-size",
            str(SIZE), "--samples-train", "6", "--samples-test", "2"]  # fmt: skip
    code = synth_main(args)
    assert code == 0
    return root


def test_synth_writes_the_layout_and_refuses_to_overwrite(synth_root, capsys):
    assert (synth_root / f"realiad_{SIZE}" / "gravel" / "OK").is_dir()
    assert (synth_root / "realiad_jsons" / "gravel.json").is_file()
    assert (synth_root / TRUTH_DIR / "gravel.json").is_file()
    with pytest.raises(SystemExit) as exit_info:
        synth_main(["--out", str(synth_root), "--categories", "gravel", "--seed", "4",
                    "--image-size", str(SIZE)])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists" in err and len(err.splitlines()) == 1


def test_synth_overwrite_is_deterministic(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--categories", "1", "--seed", "9", "--image-size", "40",
            "--samples-train", "2", "--samples-test", "2"]  # fmt: skip
    assert synth_main(args) == 0
    assert "brick: 2 train, 2 test (1 anomalous)" in capsys.readouterr().out
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    assert synth_main([*args, "--overwrite"]) == 0
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


def check_contract(path: Path, root: Path, stdout: str) -> None:
    doc = json.loads(path.read_text())
    assert set(doc) == {"category", "image_size", "views", "pairs"}
    assert doc["category"] == "gravel" and doc["image_size"] == [SIZE, SIZE]
    assert doc["views"] == VIEWS
    keys = [f"{s}->{d}" for s in VIEWS for d in VIEWS if s != d]
    assert sorted(doc["pairs"]) == sorted(keys)  # every ordered pair
    cache = HomographyCache.load(path)
    true = HomographyCache.load(root / TRUTH_DIR / "gravel.json")
    grid = np.stack(np.meshgrid(np.arange(16, 112, 8) + 0.5, np.arange(16, 112, 8) + 0.5), -1)
    for key in keys:
        pair = doc["pairs"][key]
        assert set(pair) == {"H", "inliers", "inlier_ratio", "reproj_error_px", "status"}
        assert pair["status"] in ("ok", "unreliable")
        # The table shows the pair with its status.
        line = next(row for row in stdout.splitlines() if row.startswith(key + " "))
        assert line.split()[-1] == pair["status"] and int(line.split()[1]) == pair["inliers"]
        if pair["status"] == "ok" and key.startswith("C1->"):
            # Source pixel coordinates -> target pixel coordinates at the stored size.
            err = transfer_error(cache.pairs[key].H, true.pairs[key].H, grid.reshape(-1, 2))
            assert np.median(err) < 1.0, key
    assert all(doc["pairs"][f"C1->{v}"]["status"] == "ok" for v in VIEWS[1:])
    assert "unreliable pairs:" in stdout


def test_homography_main_in_process_writes_default_path(synth_root, capsys):
    assert homography_main(["--root", str(synth_root), "--category", "gravel",
                            "--resolution", str(SIZE), "--samples", "6"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    path = synth_root / "vsad_cache" / f"homographies_gravel_{SIZE}.json"
    assert f"wrote {path}" in out
    assert "pair" in out and "inliers" in out and "status" in out
    check_contract(path, synth_root, out)


def test_homography_console_script(synth_root, tmp_path):
    script = BIN / "vsad-homography"
    assert script.is_file(), f"console script missing: {script}"
    out_file = tmp_path / "custom" / "h.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(script), "--root", str(synth_root), "--category", "gravel", "--resolution",
         str(SIZE), "--samples", "4", "--out", str(out_file), "--quiet"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out_file.is_file()
    check_contract(out_file, synth_root, proc.stdout)
    assert "SIFT on" not in proc.stdout  # --quiet: the table only

    bad = subprocess.run(
        [str(script), "--root", str(synth_root), "--category", "zipper", "--resolution", str(SIZE)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown Real-IAD category 'zipper'")
    assert "gravel" in lines[0]


def test_synth_console_script_exists():
    proc = subprocess.run([str(BIN / "vsad-synth"), "--help"], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "--image-size" in proc.stdout
