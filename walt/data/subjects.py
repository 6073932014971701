"""Personalization data: a subject MovingDigits never shows, bouncing beside a handwritten digit."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from walt.data.synthetic import MovingDigits

__all__ = ["SUBJECTS", "MovingSubject", "subject_sprite"]

SUBJECTS = ("horse",)  # built in: scikit-image's horse silhouette


class MovingSubject(MovingDigits):
    """MovingDigits clips whose first object is ``subject`` instead of a digit: a handful of them teach a trained
    MovingDigits model a new class (personalization, e.g. with :class:`walt.lightning.LoRAFineTune`).

    Every clip shows the same sprite (one subject, as in DreamBooth) and a handwritten digit of ``split``, each
    bouncing on a path drawn as MovingDigits draws them, and carries the class ``label`` (default 10: the one
    after the ten digits of a first-digit MovingDigits model). ``classes`` extends MovingDigits' names with
    ``name`` at index ``label``; ``digits_of(i)`` is ``[label, digit]``, for a classifier of the objects in a clip.

    Args:
        subject: "horse" (scikit-image's horse silhouette, shipped with scikit-image) or the path of an image of
            the subject, bright on dark.
        name: the class name (default: the subject's name or file stem).
    """

    def __init__(
        self,
        subject: str = "horse",
        num_samples: int = 8,
        num_frames: int = 17,
        resolution: int = 64,
        split: Literal["train", "test"] = "train",
        seed: int = 0,
        label: int = 10,
        name: str | None = None,
    ) -> None:
        super().__init__(split, num_samples, num_frames, resolution, num_digits=2, seed=seed, label="first")
        if label < 10:
            raise ValueError(f"label must be >= 10 (0..9 are the digits), got {label}")
        self.subject = subject
        self.subject_label = label
        self.subject_name = name or Path(subject).stem
        self.classes = [*self.classes, *(str(i) for i in range(10, label)), self.subject_name]
        self._subject = subject_sprite(subject, self.digit_size)

    def __getitem__(self, index: int) -> dict:
        rng, ids = self._draw(index)
        digit = int(self._targets[ids[1]])
        video = self._render(rng, [self._subject, self._sprite(int(ids[1]))])  # (3, T, S, S)
        caption = f"the {self.subject_name} and the digit {digit} bouncing"
        return {"video": video, "label": self.subject_label, "caption": caption}

    def label_of(self, index: int) -> int:
        return self.subject_label

    def digits_of(self, index: int) -> list[int]:
        """The objects of clip ``index``: the subject's label, then the digit."""
        return [self.subject_label, int(self._targets[self._draw(index)[1][1]])]


def subject_sprite(subject: str, size: int) -> torch.Tensor:
    """The subject's sprite (size, size) in [0, 1]: its bounding box, padded square and resized (area-averaged)."""
    image = torch.from_numpy(_subject_image(subject))  # (H, W) in [0, 1], bright on dark
    rows, cols = torch.nonzero(image > 0.5, as_tuple=True)
    if len(rows) == 0:
        raise ValueError(f"subject {subject!r}: no bright pixels (the subject must be bright on dark)")
    image = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    h, w = image.shape
    side = max(h, w)
    square = F.pad(image, ((side - w) // 2, (side - w + 1) // 2, (side - h) // 2, (side - h + 1) // 2))
    sprite = F.interpolate(square[None, None], size=(size, size), mode="bilinear", antialias=True)
    return sprite[0, 0].clamp(0, 1)


@functools.lru_cache(maxsize=4)
def _subject_image(subject: str) -> np.ndarray:
    if subject == "horse":
        try:
            from skimage.data import horse
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "the horse subject needs scikit-image: pip install scikit-image (or walt[data])"
            ) from err
        return (~horse()).astype(np.float32)  # the horse is black on white
    path = Path(subject)
    if not path.is_file():
        raise ValueError(f"unknown subject {subject!r}: give one of {', '.join(SUBJECTS)} or an image file")
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
