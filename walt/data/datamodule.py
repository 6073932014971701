"""The LightningDataModule that feeds every stage: video batches, optionally mixed with image batches."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

from walt.checks import check_int

__all__ = [
    "EpochShuffleSampler",
    "MixedBatchSampler",
    "ResumableDataLoader",
    "VideoDataModule",
    "collate_items",
]

log = logging.getLogger(__name__)


def collate_items(items: list[dict]) -> dict:
    """Stack item dicts into a batch: ``video`` (B, 3, T, H, W), ``label`` (B,), ``caption`` list[str].

    A key only some items have is dropped, except ``caption``, where a missing caption becomes ``""`` (the
    null prompt), so a folder with a few uncaptioned images still batches.
    """
    keys = set.intersection(*(set(item) for item in items))
    batch = {k: default_collate([item[k] for item in items]) for k in keys}
    if any("caption" in item for item in items):
        batch["caption"] = [item.get("caption", "") for item in items]
    return batch


class MixedBatchSampler(DistributedSampler):
    """Batches over ``ConcatDataset([videos, images])`` where a fixed fraction of batches are image batches.

    Each batch holds one kind only, since a video and an image differ in frame count. Image batches are
    spread evenly through the epoch (the k-th batch is an image batch when floor((k+1)r) > floor(kr)), so over
    any window of n batches the image count is within one of n*r. Order within each kind is shuffled by
    ``seed`` and the epoch; with ``num_replicas > 1`` each rank takes every num_replicas-th batch.

    It yields batches of indices, and :class:`VideoDataModule` passes it as the loader's ``sampler`` (over
    :class:`_Batches`) rather than as a ``batch_sampler``: being a ``DistributedSampler`` that already shards by rank,
    it is left alone by Lightning under DDP/FSDP, which cannot inject its own sampler into a custom batch sampler
    and stops with a TypeError. (``DistributedSampler.__init__`` is not called: it would count a dataset; the
    attributes it sets are set here.)
    """

    def __init__(
        self,
        num_videos: int,
        num_images: int,
        batch_size: int,
        image_batch_size: int,
        image_ratio: float,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if not 0.0 <= image_ratio < 1.0:
            raise ValueError(f"image_ratio must be in [0, 1), got {image_ratio}")
        if num_videos < batch_size:
            raise ValueError(
                f"the video dataset has {num_videos} items, fewer than one batch of {batch_size}"
            )
        if image_ratio > 0 and num_images < image_batch_size:
            raise ValueError(
                f"the image dataset has {num_images} items, fewer than one batch of {image_batch_size}"
            )
        self.num_videos, self.num_images = num_videos, num_images
        self.batch_size, self.image_batch_size = batch_size, image_batch_size
        self.image_ratio = image_ratio
        self.shuffle, self.seed = shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        video_batches = num_videos // batch_size
        total = video_batches if image_ratio == 0 else math.floor(video_batches / (1.0 - image_ratio))
        self._kinds = [math.floor((k + 1) * image_ratio) > math.floor(k * image_ratio) for k in range(total)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._kinds) // self.num_replicas

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        videos = _order(self.num_videos, self.shuffle, rng)
        images = self.num_videos + _order(self.num_images, self.shuffle, rng)
        batches, v, i = [], 0, 0
        for is_image in self._kinds:
            if is_image:
                if i + self.image_batch_size > len(images):  # fewer images than steps: start a new pass
                    images, i = self.num_videos + _order(self.num_images, self.shuffle, rng), 0
                batches.append(images[i : i + self.image_batch_size].tolist())
                i += self.image_batch_size
            else:
                batches.append(videos[v : v + self.batch_size].tolist())
                v += self.batch_size
        # Advance the epoch here too, so each pass over the loader reshuffles even where nobody calls set_epoch;
        # Lightning calls it before every epoch, and train_dataloader() sets it when a run resumes.
        self.epoch += 1
        usable = len(self) * self.num_replicas
        yield from batches[self.rank : usable : self.num_replicas]


class EpochShuffleSampler(Sampler[int]):
    """A permutation of ``range(n)`` drawn from ``(seed, epoch)``: every epoch differs, and a run resumed at
    epoch e sees exactly the order the uninterrupted run saw (Lightning calls ``set_epoch``)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from np.random.default_rng([self.seed, self.epoch]).permutation(self.n).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader that a checkpoint taken mid-epoch resumes exactly: the next batch is the one the interrupted run
    would have trained on next.

    Lightning saves a training loader's ``state_dict()`` in each checkpoint and, on resume, gives it back to
    ``load_state_dict()`` before the epoch's first batch. The state is the epoch (the sampler's, which Lightning
    sets every epoch) and how many of its batches were handed out; the resumed pass over that epoch draws the
    same order and leaves out that many batches of indices before any item is read, so nothing is loaded twice.
    Under DDP each rank's sampler yields its own shard and each rank skips within it. The count is exact because
    Lightning takes a sized loader's batches one at a time, without fetching ahead.

    The sampler's order must depend only on its seed and epoch (as :class:`EpochShuffleSampler`'s and
    :class:`MixedBatchSampler`'s do), and so must each item's own randomness, whichever worker reads it: before
    each pass the loader gives every :class:`walt.data.ClipDataset` it reads (also inside a ``ConcatDataset`` or
    ``Subset``) the sampler's seed and epoch, from which it draws its random clip offsets (``set_epoch``). A
    loader whose batches per epoch changed (another batch size or GPU count) cannot continue the old order: it
    starts the epoch afresh, with a warning.
    """

    _resume: dict[str, Any] | None = None  # a loaded state, applied when the next pass starts
    _skip = 0  # batches the pass being started leaves out
    _epoch: int | None = None
    _handed_out = 0  # batches of this epoch handed out, counting those skipped on resuming

    def __iter__(self) -> Iterator[Any]:
        epoch = getattr(self.sampler, "epoch", None)
        seed = _sampler_seed(self.sampler)
        # A DataLoader iterator draws its workers' base seed when created: from torch's global stream, it would
        # shift the training's random draws by one whenever a resumed run creates its iterator mid-epoch.
        self.generator = torch.Generator().manual_seed(_seed(seed, epoch or 0))
        # Before the workers read anything of this pass (persistent ones are handed its indices only below).
        _set_item_stream(self.dataset, epoch or 0, seed)
        self._skip = self._resume_point(epoch)
        self._epoch, self._handed_out = epoch, self._skip
        for batch in super().__iter__():
            self._handed_out += 1
            yield batch

    @property
    def _index_sampler(self):
        # The loader's iterators draw their indices from here: the skip happens on indices, before any reading.
        return _SkipFirst(super()._index_sampler, self)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "batches": self._handed_out, "batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def _resume_point(self, epoch: int | None) -> int:
        state, self._resume = self._resume, None
        if state is None or epoch is None or state["epoch"] != epoch or state["batches"] >= len(self):
            return 0  # no resume, or the checkpoint's epoch was finished: this pass is a new epoch
        if state["batches_per_epoch"] != len(self):
            log.warning(
                "the checkpoint's epoch had %d batches and this loader's has %d (another batch size or GPU "
                "count?): its data order cannot be continued, so epoch %d starts again from its first batch",
                state["batches_per_epoch"],
                len(self),
                epoch,
            )
            return 0
        return state["batches"]


class _SkipFirst(Sampler):
    """A loader's index sampler less the first ``loader._skip`` batches of a pass. The skip is taken (and reset)
    when the first index is drawn, not on ``iter()``: a DataLoader iterator calls ``iter()`` twice while it
    starts, and one that keeps its workers between epochs calls it again each epoch, which must not skip."""

    def __init__(self, sampler: Sampler, loader: ResumableDataLoader) -> None:
        self.sampler, self.loader = sampler, loader

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        skip, self.loader._skip = self.loader._skip, 0
        yield from itertools.islice(iter(self.sampler), skip, None)


class _Batches(Dataset):
    """Items fetched a batch at a time: ``batches[indices]`` is the list of ``dataset[i]``, for a loader whose
    sampler yields lists of indices (``batch_size=None``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[dict]:
        return [self.dataset[i] for i in indices]


def _sampler_seed(sampler: Sampler) -> int:
    """The seed of a loader's sampler, or of the sampler Lightning's ``DistributedSamplerWrapper`` shards (DDP)."""
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return int(getattr(inner if inner is not None else sampler, "seed", 0))


def _set_item_stream(dataset: Dataset, epoch: int, seed: int, depth: int = 0) -> None:
    """``set_epoch(epoch, seed)`` on every :class:`walt.data.ClipDataset` in ``dataset``, looking inside the
    wrappers that hold others (``_Batches``, ``Subset``: ``.dataset``; ``ConcatDataset``: ``.datasets``)."""
    from walt.data.base import ClipDataset

    if isinstance(dataset, ClipDataset):
        dataset.set_epoch(epoch, seed)
        return
    if depth > 8:
        return
    inner = [getattr(dataset, "dataset", None), *(getattr(dataset, "datasets", None) or [])]
    for child in inner:
        if isinstance(child, Dataset):
            _set_item_stream(child, epoch, seed, depth + 1)


def _seed(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


def _order(n: int, shuffle: bool, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(n) if shuffle else np.arange(n)


class VideoDataModule(L.LightningDataModule):
    """Train/val/test loaders over any datasets of item dicts, configured by ``class_path``/``init_args``.

    ``image_dataset`` and ``image_ratio`` mix still images into training for joint image-video training:
    ``image_ratio`` is the fraction of training batches that are image batches (of ``image_batch_size``
    images each, one frame per item). Skipped unreadable files are summarised when a stage ends.
    """

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None = None,
        test: Dataset | None = None,
        batch_size: int = 8,
        num_workers: int = 4,
        image_dataset: Dataset | None = None,
        image_ratio: float = 0.0,
        image_batch_size: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_int("batch_size", batch_size, 1)
        check_int("num_workers", num_workers, 0)
        if (
            not 0.0 <= image_ratio < 1.0
        ):  # checked again by the sampler, which is built only when training starts
            raise ValueError(f"image_ratio must be in [0, 1), got {image_ratio}")
        if image_batch_size is not None:
            check_int("image_batch_size", image_batch_size, 1)
        if image_ratio > 0 and image_dataset is None:
            raise ValueError("image_ratio > 0 needs an image_dataset (e.g. walt.data.ImageFolderVideos)")
        self.train, self.val, self.test = train, val, test
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_dataset = image_dataset
        self.image_ratio = image_ratio
        self.image_batch_size = image_batch_size or batch_size
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed

    def train_dataloader(self) -> DataLoader:
        if self.image_ratio == 0:
            return self._loader(self.train, shuffle=True, drop_last=True)
        replicas, rank = self._world()
        sampler = MixedBatchSampler(
            len(self.train),
            len(self.image_dataset),
            self.batch_size,
            self.image_batch_size,
            self.image_ratio,
            shuffle=True,
            seed=self.seed,
            num_replicas=replicas,
            rank=rank,
        )
        if self.trainer is not None:
            sampler.set_epoch(self.trainer.current_epoch)
        return ResumableDataLoader(
            _Batches(ConcatDataset([self.train, self.image_dataset])),
            sampler=sampler,
            batch_size=None,  # the sampler yields whole batches
            num_workers=self.num_workers,
            collate_fn=collate_items,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val is None else self._loader(self.val, shuffle=False, drop_last=False)

    def test_dataloader(self) -> DataLoader | list:
        return [] if self.test is None else self._loader(self.test, shuffle=False, drop_last=False)

    def teardown(self, stage: str) -> None:
        for name in ("train", "val", "test", "image_dataset"):
            dataset = getattr(self, name)
            skipped = getattr(dataset, "num_skipped", 0)  # distinct files, not skip events
            if skipped:
                total = getattr(getattr(dataset, "skips", None), "num_files", len(dataset))
                log.warning(
                    "%s data: %d of %d files were unreadable and skipped during %s (warnings above name them)",
                    name,
                    skipped,
                    total,
                    stage,
                )

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        # The shuffled loader is the training one: it is the one a mid-epoch checkpoint must continue.
        return (ResumableDataLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffleSampler(len(dataset), self.seed) if shuffle else None,
            drop_last=drop_last and len(dataset) >= self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_items,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )

    def _world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 1, 0
        return self.trainer.world_size, self.trainer.global_rank
