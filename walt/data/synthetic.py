"""Procedural datasets that need no download: moving shapes and bouncing digits.

Both are deterministic functions of ``(seed, index)``, carry class labels and captions that describe the clip,
and are what the quickstart configs and the tests train on.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from walt.data.base import resolution_hw

__all__ = ["COLORS", "MOTIONS", "SHAPES", "MovingDigits", "SyntheticVideos", "read_colour_and_motion"]

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 45, 45),
    "green": (50, 200, 70),
    "blue": (55, 95, 235),
    "yellow": (235, 215, 45),
    "white": (240, 240, 240),
    "purple": (160, 70, 200),
}
MOTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}


class SyntheticVideos(Dataset):
    """One shape of one colour moving in one direction over a plain background.

    The class of a clip is the triple (colour, shape, motion), e.g. label ``k`` named "red circle moving left",
    and its caption is "a red circle moving left". Size, speed, start position and background brightness vary
    per clip. ``classes`` lists the class names in label order.
    """

    def __init__(
        self,
        num_samples: int = 1024,
        num_frames: int = 17,
        resolution: int | Sequence[int] = 64,
        seed: int = 0,
        shapes: Sequence[str] = SHAPES,
        colors: Sequence[str] = ("red", "green", "blue", "yellow"),
        motions: Sequence[str] = tuple(MOTIONS),
    ) -> None:
        _check_names("shape", shapes, SHAPES)
        _check_names("color", colors, COLORS)
        _check_names("motion", motions, MOTIONS)
        if num_samples < 1 or num_frames < 1:
            raise ValueError(f"num_samples and num_frames must be >= 1, got {num_samples}, {num_frames}")
        self.num_samples = num_samples
        self.num_frames = num_frames
        self.height, self.width = resolution_hw(resolution)
        self.seed = seed
        self._combos = list(itertools.product(colors, shapes, motions))
        self.classes = [f"{c} {s} moving {m}" for c, s, m in self._combos]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        label = index % self.num_classes  # balanced classes; the loader shuffles
        color, shape, motion = self._combos[label]
        rng = np.random.default_rng([self.seed, index])
        frames = self._render(rng, shape, np.asarray(COLORS[color], np.float32), MOTIONS[motion])
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).div(127.5).sub(1.0)  # (3, T, H, W)
        return {"video": video, "label": label, "caption": f"a {self.classes[label]}"}

    def label_of(self, index: int) -> int:
        """The class of clip ``index`` without rendering it."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        return index % self.num_classes

    def _render(self, rng: np.random.Generator, shape: str, rgb: np.ndarray, direction: tuple[float, float]):
        h, w, t = self.height, self.width, self.num_frames
        radius = rng.uniform(0.12, 0.2) * min(h, w)
        along = np.array(direction, np.float32)  # (dy, dx), a unit axis vector
        extent = np.array([h, w], np.float32) - 2 * radius  # where the centre may go on each axis
        travel = rng.uniform(0.35, 0.6) * float(np.abs(along) @ extent)
        # Choose the start so the whole path start + s * travel * along, s in [0, 1], stays inside the frame.
        shift = travel * along
        low = radius - np.minimum(shift, 0.0)
        high = radius + extent - np.maximum(shift, 0.0)
        start = low + rng.uniform(0, 1, size=2) * (high - low)
        steps = np.linspace(0.0, 1.0, t, dtype=np.float32) if t > 1 else np.zeros(1, np.float32)
        centres = start[None] + steps[:, None] * travel * along[None]  # (T, 2)
        alpha = _shape_alpha(shape, centres, radius, h, w)  # (T, H, W)
        background = rng.uniform(25, 70)
        frames = background + alpha[..., None] * (rgb - background)  # (T, H, W, 3)
        return frames.astype(np.float32)


def _shape_alpha(shape: str, centres: np.ndarray, radius: float, h: int, w: int) -> np.ndarray:
    """Anti-aliased coverage of a shape at each centre: a signed inside-distance, clipped to one pixel."""
    ys = np.arange(h, dtype=np.float32)[None, :, None] + 0.5 - centres[:, 0, None, None]  # (T, H, 1)
    xs = np.arange(w, dtype=np.float32)[None, None, :] + 0.5 - centres[:, 1, None, None]  # (T, 1, W)
    if shape == "circle":
        inside = radius - np.sqrt(ys**2 + xs**2)
    elif shape == "square":
        inside = 0.8 * radius - np.maximum(np.abs(ys), np.abs(xs))
    else:  # equilateral triangle pointing up, circumradius `radius`: three half-planes at inradius r / 2
        normals = ((1.0, 0.0), (-0.5, 0.8660254), (-0.5, -0.8660254))  # (dy, dx), y grows downwards
        inside = np.min([radius / 2 - (ny * ys + nx * xs) for ny, nx in normals], axis=0)
    return np.clip(inside + 0.5, 0.0, 1.0)


def read_colour_and_motion(video: torch.Tensor, colors: Sequence[str] = tuple(COLORS)) -> tuple[str, str]:
    """What a :class:`SyntheticVideos` clip shows, read back from pixels: (colour name, motion name).

    The shape is the set of pixels that differ clearly from the grey background (saturated or bright); its mean
    colour picks the nearest of ``colors`` and its centroid's path the motion. Used to measure whether
    generated clips follow their class or caption.
    """
    rgb = (video.detach().float().clamp(-1, 1) + 1) * 127.5  # (3, T, H, W)
    mask = (rgb.amax(0) - rgb.amin(0) > 60) | (rgb.mean(0) > 150)  # (T, H, W)
    if not mask.any():
        return "none", "none"
    mean = (rgb * mask).sum((1, 2, 3)) / mask.sum()  # (3,)
    palette = torch.tensor([COLORS[c] for c in colors], dtype=torch.float32)  # (K, 3)
    colour = colors[int((palette - mean).norm(dim=1).argmin())]
    ys, xs = torch.meshgrid(torch.arange(rgb.shape[2]), torch.arange(rgb.shape[3]), indexing="ij")
    area = mask.sum((1, 2)).clamp(min=1)  # (T,)
    cy, cx = (mask * ys).sum((1, 2)) / area, (mask * xs).sum((1, 2)) / area  # (T,) each
    dy, dx = float(cy[-1] - cy[0]), float(cx[-1] - cx[0])
    if abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    return colour, motion


class MovingDigits(Dataset):
    """Moving-MNIST-style clips: handwritten digits bouncing inside the frame, white on black.

    Digits come from scikit-learn's bundled 8x8 digits (1797 instances), upscaled. Train and test use disjoint
    digit instances (every fifth instance is a test instance), so test clips show handwriting never seen in
    training. With one digit the label is that digit. With two, ``label="both"`` gives ``10 * first + second``
    (100 classes) and ``label="first"`` the first digit alone (10 classes; the second digit is free), which makes
    a class-conditional model whose faithfulness a digit classifier can check with 10 outcomes.
    """

    def __init__(
        self,
        split: Literal["train", "test"] = "train",
        num_samples: int = 1024,
        num_frames: int = 17,
        resolution: int = 64,
        num_digits: int = 2,
        seed: int = 0,
        label: Literal["both", "first"] = "both",
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if num_digits not in (1, 2):
            raise ValueError(f"num_digits must be 1 or 2, got {num_digits}")
        if label not in ("both", "first"):
            raise ValueError(f"label must be 'both' or 'first', got {label!r}")
        self.label = label
        self.split = split
        self.num_samples = num_samples
        self.num_frames = num_frames
        self.resolution = resolution
        self.num_digits = num_digits
        self.seed = seed
        images, targets = _sklearn_digits()
        in_test = np.arange(len(targets)) % 5 == 4
        keep = in_test if split == "test" else ~in_test
        self.instance_ids = np.flatnonzero(keep)
        self._images, self._targets = images, targets
        self.digit_size = max(4, round(resolution * 28 / 64))  # Moving MNIST's 28-pixel digits on 64
        self.classes = (
            [str(d) for d in range(10)]
            if num_digits == 1 or label == "first"
            else [f"{a}{b}" for a in range(10) for b in range(10)]
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        rng, ids = self._draw(index)
        digits = [int(self._targets[i]) for i in ids]
        video = self._render(rng, [self._sprite(int(i)) for i in ids])  # (3, T, S, S)
        label = self._label(digits)
        words = " and ".join(map(str, digits))
        caption = f"the digit{'s' if self.num_digits > 1 else ''} {words} bouncing"
        return {"video": video, "label": label, "caption": caption}

    def label_of(self, index: int) -> int:
        """The class of clip ``index`` (its first digit, or the pair) without rendering it."""
        return self._label(self.digits_of(index))

    def _label(self, digits: list[int]) -> int:
        return digits[0] if self.num_digits == 1 or self.label == "first" else 10 * digits[0] + digits[1]

    def digits_of(self, index: int) -> list[int]:
        """The digits shown in clip ``index``, first to last, without rendering it."""
        return [int(self._targets[i]) for i in self._draw(index)[1]]

    def _draw(self, index: int) -> tuple[np.random.Generator, np.ndarray]:
        """The clip's random stream and its digit instances; rendering continues from the same stream."""
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, int(self.split == "test"), index])
        return rng, rng.choice(self.instance_ids, size=self.num_digits, replace=False)

    def _render(self, rng: np.random.Generator, sprites: list[torch.Tensor]) -> torch.Tensor:
        """Sprites (d, d) in [0, 1], each bouncing on its own path drawn from ``rng``, white on black: (3, T, S, S)."""
        canvas = torch.zeros(self.num_frames, self.resolution, self.resolution)  # (T, S, S)
        for sprite in sprites:
            for t, (y, x) in enumerate(self._bounce(rng)):
                region = canvas[t, y : y + self.digit_size, x : x + self.digit_size]
                torch.maximum(region, sprite, out=region)
        return canvas.mul(2.0).sub(1.0).unsqueeze(0).expand(3, -1, -1, -1).contiguous()  # (3, T, S, S)

    def _sprite(self, instance: int) -> torch.Tensor:
        img = torch.from_numpy(self._images[instance]).float().div(16.0)[None, None]  # (1, 1, 8, 8) in [0, 1]
        size = (self.digit_size, self.digit_size)
        return F.interpolate(img, size=size, mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)

    def _bounce(self, rng: np.random.Generator) -> list[tuple[int, int]]:
        """Top-left corners of a sprite moving in a straight line and reflecting off the borders."""
        room = self.resolution - self.digit_size
        pos = rng.uniform(0, room, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(2.0, 4.0) * self.resolution / 64
        vel = speed * np.array([np.sin(angle), np.cos(angle)])
        out = []
        for _ in range(self.num_frames):
            out.append((round(pos[0]), round(pos[1])))
            pos = pos + vel
            for axis in range(2):
                if not 0 <= pos[axis] <= room:  # reflect off the wall
                    vel[axis] = -vel[axis]
                    pos[axis] = -pos[axis] if pos[axis] < 0 else 2 * room - pos[axis]
            pos = np.clip(pos, 0, room)
        return out


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "MovingDigits needs scikit-learn: pip install scikit-learn (or walt[data])"
        ) from err
    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def _check_names(kind: str, names: Sequence[str], known) -> None:
    if not names:
        raise ValueError(f"at least one {kind} is needed")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {kind}(s) {unknown}; choose from {list(known)}")
