"""VideoDataModule batches, the image/video mix ratio, and sharding across ranks."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DistributedSampler

from walt.data import MixedBatchSampler, SyntheticVideos, VideoDataModule


def _module(**kwargs) -> VideoDataModule:
    videos = SyntheticVideos(num_samples=48, num_frames=5, resolution=16, seed=0)
    images = SyntheticVideos(num_samples=40, num_frames=1, resolution=16, seed=1)
    return VideoDataModule(videos, batch_size=4, num_workers=0, image_dataset=images, **kwargs)


def test_video_batches_are_stacked_dicts():
    batch = next(iter(_module().train_dataloader()))
    assert batch["video"].shape == (4, 3, 5, 16, 16)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)
    assert len(batch["caption"]) == 4 and all(c.startswith("a ") for c in batch["caption"])


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.1])
def test_image_ratio_holds_exactly_and_evenly(ratio):
    loader = _module(image_ratio=ratio, image_batch_size=8).train_dataloader()
    kinds = []
    for batch in loader:
        frames = batch["video"].shape[2]
        assert batch["video"].shape[0] == (8 if frames == 1 else 4)  # each batch holds one kind only
        kinds.append(frames == 1)
    video_batches = 48 // 4
    assert kinds.count(False) == video_batches  # every video batch of the epoch is still seen
    assert kinds.count(True) == math.floor(video_batches / (1 - ratio)) - video_batches
    # Over every window of n batches, the number of image batches is within one of n * ratio.
    for n in range(1, len(kinds) + 1):
        for start in range(len(kinds) - n + 1):
            assert abs(sum(kinds[start : start + n]) - n * ratio) <= 1


def test_mixed_sampler_reshuffles_each_epoch_and_shards_ranks_disjointly():
    sampler = MixedBatchSampler(48, 40, 4, 8, 0.25, seed=0)
    first, second = list(sampler), list(sampler)
    assert first != second and sorted(map(tuple, first)) != sorted(map(tuple, second))
    sampler.set_epoch(0)
    assert list(sampler) == first  # resuming at an epoch reproduces its order
    ranks = [list(MixedBatchSampler(48, 40, 4, 8, 0.25, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(first) // 2
    assert [b for pair in zip(*ranks) for b in pair] == first[: 2 * len(ranks[0])]
    videos = [i for rank in ranks for b in rank for i in b if i < 48]
    assert len(videos) == len(set(videos))  # no video index is seen by both ranks in an epoch


def test_bad_mix_settings_fail_with_a_clear_message():
    with pytest.raises(ValueError, match="needs an image_dataset"):
        VideoDataModule(SyntheticVideos(num_samples=8), image_ratio=0.5)
    with pytest.raises(ValueError, match=r"image_ratio must be in \[0, 1\)"):
        MixedBatchSampler(48, 40, 4, 8, 1.0)


def test_lightning_keeps_the_mixed_sampler_under_ddp_and_shards_plain_loaders():
    """Under DDP Lightning injects a DistributedSampler into loaders, but cannot into a custom batch sampler (it
    raises a TypeError); the mixed loader's sampler shards by rank itself and must be left as it is."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # not launched
    mixed = _module(image_ratio=0.25, image_batch_size=8)
    mixed.trainer = trainer
    loader = mixed.train_dataloader()
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert prepared is loader and (loader.sampler.num_replicas, loader.sampler.rank) == (2, 0)
    plain = _module()
    plain.trainer = trainer
    prepared = trainer._data_connector._prepare_dataloader(
        plain.train_dataloader(), shuffle=True, mode=RunningStage.TRAINING
    )
    assert isinstance(prepared.sampler, DistributedSampler) and prepared.sampler.num_replicas == 2
