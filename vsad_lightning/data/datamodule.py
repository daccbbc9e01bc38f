"""``MultiViewDataModule``: the datasets, splits and loaders of one category.

- ``train``: the normal samples of the training split (an anomalous one there is an error
  naming it, never a silent skip), minus an optional held-out validation fraction chosen
  deterministically from ``seed``; ``val`` computes the validation loss on it.
- ``test``: the test split.
- ``predict``: a folder of unlabelled samples (``MultiViewFolderDataset`` layout with the
  sample folders directly in ``predict_root``; labels are 0 without masks).
- ``train_feature_dataloader()``: every training normal (validation part included), in a
  fixed order, unshuffled: the memory bank's input.

Bad input stops a run before training, never in the middle of it: ``setup`` indexes the
splits (JSON, file names, views, masks listed) and, per ``check_files``, reads every image and
mask header (corrupt or truncated files, view and mask sizes). ``setup("fit")`` also indexes
and checks the test split: ``vsad-fit`` tests right after training, and a bad test file found
then would cost the whole run. Every process checks its own files (a header check of Real-IAD's
150,000 images reads a few hundred bytes each); ``check_files="none"`` skips it.

Unreliable homography pairs of the cache (too few inliers or inconsistent directions,
``geometry.estimation``) do not stop a run: they leave the neighbour graph. The batches'
``neighbour_mask`` (``neighbour_graph_mask()``) is the graph's mask minus every unreliable
pair, in both directions, so MVAM's candidates, the consistency loss L_r and any cross-view
scoring never look across a pair whose geometry is unknown (no correspondence is invented).
``setup`` warns about the removed pairs, and ``homography_report()`` lists them for the run
folder. This is the one place that computes the mask.

Every sample is resized to ``image_size`` and normalised to [-1, 1]; masks stay exactly 0/1;
homographies are rescaled to ``image_size`` (pixel-centre scaling, ``geometry.projection``).
They come from the category's cache, and with ``per_sample_homographies`` (the default) each
sample's neighbour pairs come from its own images instead: ``estimate_sample_homographies``
(``geometry.per_sample``) with the category cache as prior, at the stored image resolution,
for the pairs of the reduced neighbour graph only. ``prepare_data`` (one process per node
under DDP) builds what is missing: the category cache (``ensure_homography_cache``) and one
per-sample file per split next to it (``data.sample_homographies``); ``setup`` (every process)
only loads them. A ``setup`` called without a Trainer (a user's script, one process) estimates
what is missing itself.

With ``register_views`` every sample's views are first registered to the category's reference
pose (``data.registration``, docs/method.md#registration): one more file per split, written by
``prepare_data`` and read by ``setup`` in the same way.

The training loader's order is a pure function of ``(seed, epoch, rank)``
(``ResumableShuffleSampler``), so training is reproducible and a resumed run sees exactly the
batches an uninterrupted run would have seen (see the sampler's docstring).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from vsad_lightning.data.batch import collate_multiview
from vsad_lightning.data.dataset import (
    FILE_CHECKS,
    NORMAL_CLASS,
    MultiViewDataset,
    SampleRecord,
)
from vsad_lightning.data.folder import MultiViewFolderDataset
from vsad_lightning.data.homographies import default_cache_for, ensure_homography_cache
from vsad_lightning.data.manta import MantaDataset
from vsad_lightning.data.realiad import RealIADDataset
from vsad_lightning.data.registration import (
    ensure_registration,
    reference_record,
    registration_cache_path,
    registration_matrices,
)
from vsad_lightning.data.sample_homographies import ensure_sample_homographies, sample_cache_path
from vsad_lightning.errors import DataError
from vsad_lightning.geometry.cache import HomographyCache, cache_dir_for
from vsad_lightning.geometry.per_sample import SampleHomographyFile, graph_pairs
from vsad_lightning.geometry.projection import NEIGHBOUR_GRAPHS, neighbour_mask

TOP_VIEW = "C1"
"""The top camera of the ``top_and_ring`` graph (Real-IAD, MANTA and the synthetic rig)."""


def resolved_image_size(image_size: int | None, resolution: int | str) -> int:
    """``data.image_size``, with ``None`` meaning the stored resolution (``data.resolution``).

    ``vsad-fit`` links this to ``model.image_size`` (``cli/run.py``), so the model and the
    data always agree on the size."""
    if image_size is None:
        try:
            image_size = int(resolution)
        except (TypeError, ValueError):
            raise DataError(
                f"data.image_size is null (the stored resolution), but data.resolution is "
                f"{resolution!r}, not a size in px: set data.image_size"
            ) from None
    if image_size < 8:
        raise DataError(f"data.image_size must be at least 8, got {image_size}")
    return int(image_size)


class ResumableShuffleSampler(DistributedSampler):
    """The training order: a shuffle seeded by ``(seed, epoch)``, one shard per rank, and an
    optional one-shot skip of the batches a resumed run has already trained on.

    Why not ``DataLoader(shuffle=True, generator=...)``: that generator's state depends on how
    many epochs the process has iterated, so a run resumed at epoch 3 would see epoch 0's order.
    Here ``set_epoch`` (called by Lightning at each epoch start, as for any
    ``DistributedSampler``) fully determines the permutation. Being a ``DistributedSampler``,
    Lightning keeps it under DDP instead of inserting its own, so one class serves 1 and N
    processes.

    Mid-epoch resume: Lightning 2.x (``loops/training_epoch_loop.py``) restores its batch
    counters but restarts a plain loader's iterator from the epoch's first batch, so it would
    train on the first ``k`` batches twice and never on the last ``k``. ``skip_batches(k)``
    drops this rank's first ``k * batch_size`` indices from the next ``__iter__`` only, and
    only if that pass is for ``epoch``, so the remaining batches are exactly those an
    uninterrupted run trains on. The epoch is checked when iteration starts, after Lightning's
    ``set_epoch``, because the loader may be built before the loops are restored (a cosine
    schedule's ``estimated_stepping_batches`` builds it from ``configure_optimizers``).
    ``__len__`` stays the full epoch, which is what Lightning's counters (already at ``k``)
    expect.
    """

    def __init__(
        self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0, epoch: int = 0
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.set_epoch(epoch)
        self._pending_skip: tuple[int, int] | None = None

    def skip_batches(self, count: int, batch_size: int, epoch: int | None = None) -> None:
        """Leave out this rank's first ``count`` batches on the next pass, if it is for
        ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        self._pending_skip = (epoch, max(0, count) * batch_size)

    def __iter__(self):
        indices = list(super().__iter__())
        pending, self._pending_skip = self._pending_skip, None
        if pending is not None and pending[0] == self.epoch:
            indices = indices[pending[1] :]
        return iter(indices)


class ShardSampler(DistributedSampler):
    """The evaluation order: samples ``rank, rank + world, ...`` in index order, nothing padded.

    Lightning's default under DDP (a ``DistributedSampler``) pads the last shard with repeated
    samples so that every rank gets as many; a repeated test sample is counted twice by
    ``AnomalyMetrics`` (its pixels, view and sample scores), so test metrics depended on the
    number of processes. Here each sample goes to exactly one rank, and the shards differ by at
    most one sample. Being a ``DistributedSampler``, Lightning keeps it instead of inserting
    its own. Ranks may run different numbers of batches: the test and predict steps hold no
    collective call (the metric states and score rows are gathered once, at epoch end).
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class MultiViewDataModule(L.LightningDataModule):
    """Loaders of ``MultiViewBatch``es for one category.

    Args:
        root: the dataset root.
        category: Real-IAD category, MANTA ``domain/class``, or the folder dataset's name.
        dataset: ``"realiad"``, ``"manta"`` or ``"folder"``.
        resolution: Real-IAD's ``realiad_<resolution>`` folder (an integer or ``"raw"``).
        views: the views to use, in this order; ``None``: all of them (``C1..C5``).
        image_size: side of the square images fed to the model; ``None``: the stored
            resolution (``resolution``, which must then be an integer), so that
            ``--data.resolution 256`` models 256 px views and 128 px data stay at 128 px
            (``configs/demo.yaml``; ``resolved_image_size``).
        neighbour_graph: ``"top_and_ring"`` (C1 must be the first view), ``"ring"`` or
            ``"all"`` (``geometry.neighbour_mask``).
        val_fraction: fraction of the training normals held out for the validation loss.
        batch_size: training batch size.
        eval_batch_size: validation/test/predict batch size (default ``batch_size``).
        num_workers: ``DataLoader`` worker processes (0: load in the main process).
        pin_memory: ``DataLoader(pin_memory=...)``: page-locked batches for faster GPU copies.
        homography_samples: ``K`` normal samples pooled when the cache has to be estimated.
        seed: seeds the validation split and the training shuffle's generator.
        predict_root: the folder ``vsad-predict`` scores.
        check_files: how much of every image and mask ``setup`` reads before training:
            ``"header"`` (sizes, truncation, unreadable files; the default), ``"decode"``
            (every pixel, as training will: slower, also catches files whose header is fine
            but whose data is not) or ``"none"``.
        per_sample_homographies: ``True``: each sample's homographies are estimated from its
            own images with the category cache as prior (parts are placed by hand, so every
            sample's geometry differs from the category's by a few pixels), once per sample
            and split, cached in ``<root>/vsad_cache/homographies_<category>_<res>_samples_
            <split>.json``; pairs not estimated keep the category's. ``False``: the category's
            homographies for every sample (the behaviour before per-sample estimation).
        register_views: ``True``: every sample's view ``v`` is warped onto the category's
            reference sample's view ``v`` (the first normal training sample in sorted
            sample-id order) by a homography ``R_v`` estimated from the images, before the
            resize; the cross-view homographies become those between registered frames, the
            masks stay in the original frames, and the batches carry ``R_v`` in
            ``registration`` so that the model returns its maps in the original frames
            (docs/method.md#registration). Cached per split in ``<root>/vsad_cache/
            homographies_<category>_<res>_registration_<split>.json``. For the positional
            bank on busy textures, where a few pixels of placement ruin the comparison.
            ``False`` (the default): no registration, batches carry identities.
        cache_dir: the folder of the homography caches instead of ``<root>/vsad_cache/``
            (a read-only dataset); the environment variable ``VSAD_CACHE_DIR`` sets the
            default. One folder per dataset root.
    """

    def __init__(
        self,
        root: str,
        category: str,
        dataset: Literal["realiad", "manta", "folder"] = "realiad",
        resolution: int | str = 256,
        views: list[str] | None = None,
        image_size: int | None = 256,
        neighbour_graph: str = "top_and_ring",
        val_fraction: float = 0.0,
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        homography_samples: int = 8,
        seed: int = 0,
        predict_root: str | None = None,
        check_files: Literal["header", "decode", "none"] = "header",
        per_sample_homographies: bool = True,
        register_views: bool = False,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if dataset not in ("realiad", "manta", "folder"):
            raise DataError(f"data.dataset must be realiad, manta or folder, got {dataset!r}")
        if neighbour_graph not in NEIGHBOUR_GRAPHS:
            raise DataError(
                f"data.neighbour_graph must be one of {NEIGHBOUR_GRAPHS}, got {neighbour_graph!r}"
            )
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        image_size = resolved_image_size(image_size, resolution)
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise DataError("data.batch_size and data.eval_batch_size must be >= 1")
        if check_files not in FILE_CHECKS:
            raise DataError(f"data.check_files must be one of {FILE_CHECKS}, got {check_files!r}")
        self.save_hyperparameters()
        # The resolved size, as model.image_size has it: Lightning requires the keys the two
        # share to be equal, and LightningCLI's instantiation records the argument as given.
        self.save_hyperparameters({**self.hparams, "image_size": image_size})
        self.root = root
        self.category = category
        self.dataset = dataset
        self.resolution = resolution
        self.views = list(views) if views is not None else None
        self.image_size = image_size
        self.neighbour_graph = neighbour_graph
        self.val_fraction = val_fraction
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.homography_samples = homography_samples
        self.seed = seed
        self.predict_root = predict_root
        self.check_files = check_files
        self.per_sample_homographies = per_sample_homographies
        self.register_views = register_views
        self.cache_dir = cache_dir
        self.registration: dict[str, SampleHomographyFile | None] = {}  # split -> its file
        self.reference: SampleRecord | None = None  # the reference pose (register_views)
        self._warned_unreliable = False
        self._estimating = False  # True while prepare_data sets up: it may write caches
        self.sample_homographies: dict[str, SampleHomographyFile] = {}  # split -> its file

        self.homographies: HomographyCache | None = None
        self.view_names: list[str] | None = None
        self.train_normals: MultiViewDataset | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: MultiViewDataset | None = None
        self.predict_set: MultiViewDataset | None = None
        # (epoch, batches already trained in it) from a mid-epoch checkpoint; see state_dict.
        self._resume_position: tuple[int, int] | None = None

    # ------------------------------------------------------------------ resume position

    def state_dict(self) -> dict:
        """Where training stands in the current epoch, saved in every checkpoint.

        ``ready`` counts the batches Lightning has taken from the loader this epoch; a
        checkpoint written at a batch end has trained on all of them.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return {}
        loop = trainer.fit_loop
        return {
            "train_epoch": int(loop.epoch_progress.current.processed),
            "train_batches_done": int(loop.epoch_loop.batch_progress.current.ready),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if "train_epoch" in state_dict:
            self._resume_position = (
                int(state_dict["train_epoch"]),
                int(state_dict["train_batches_done"]),
            )

    # ------------------------------------------------------------------ files and caches

    @property
    def cache_path(self) -> Path:
        """Where the category's homography cache lives."""
        path = default_cache_for(self.dataset, self.root, self.category, self.resolution)
        folder = cache_dir_for(self.root, self.cache_dir)  # data.cache_dir, $VSAD_CACHE_DIR
        return folder / path.name

    def prepare_data(self) -> None:
        """Estimate and write the homography cache if it is missing (once per node), then,
        under a Trainer, set up and check the files of the Trainer's stage.

        Why here and not only in ``setup``: Lightning opens the logger (creating the run's
        ``version_N`` folder) between ``prepare_data`` and ``setup``, and bad input must leave
        no run folder behind. ``setup`` repeats the check in the processes that skip
        ``prepare_data`` (DDP ranks other than each node's first); in this one it is a no-op.
        """
        ensure_homography_cache(
            self.root,
            self.category,
            self.resolution,
            self.homography_samples,
            dataset=self.dataset,
            path=self.cache_path,
        )  # all views: any subset (data.views) can use the same cache later
        trainer = self.trainer
        if trainer is not None and trainer.state.fn is not None:
            self._estimating = True  # the per-sample homographies are estimated here
            try:
                self.setup(str(trainer.state.fn.value))
            finally:
                self._estimating = False

    def sample_cache_path(self, split: str) -> Path:
        """The per-sample homography file of ``split`` (``train``, ``test`` or ``predict``),
        next to the category cache."""
        return sample_cache_path(self.cache_path, split)

    def _attach_sample_homographies(self, split: str, dataset: MultiViewDataset) -> None:
        """Give ``dataset`` its samples' own homographies (``per_sample_homographies``).

        Only the ordered pairs of the reduced neighbour graph are estimated: the others are
        never looked across. Writes the split's file only in ``prepare_data``, or without a
        Trainer; under a Trainer, ``setup`` (every DDP process) only reads it.
        """
        if not self.per_sample_homographies or split in self.sample_homographies:
            return
        pairs = self._graph_pairs()
        if not pairs:
            return
        found = ensure_sample_homographies(
            dataset.records,
            self.homographies,
            pairs,
            self.sample_cache_path(split),
            split=split,
            write=self._estimating or self.trainer is None,
        )
        self.sample_homographies[split] = found
        ids = {r.sample_id for r in dataset.records}
        dataset.set_sample_homographies(
            found.image_size, {s: found.matrices(s) for s in found.samples if s in ids}
        )

    def registration_cache_path(self, split: str) -> Path:
        """The registration file of ``split`` next to the category cache."""
        return registration_cache_path(self.cache_path, split)

    def _reference_record(self) -> SampleRecord:
        """The reference pose of ``register_views`` (``data.registration.reference_record``):
        from the training split, whatever the stage (only its index is read here)."""
        if self.reference is None:
            train = self.train_normals
            records = (train if train is not None else self._make_dataset("train")).records
            self.reference = reference_record(records, self.category)
        return self.reference

    def _attach_registration(self, split: str, dataset: MultiViewDataset) -> None:
        """Register ``dataset``'s views to the reference pose (``register_views``). Writes the
        split's file only in ``prepare_data``, or without a Trainer, like the per-sample
        homographies."""
        if not self.register_views or split in self.registration:
            return
        found = ensure_registration(
            dataset.records,
            self._reference_record(),
            self.registration_cache_path(split),
            split=split,
            write=self._estimating or self.trainer is None,
            category=self._load_homographies(),
        )
        self.registration[split] = found
        views = list(dataset.view_names)
        ids = {r.sample_id for r in dataset.records}
        size = found.image_size if found is not None else (1, 1)
        matrices = (
            {}
            if found is None
            else {s: registration_matrices(found, s, views) for s in found.samples if s in ids}
        )
        dataset.set_registration(size, matrices)

    def _load_homographies(self) -> HomographyCache:
        if self.homographies is None:
            if not self.cache_path.is_file():
                # setup() without prepare_data() (a user calling it directly): build it here.
                self.prepare_data()
            self.homographies = HomographyCache.load(self.cache_path)
        return self.homographies

    def _make_dataset(self, split: str | None, root: str | None = None) -> MultiViewDataset:
        cache = self._load_homographies()
        common = dict(views=self.views, image_size=self.image_size, homographies=cache)
        if root is not None:  # predict: a folder of samples, this category's rig
            return MultiViewFolderDataset(root, None, category=self.category, **common)
        if self.dataset == "realiad":
            return RealIADDataset(self.root, self.category, split, self.resolution, **common)
        if self.dataset == "manta":
            return MantaDataset(self.root, self.category, split, **common)
        return MultiViewFolderDataset(self.root, split, category=self.category, **common)

    def _check_views(self, dataset: MultiViewDataset, what: str) -> None:
        if self.view_names is None:
            self.view_names = list(dataset.view_names)
            if self.neighbour_graph == "top_and_ring" and self.view_names[0] != TOP_VIEW:
                raise DataError(
                    f"neighbour_graph 'top_and_ring' needs the top view {TOP_VIEW} first, but "
                    f"the views are {self.view_names}; use data.views with {TOP_VIEW} first, or "
                    "data.neighbour_graph ring or all"
                )
        elif dataset.view_names != self.view_names:
            raise DataError(
                f"the {what} samples have views {dataset.view_names}, but the training samples "
                f"have {self.view_names}"
            )

    # ---------------------------------------------------------------------------- stages

    def setup(self, stage: str | None = None) -> None:
        if stage in ("fit", "validate", None) and self.train_normals is None:
            self._setup_train()
            self.train_normals.check_files(self.check_files, "training")
        # fit: the test split too, before training (see the module docstring).
        if stage in ("fit", "test", None) and self.test_set is None:
            self.test_set = self._make_dataset("test")
            self._check_views(self.test_set, "test")
            self.test_set.check_files(self.check_files, "test")
        if stage == "predict" and self.predict_set is None:
            if not self.predict_root:
                raise DataError("vsad-predict needs data.predict_root (a folder of samples)")
            self.predict_set = self._make_dataset(None, self.predict_root)
            self._check_views(self.predict_set, "predict")
            self.predict_set.check_files(self.check_files, "predict")
        # Only once every split's files passed: bad input writes nothing into the dataset.
        for split, dataset in self._splits().items():
            self._attach_sample_homographies(split, dataset)
            self._attach_registration(split, dataset)
        self._warn_unreliable_pairs()

    def _splits(self) -> dict[str, MultiViewDataset]:
        splits = {"train": self.train_normals, "test": self.test_set, "predict": self.predict_set}
        return {name: dataset for name, dataset in splits.items() if dataset is not None}

    # ------------------------------------------------------------- homography reliability

    def unreliable_neighbour_pairs(self) -> list[str]:
        """The cache's unreliable pairs between views that are neighbours in
        ``neighbour_graph`` (both views selected), as the cache marks them."""
        if self.homographies is None or self.view_names is None:
            return []
        mask = neighbour_mask(self.neighbour_graph, len(self.view_names))
        bad = set(self.homographies.unreliable_pairs())
        return [
            HomographyCache.pair_key(src, dst)
            for i, src in enumerate(self.view_names)
            for j, dst in enumerate(self.view_names)
            if i != j and bool(mask[i, j]) and HomographyCache.pair_key(src, dst) in bad
        ]

    def neighbour_graph_mask(self) -> Tensor:
        """``(V, V)`` bool: ``neighbour_graph``'s mask minus every unreliable pair of the cache,
        in both directions (an unreliable ``v->u`` removes ``u->v`` too: the two are one
        geometric relation). Every batch carries it; MVAM, L_r and cross-view scoring read it
        from there. Needs ``setup``."""
        if self.homographies is None or self.view_names is None:
            raise RuntimeError("call setup() before asking for the neighbour graph")
        index = {view: i for i, view in enumerate(self.view_names)}
        mask = torch.zeros(len(index), len(index), dtype=torch.bool)
        for src, dst in self._graph_pairs():
            mask[index[src], index[dst]] = True
        return mask

    def _graph_pairs(self) -> list[tuple[str, str]]:
        """The ordered pairs of ``neighbour_graph_mask``, which are also the pairs whose
        per-sample homographies are estimated (``geometry.per_sample.graph_pairs``)."""
        if self.homographies is None or self.view_names is None:
            raise RuntimeError("call setup() before asking for the neighbour graph")
        return graph_pairs(self.homographies, self.view_names, self.neighbour_graph, bridged=False)

    def removed_neighbour_pairs(self) -> list[str]:
        """The ordered neighbour pairs that ``neighbour_graph_mask`` removes (both directions
        of every unreliable neighbour pair)."""
        if self.homographies is None or self.view_names is None:
            return []
        graph = neighbour_mask(self.neighbour_graph, len(self.view_names))
        removed = graph & ~self.neighbour_graph_mask()
        return [
            HomographyCache.pair_key(src, dst)
            for i, src in enumerate(self.view_names)
            for j, dst in enumerate(self.view_names)
            if bool(removed[i, j])
        ]

    def homography_report(self) -> dict | None:
        """What the run folder's ``homographies.json`` holds: the cache file, the views and
        graph used, the unreliable neighbour pairs, the pairs removed from the graph because of
        them (``removed_pairs``, both directions), the mask the batches carry and every pair's
        evidence. ``None`` before ``setup``."""
        if self.homographies is None or self.view_names is None:
            return None
        cache = self.homographies.to_json()
        return {
            "cache": str(self.cache_path),
            "category": cache["category"],
            "image_size": cache["image_size"],
            "cache_views": cache["views"],
            "views": list(self.view_names),
            "neighbour_graph": self.neighbour_graph,
            "unreliable_pairs": self.unreliable_neighbour_pairs(),
            "removed_pairs": self.removed_neighbour_pairs(),
            "neighbour_mask": self.neighbour_graph_mask().tolist(),
            "pairs": cache["pairs"],
            "per_sample": {
                split: {"file": str(self.sample_cache_path(split)), "status": f.status_counts()}
                for split, f in self.sample_homographies.items()
            },
            "registration": None
            if not self.register_views or self.reference is None
            else {
                "reference": self.reference.sample_id,
                "splits": {
                    split: {
                        "file": str(self.registration_cache_path(split)),
                        "status": f.status_counts() if f is not None else {},
                    }
                    for split, f in self.registration.items()
                },
            },
        }

    def _warn_unreliable_pairs(self) -> None:
        removed = self.removed_neighbour_pairs()
        if removed and not self._warned_unreliable:
            self._warned_unreliable = True
            rank_zero_warn(
                f"homography cache {self.cache_path}: {len(removed)} neighbour pairs removed "
                f"from the neighbour graph as unreliable: {', '.join(removed)} (too few inliers "
                "or inconsistent directions; MVAM, L_r and cross-view scoring do not look across "
                "them; rebuild with more `vsad-homography --samples` if the views overlap); the "
                "run folder's homographies.json lists them",
                category=UserWarning,
            )

    def _setup_train(self) -> None:
        train = self._make_dataset("train")
        self._check_views(train, "training")
        anomalous = [
            r.sample_id for r in train.records if r.label != 0 or r.anomaly_class != NORMAL_CLASS
        ]
        if anomalous:
            more = " ..." if len(anomalous) > 5 else ""
            raise DataError(
                f"the training split of category {self.category!r} holds anomalous samples "
                f"(not 'OK', or with masks): {anomalous[:5]}{more}; the memory bank and the "
                "diffusion loss must only see normal samples"
            )
        self.train_normals = train
        n = len(train)
        n_val = int(round(self.val_fraction * n))
        if self.val_fraction > 0:
            n_val = max(1, n_val)
            if n_val >= n:
                raise DataError(
                    f"data.val_fraction={self.val_fraction} leaves no training samples out of {n}"
                )
        order = np.random.default_rng(self.seed).permutation(n)
        val_idx, train_idx = sorted(order[:n_val].tolist()), sorted(order[n_val:].tolist())
        self.train_set = Subset(train, train_idx) if n_val else train
        self.val_set = Subset(train, val_idx) if n_val else None

    # --------------------------------------------------------------------------- loaders

    def _collate(self):
        return functools.partial(collate_multiview, neighbour_mask=self.neighbour_graph_mask())

    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, shard: bool = False
    ) -> DataLoader:
        # Only the evaluation loaders come here (shuffle=False); see train_dataloader.
        # shard: test and predict split the samples over the ranks without repeats
        # (ShardSampler), so every sample is scored and counted exactly once.
        sampler = None
        trainer = getattr(self, "trainer", None)
        if shard and trainer is not None:
            if len(dataset) < trainer.world_size:
                # A process without samples would skip the epoch's end, where the metric
                # states are gathered, and leave the others waiting there.
                raise DataError(
                    f"{len(dataset)} samples to score on {trainer.world_size} processes: each "
                    "process needs at least one; use fewer trainer.devices"
                )
            sampler = ShardSampler(dataset, trainer.world_size, trainer.global_rank)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self._collate(),
            persistent_workers=self.num_workers > 0,
        )

    def _require(self, dataset, stage: str):
        if dataset is None:
            raise RuntimeError(f"call setup({stage!r}) before asking for its loader")
        return dataset

    def train_dataloader(self) -> DataLoader:
        """Shuffled by ``ResumableShuffleSampler``; after a mid-epoch resume, the first pass
        starts where the checkpoint left off."""
        dataset = self._require(self.train_set, "fit")
        trainer = getattr(self, "trainer", None)
        world, rank, epoch = 1, 0, 0
        if trainer is not None:
            world, rank = trainer.world_size, trainer.global_rank
            epoch = int(trainer.fit_loop.epoch_progress.current.processed)
        sampler = ResumableShuffleSampler(dataset, world, rank, seed=self.seed, epoch=epoch)
        if self._resume_position is not None:
            saved_epoch, done = self._resume_position
            if 0 < done < math.ceil(len(sampler) / self.batch_size):
                sampler.skip_batches(done, self.batch_size, epoch=saved_epoch)
            self._resume_position = None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            collate_fn=self._collate(),
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        """The held-out normals, or an empty list (Lightning then skips validation)."""
        if self.val_fraction == 0:
            return []
        return self._loader(self._require(self.val_set, "fit"), self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        """The test split, each sample on exactly one rank (``ShardSampler``)."""
        test = self._require(self.test_set, "test")
        return self._loader(test, self.eval_batch_size, False, shard=True)

    def predict_dataloader(self) -> DataLoader:
        """The predict folder, each sample on exactly one rank (``ShardSampler``)."""
        found = self._require(self.predict_set, "predict")
        return self._loader(found, self.eval_batch_size, False, shard=True)

    def train_feature_dataloader(self) -> DataLoader:
        """Every training normal in index order, unshuffled (the memory bank's input)."""
        if self.train_normals is None:
            self._setup_train()
            self._attach_sample_homographies("train", self.train_normals)
            self._attach_registration("train", self.train_normals)
        return self._loader(self.train_normals, self.eval_batch_size, shuffle=False)
