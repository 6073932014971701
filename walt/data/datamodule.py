"""The LightningDataModule that feeds every stage: video batches, optionally mixed with image batches."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Sampler
from torch.utils.data._utils.collate import default_collate

__all__ = ["EpochShuffleSampler", "MixedBatchSampler", "VideoDataModule", "collate_items"]

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


class _Batches(Dataset):
    """Items fetched a batch at a time: ``batches[indices]`` is the list of ``dataset[i]``, for a loader whose
    sampler yields lists of indices (``batch_size=None``)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, indices: list[int]) -> list[dict]:
        return [self.dataset[i] for i in indices]


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
        return DataLoader(
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
            skipped = getattr(getattr(self, name), "num_skipped", 0)
            if skipped:
                log.warning(
                    "%s data: %d unreadable files were skipped during %s (warnings above name them)",
                    name,
                    skipped,
                    stage,
                )

    def _loader(self, dataset: Dataset, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
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
