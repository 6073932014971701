"""Benchmark protocols: a metric's name fixes its feature network, preprocessing and sample counts.

A number reported under a protocol name is only comparable with other numbers under the same name, so each
:class:`Protocol` states everything that changes the result. Register new protocols with
:func:`register_protocol`; look them up with :func:`get_protocol`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from walt.data import read_video
from walt.metrics.assets import FID_INCEPTION, I3D_KINETICS400, Asset
from walt.metrics.i3d import I3D
from walt.metrics.inception import InceptionV3

__all__ = ["PROTOCOLS", "Protocol", "get_protocol", "real_stats_key", "register_protocol"]

VIDEO_SUFFIXES = (".mp4", ".avi", ".gif", ".webm", ".mkv", ".mov")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass(frozen=True)
class Protocol:
    """A named metric protocol.

    ``reader`` turns one file (``reader(path)``) or the uint8 frames ``(T, H, W, 3)`` of a dataset item
    (``reader.from_frames(frames)``) into the protocol's samples: ``(k, T, H, W, 3)`` clips for video
    protocols, ``(k, H, W, 3)`` images for image protocols. ``network`` is the feature network class (built
    with an optional local ``weights_path``); ``feature_dim`` is its output width.
    """

    name: str
    metric: str  # "FVD" or "FID"
    summary: str  # one line for --help and the README
    preprocessing: str  # everything that changes the features; part of the cache key
    network: Callable[..., I3D | InceptionV3]
    weights: Asset
    feature_dim: int
    reader: FirstClip | FirstFrames | WholeImage
    suffixes: tuple[str, ...]  # file types the reader accepts
    num_real: int  # real samples under the standard protocol
    num_fake: int  # generated samples under the standard protocol
    samples_per_file: int = 1  # at most this many samples come out of one file
    context_frames: int = 0  # frames given to the model as condition (frame prediction)
    reconstruction: bool = False  # the generated side is the tokenizer's reconstruction of the real side


PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol) -> Protocol:
    if protocol.name in PROTOCOLS:
        raise ValueError(f"protocol {protocol.name!r} is already registered")
    PROTOCOLS[protocol.name] = protocol
    return protocol


def get_protocol(name: str | Protocol) -> Protocol:
    if isinstance(name, Protocol):
        return name
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise KeyError(
            f"unknown metric protocol {name!r}; registered: {', '.join(sorted(PROTOCOLS))}"
        ) from None


def real_stats_key(
    protocol: Protocol, dataset: str, split: str, num_samples: int, selection_seed: int
) -> str:
    """Hash naming the cached real statistics of (protocol, dataset, split, preprocessing, sample choice)."""
    identity = {
        "protocol": protocol.name,
        "preprocessing": protocol.preprocessing,
        "weights": protocol.weights.distribution,
        "dataset": dataset,
        "split": split,
        "num_samples": num_samples,
        "selection_seed": selection_seed,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


# --- readers: a file (or the frames of a dataset item) -> the protocol's samples ------------------------------


class FirstClip:
    """The first ``num_frames`` frames of a video as one clip: (1, T, H, W, 3)."""

    def __init__(self, num_frames: int) -> None:
        self.num_frames = num_frames

    def __call__(self, path: Path) -> np.ndarray:
        return read_video(path, frame_indices=range(self.num_frames))[None]

    def from_frames(self, frames: np.ndarray) -> np.ndarray:
        _check_length(frames, self.num_frames)
        return frames[None, : self.num_frames]


class FirstFrames:
    """The first ``num_frames`` frames of a video as separate images: (T, H, W, 3)."""

    def __init__(self, num_frames: int) -> None:
        self.num_frames = num_frames

    def __call__(self, path: Path) -> np.ndarray:
        return read_video(path, frame_indices=range(self.num_frames))

    def from_frames(self, frames: np.ndarray) -> np.ndarray:
        _check_length(frames, self.num_frames)
        return frames[: self.num_frames]


class WholeImage:
    """One RGB image file, or a one-frame video: (1, H, W, 3)."""

    def __call__(self, path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)[None]

    def from_frames(self, frames: np.ndarray) -> np.ndarray:
        if len(frames) != 1:
            raise ValueError(f"an image protocol scores single images; got a video of {len(frames)} frames")
        return frames


def _check_length(frames: np.ndarray, needed: int) -> None:
    if len(frames) < needed:
        raise ValueError(f"the protocol needs {needed} frames per video, got a video of {len(frames)}")


# --- the protocols -------------------------------------------------------------------------------------------

_I3D_PREP = "I3D Kinetics-400 logits (400-d); frames resized to 224x224 by TF1 bilinear; pixels 2x/255-1"
_INCEPTION_PREP = "Inception-v3 pool3 (2048-d); images resized to 299x299 by TF1 bilinear; pixels x/128-1"

register_protocol(
    Protocol(
        name="fvd2048_16f",
        metric="FVD",
        summary="FVD of 2048 real vs 2048 generated 16-frame clips (StyleGAN-V / Latte protocol; UCF-101)",
        preprocessing=f"clip: first 16 frames of each video; {_I3D_PREP}",
        network=I3D,
        weights=I3D_KINETICS400,
        feature_dim=400,
        reader=FirstClip(16),
        suffixes=VIDEO_SUFFIXES,
        num_real=2048,
        num_fake=2048,
    )
)
register_protocol(
    Protocol(
        name="fvd_k600_pred",
        metric="FVD",
        summary="Kinetics-600 frame prediction: 5 context frames + 11 generated, FVD on full 16-frame clips, "
        "50,000 samples",
        preprocessing=f"clip: first 16 frames (5 context + 11 predicted); {_I3D_PREP}",
        network=I3D,
        weights=I3D_KINETICS400,
        feature_dim=400,
        reader=FirstClip(16),
        suffixes=VIDEO_SUFFIXES,
        num_real=50_000,
        num_fake=50_000,
        context_frames=5,
    )
)
register_protocol(
    Protocol(
        name="fid50k",
        metric="FID",
        summary="FID of 50,000 generated images against 50,000 real images (ImageNet protocol)",
        preprocessing=f"image: whole image; {_INCEPTION_PREP}",
        network=InceptionV3,
        weights=FID_INCEPTION,
        feature_dim=2048,
        reader=WholeImage(),
        suffixes=IMAGE_SUFFIXES,
        num_real=50_000,
        num_fake=50_000,
    )
)
register_protocol(
    Protocol(
        name="fid_frames",
        metric="FID",
        summary="FID of 50,000 frames: the first 16 frames of each video, real vs generated",
        preprocessing=f"frames: first 16 frames of each video, each an image; {_INCEPTION_PREP}",
        network=InceptionV3,
        weights=FID_INCEPTION,
        feature_dim=2048,
        reader=FirstFrames(16),
        suffixes=VIDEO_SUFFIXES,
        num_real=50_000,
        num_fake=50_000,
        samples_per_file=16,
    )
)
# The tokenizer's protocol is fvd2048_16f with reconstructions of the real clips as the generated side.
register_protocol(
    replace(
        PROTOCOLS["fvd2048_16f"],
        name="rfvd2048_16f",
        summary="reconstruction FVD of a tokenizer: 2048 real 16-frame clips vs their reconstructions, with "
        "PSNR, SSIM and LPIPS of the same clips",
        preprocessing=f"clip: first 16 frames of each video and of its reconstruction; {_I3D_PREP}",
        reconstruction=True,
    )
)
