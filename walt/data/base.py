"""The part every file-backed dataset shares: clip loading and the skip-and-count policy for bad files."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from walt.data.io import VideoReadError, probe_video, read_video
from walt.data.transforms import (
    Offset,
    ShortPolicy,
    ShortVideoError,
    resize_center_crop,
    sample_frame_indices,
    to_float_video,
)

__all__ = [
    "UNREADABLE",
    "ClipDataset",
    "SkipCounter",
    "VideoSample",
    "make_item",
    "resolution_hw",
    "segment_frames",
]

log = logging.getLogger(__name__)

# What makes a file unusable as a clip (skipped and counted, never fatal): it cannot be decoded, or it is
# shorter than a clip under short_policy="skip".
UNREADABLE = (VideoReadError, ShortVideoError)


@dataclass(frozen=True)
class VideoSample:
    """One entry of a dataset index: a file and what we know about it.

    ``start`` / ``end`` (seconds) restrict clips to that part of the file (caption datasets whose captions
    describe a segment); None = from the beginning / to the end.
    """

    path: Path
    label: int | None = None
    caption: str | None = None
    start: float | None = None
    end: float | None = None


def resolution_hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``128`` -> ``(128, 128)``; ``(128, 224)`` stays as (height, width)."""
    if isinstance(resolution, int):
        return resolution, resolution
    if len(resolution) != 2:
        raise ValueError(f"resolution must be an int or (height, width), got {resolution!r}")
    return int(resolution[0]), int(resolution[1])


def make_item(frames: np.ndarray, sample: VideoSample, resolution: tuple[int, int]) -> dict:
    """uint8 frames ``(T, H, W, 3)`` of ``sample`` -> the item dict of the library (DESIGN §6)."""
    video = resize_center_crop(to_float_video(frames), resolution)  # (3, T, H, W)
    item = {"video": video.clamp_(-1.0, 1.0)}
    if sample.label is not None:
        item["label"] = sample.label
    if sample.caption is not None:
        item["caption"] = sample.caption
    return item


def segment_frames(sample: VideoSample, fps: float, num_frames: int) -> tuple[int, int]:
    """The frame range ``[first, stop)`` of ``sample``'s ``start``/``end`` seconds in a video of ``num_frames``."""
    if sample.start is None and sample.end is None:
        return 0, num_frames
    if fps <= 0:
        raise VideoReadError(f"{sample.path} records no frame rate, so its start/end times cannot be located")
    first = round((sample.start or 0.0) * fps)
    stop = num_frames if sample.end is None else min(num_frames, round(sample.end * fps))
    if first >= stop:
        raise ShortVideoError(
            f"the segment {sample.start}..{sample.end} s is empty in {sample.path} "
            f"({num_frames} frames at {fps:g} fps)"
        )
    return first, stop


class SkipCounter:
    """Counts the distinct files skipped as unreadable, across data-loader worker processes and epochs.

    One flag per file lives in shared memory, so the main process sees what its workers skipped, and a file
    skipped again (every epoch, or when its neighbour's fallback reaches it) counts once: the count is of files,
    not of skip events. Each process warns once per file with the reason.
    """

    def __init__(self, paths: Sequence[os.PathLike | str]) -> None:
        self._ids: dict[str, int] = {}
        for path in paths:
            self._ids.setdefault(str(path), len(self._ids))
        self._flags = torch.zeros(max(len(self._ids), 1), dtype=torch.bool).share_memory_()
        self._warned: set[str] = set()

    def record(self, path: os.PathLike | str, reason: Exception) -> None:
        key = str(path)
        self._flags[self._ids[key]] = True
        if key not in self._warned:
            self._warned.add(key)
            log.warning("skipping unreadable video %s: %s", key, reason)

    @property
    def count(self) -> int:
        return int(self._flags.sum().item())

    @property
    def num_files(self) -> int:
        """The distinct files the counter covers."""
        return len(self._ids)


class ClipDataset(Dataset):
    """A list of :class:`VideoSample` read as fixed-length clips, resized and centre-cropped.

    A file that cannot be decoded (or is too short under ``short_policy="skip"``) is skipped: the warning names
    it, :attr:`num_skipped` counts it, and the next file in the index is returned instead, so one bad file
    never stops a run.

    Where a clip starts (``offset="random"``) is drawn from ``(seed, epoch, index)`` alone
    (:meth:`item_rng`): not from a random stream a data-loader worker carries from item to item, whose state
    depends on which worker read which items before, so a run resumed mid-epoch with workers reads exactly the
    clips the uninterrupted run read. The training loader (:class:`walt.data.ResumableDataLoader`) sets seed and
    epoch before each pass (:meth:`set_epoch`); read otherwise, the dataset gives epoch 0's clips.
    """

    def __init__(
        self,
        samples: Sequence[VideoSample],
        num_frames: int = 17,
        stride: int = 1,
        resolution: int | Sequence[int] = 128,
        offset: Offset = "random",
        short_policy: ShortPolicy = "loop",
    ) -> None:
        if not samples:
            raise ValueError("the dataset index is empty: no video files were found")
        self.samples = list(samples)
        self.num_frames = num_frames
        self.stride = stride
        self.resolution = resolution_hw(resolution)
        self.offset: Offset = offset
        self.short_policy: ShortPolicy = short_policy
        self.skips = SkipCounter([s.path for s in self.samples])
        # (seed, epoch) of the pass being read, in shared memory: set in the main process, seen by the loader's
        # worker processes, persistent ones included (which keep their copy of the dataset from pass to pass).
        self._stream = torch.zeros(2, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """Draws the random clip offsets of the coming pass from ``(seed, epoch)``: each epoch sees other clips,
        and the same epoch the same ones, whichever worker reads them and whatever it read before."""
        self._stream[0], self._stream[1] = int(seed), int(epoch)

    def item_rng(self, index: int) -> np.random.Generator:
        """The random stream of item ``index`` in the current pass: a function of (seed, epoch, index) only."""
        seed, epoch = (int(v) for v in self._stream.tolist())
        return np.random.default_rng([seed, epoch, index])

    classes: Sequence[str] = ()  # class names in label order, where the data has classes

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def label_of(self, index: int) -> int | None:
        """The class of item ``index`` without decoding it (None where the data has no classes)."""
        return self.samples[index].label

    @property
    def num_skipped(self) -> int:
        return self.skips.count

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.samples)):
            sample = self.samples[(index + attempt) % len(self.samples)]
            try:
                return self.load(sample, self.item_rng(index))
            except UNREADABLE as err:
                self.skips.record(sample.path, err)
        raise RuntimeError(
            f"every one of the {len(self.samples)} videos failed to load; see the warnings above"
        )

    def load(self, sample: VideoSample, rng: np.random.Generator | None = None) -> dict:
        """Read one clip of ``sample`` into the dataset's item dict; ``rng`` places a random clip (the item's
        :meth:`item_rng`; by default that of index 0)."""
        rng = rng if rng is not None else self.item_rng(0)
        info = probe_video(sample.path)
        if info.num_frames > 0:
            first, stop = segment_frames(sample, info.fps, info.num_frames)
            indices = first + self._indices(stop - first, rng)
            frames = read_video(sample.path, indices)  # (T, H, W, 3) uint8
        else:  # the container keeps no frame count (some GIFs, streams): decode all, then pick
            frames = read_video(sample.path)
            first, stop = segment_frames(sample, info.fps, len(frames))
            frames = frames[first + self._indices(stop - first, rng)]  # (T, H, W, 3) uint8
        return make_item(frames, sample, self.resolution)

    def _indices(self, num_available: int, rng: np.random.Generator) -> np.ndarray:
        return sample_frame_indices(
            num_available, self.num_frames, self.stride, self.offset, self.short_policy, rng
        )
