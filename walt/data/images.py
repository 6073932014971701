"""Still images as one-frame videos, for joint image-video training."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from walt.data.base import ClipDataset, VideoSample, make_item
from walt.data.io import VideoReadError

__all__ = ["ImageFolderVideos"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageFolderVideos(ClipDataset):
    """Every image under ``root`` as a video of one frame, ``(3, 1, H, W)``.

    If ``root`` has subfolders, each one is a class (sorted names, as torchvision's ImageFolder does) and items
    carry a ``label``. A text file next to an image with the same stem (``cat.jpg`` + ``cat.txt``) is its
    caption. Unreadable images are skipped and counted like unreadable videos.
    """

    def __init__(
        self,
        root: str | Path,
        resolution: int | Sequence[int] = 128,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder not found: {self.root}\nexpected layout: <root>/<image files> or "
                "<root>/<class_name>/<image files> (optional captions: <image stem>.txt beside each image)"
            )
        exts = {e.lower() for e in extensions}
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        class_dirs = sorted(
            {p.parent.relative_to(self.root).parts[0] for p in files if p.parent != self.root}
        )
        self.classes = class_dirs
        lookup = {name: i for i, name in enumerate(class_dirs)}
        samples = [
            VideoSample(p, lookup.get(p.relative_to(self.root).parts[0]) if class_dirs else None, _caption(p))
            for p in files
        ]
        if not samples:
            raise FileNotFoundError(f"no images with extensions {sorted(exts)} under {self.root}")
        super().__init__(samples, num_frames=1, resolution=resolution, offset="start")

    def load(self, sample: VideoSample, rng: np.random.Generator | None = None) -> dict:
        try:
            with Image.open(sample.path) as img:
                rgb = np.array(img.convert("RGB"))  # (H, W, 3) uint8
        except (OSError, UnidentifiedImageError) as err:
            raise VideoReadError(f"cannot read image {sample.path}: {err}") from err
        return make_item(rgb[None], sample, self.resolution)


def _caption(image: Path) -> str | None:
    text = image.with_suffix(".txt")
    return text.read_text().strip() if text.is_file() else None
