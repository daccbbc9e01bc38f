"""Shared fixtures.

Synthetic data (``vsad_lightning.data.synthetic``, the same writer as ``vsad-synth``), created
once per test session:

- ``synthetic_root``: a Real-IAD-layout root with one category ``"brick"`` at 64x64 px
  (folder ``realiad_64``), 8 normal training samples and 8 test samples (4 anomalous),
  seed 0, and ``synthetic_truth/brick.json``. It has NO homography cache. Treat it as
  read-only: copy it (``copy_dataset``) before writing into it.
- ``synthetic_root_cached``: a separate copy of the same data whose
  ``vsad_cache/homographies_brick_64.json`` holds the TRUE homographies, so a
  ``MultiViewDataModule(root, "brick", resolution=64, ...)`` works without estimating
  the category cache. Read-only as well, except that a datamodule's ``setup`` adds its
  per-sample homography files next to that cache (``data.sample_homographies``: derived,
  reused by later setups; a test that needs them absent deletes them in its own copy).
- ``synthetic_spec``: the parameters of that data (category, image_size, samples_train,
  samples_test, anomalous_test, seed, views), so tests assert counts without repeating numbers.
- ``copy_dataset``: a function ``copy_dataset(src, dst) -> dst`` for tests that modify data.

Console scripts:

- ``console_script``: ``console_script(name, *args, env=None, timeout=600)`` runs an installed
  console script (``vsad-fit``, ...) as a subprocess and returns the ``CompletedProcess``
  without judging its exit code (tests of failures need it).
- ``tiny_fit_args``: ``--config configs/demo.yaml`` shrunk to the 64 px ``synthetic_root``
  and one short epoch; add ``--data.root``, ``--data.category`` and
  ``--trainer.default_root_dir``.

Distributed tests:

- ``ddp_rendezvous``: a fresh ``file://`` URL for ``torch.distributed.init_process_group(
  init_method=...)``: the processes meet through a file, so no TCP port is picked, released and
  hoped to be free again (the bind-close-reuse race of "free port" helpers).

(Test modules cannot import this file reliably under plain ``pytest``; use the fixtures.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vsad_lightning.data.dataset import cache_path_for
from vsad_lightning.data.synthetic import TRUTH_DIR, write_synthetic_dataset

SYNTHETIC = SimpleNamespace(
    category="brick",
    image_size=64,
    samples_train=8,
    samples_test=8,
    anomalous_test=4,
    seed=0,
    views=["C1", "C2", "C3", "C4", "C5"],
)


def _copy_dataset(src: Path, dst: Path) -> Path:
    """Copy a dataset root (small synthetic ones only) and return the copy."""
    shutil.copytree(src, dst)
    return dst


REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _console_script(
    name: str, *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run the installed console script ``name``; the caller judges the result."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    full_env.pop("VSAD_DEBUG", None)  # a developer's shell setting must not change the tests
    full_env.update(env or {})
    return subprocess.run(
        [str(BIN / name), *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


@pytest.fixture(scope="session")
def console_script():
    """``console_script(name, *args, env=None, timeout=600) -> CompletedProcess``."""
    return _console_script


@pytest.fixture(scope="session")
def tiny_fit_args() -> list[str]:
    """The demo config at 64 px, one epoch, cheap inversion (see the module docstring)."""
    size = str(SYNTHETIC.image_size)
    return [
        "--config", str(REPO / "configs" / "demo.yaml"),
        "--data.image_size", size, "--data.resolution", size,
        "--data.batch_size", "4", "--trainer.max_epochs", "1",
        "--model.inversion_steps", "2", "--pictures.num_samples", "1",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def synthetic_spec() -> SimpleNamespace:
    """The parameters of ``synthetic_root`` (see the module docstring)."""
    return SYNTHETIC


@pytest.fixture(scope="session")
def copy_dataset():
    """``copy_dataset(src, dst) -> dst``: copy a small dataset root before modifying it."""
    return _copy_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Read-only synthetic Real-IAD root without a homography cache (see the module doc)."""
    root = tmp_path_factory.mktemp("synthetic_root")
    write_synthetic_dataset(
        root,
        [SYNTHETIC.category],
        SYNTHETIC.seed,
        image_size=SYNTHETIC.image_size,
        samples_train=SYNTHETIC.samples_train,
        samples_test=SYNTHETIC.samples_test,
    )
    return root


@pytest.fixture(scope="session")
def synthetic_root_cached(synthetic_root, tmp_path_factory) -> Path:
    """Read-only copy of ``synthetic_root`` with the true homographies as its cache."""
    root = _copy_dataset(synthetic_root, tmp_path_factory.mktemp("cached") / "root")
    cache = cache_path_for(root, SYNTHETIC.category, SYNTHETIC.image_size)
    cache.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root / TRUTH_DIR / f"{SYNTHETIC.category}.json", cache)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one torch thread, then restore the setting.

    Tiny tensors are fastest on one thread, and it avoids oversubscribing a shared CPU.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ddp_rendezvous(tmp_path_factory) -> str:
    """A ``file://`` rendezvous for one process group (see the module docstring)."""
    return (tmp_path_factory.mktemp("rendezvous") / "store").as_uri()
