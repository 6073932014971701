"""Video I/O, clip sampling and datasets. Items are dicts: ``video`` (3, T, H, W) in [-1, 1], ``label``, ``caption``."""

from walt.data.base import ClipDataset, SkipCounter, VideoSample
from walt.data.captions import CaptionedVideos, read_manifest
from walt.data.footage import RealFootage, Shot
from walt.data.images import ImageFolderVideos
from walt.data.io import VideoInfo, VideoReadError, probe_video, read_video, write_video
from walt.data.kinetics import Kinetics600
from walt.data.latents import LatentShards
from walt.data.subjects import MovingSubject
from walt.data.synthetic import MovingDigits, SyntheticVideos
from walt.data.transforms import (
    ShortVideoError,
    resize_center_crop,
    sample_frame_indices,
    to_float_video,
    to_uint8,
)
from walt.data.ucf101 import UCF101

# The data module (Lightning) loads on first use: inference code (walt.pipeline) reads videos through this
# package without paying for Lightning's import.
_DATAMODULE = (
    "EpochShuffleSampler",
    "MixedBatchSampler",
    "ResumableDataLoader",
    "VideoDataModule",
    "collate_items",
)


def __getattr__(name: str):
    if name in _DATAMODULE:
        from walt.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "UCF101",
    "CaptionedVideos",
    "ClipDataset",
    "EpochShuffleSampler",
    "ImageFolderVideos",
    "Kinetics600",
    "LatentShards",
    "MixedBatchSampler",
    "MovingDigits",
    "MovingSubject",
    "RealFootage",
    "ResumableDataLoader",
    "ShortVideoError",
    "Shot",
    "SkipCounter",
    "SyntheticVideos",
    "VideoDataModule",
    "VideoInfo",
    "VideoReadError",
    "VideoSample",
    "collate_items",
    "probe_video",
    "read_manifest",
    "read_video",
    "resize_center_crop",
    "sample_frame_indices",
    "to_float_video",
    "to_uint8",
    "write_video",
]
