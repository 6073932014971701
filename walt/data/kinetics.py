"""Kinetics-600 from its standard CSV annotations and trimmed clips."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from walt.data.base import ClipDataset, VideoSample
from walt.data.transforms import Offset, ShortPolicy

__all__ = ["KINETICS_LAYOUT", "Kinetics600"]

log = logging.getLogger(__name__)

KINETICS_LAYOUT = """\
expected Kinetics-600 layout:
  <root>/annotations/{train,validate,test}.csv   (or <root>/{train,validate,test}.csv)
      columns: label,youtube_id,time_start,time_end,split
  <root>/<split>/<youtube_id>_<time_start:06d>_<time_end:06d>.mp4
      (clips may also sit in per-label subfolders: <root>/<split>/<label>/<clip>.mp4)"""

_CSV_NAMES = {"train": ("train",), "val": ("validate", "val"), "test": ("test",)}
_REQUIRED_COLUMNS = {"label", "youtube_id", "time_start", "time_end"}


class Kinetics600(ClipDataset):
    """Kinetics-600 clips with labels indexed by the sorted class names of the train annotations.

    Clips listed in the CSV but not on disk (YouTube takedowns make every copy incomplete) are counted in
    :attr:`num_missing` and left out; clips that fail to decode are skipped at load time and counted.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "val", "test"] = "train",
        num_frames: int = 17,
        stride: int = 1,
        resolution: int | Sequence[int] = 128,
        offset: Offset | None = None,
        short_policy: ShortPolicy = "loop",
        extensions: Sequence[str] = (".mp4", ".webm", ".mkv", ".avi"),
    ) -> None:
        if split not in _CSV_NAMES:
            raise ValueError(f"split must be one of {list(_CSV_NAMES)}, got {split!r}")
        self.root = Path(root)
        csv_path = _find_csv(self.root, split)
        clip_dir = self.root / _clip_dir_name(self.root, split)
        if not clip_dir.is_dir():
            raise FileNotFoundError(f"Kinetics-600 clip folder not found: {clip_dir}\n{KINETICS_LAYOUT}")
        rows = _read_annotations(csv_path)
        train_csv = _find_csv(self.root, "train", required=False)
        label_source = rows if train_csv is None or train_csv == csv_path else _read_annotations(train_csv)
        self.classes = sorted({r["label"] for r in label_source})
        lookup = {name: i for i, name in enumerate(self.classes)}
        on_disk = _index_files(clip_dir, tuple(extensions))
        samples, missing = [], 0
        for row in rows:
            path = on_disk.get(_clip_stem(row))
            if path is None:
                missing += 1
                continue
            label = lookup.get(row["label"])
            samples.append(VideoSample(path, label, row["label"] or None))
        self.num_missing = missing
        if missing:
            log.warning(
                "Kinetics-600 %s: %d of %d annotated clips are missing under %s",
                split,
                missing,
                len(rows),
                clip_dir,
            )
        if not samples:
            raise FileNotFoundError(
                f"none of the {len(rows)} clips annotated in {csv_path} exist under "
                f"{clip_dir}\n{KINETICS_LAYOUT}"
            )
        default_offset: Offset = "random" if split == "train" else "center"
        super().__init__(samples, num_frames, stride, resolution, offset or default_offset, short_policy)


def _find_csv(root: Path, split: str, required: bool = True) -> Path | None:
    for folder in (root / "annotations", root):
        for name in _CSV_NAMES[split]:
            if (folder / f"{name}.csv").is_file():
                return folder / f"{name}.csv"
    if required:
        raise FileNotFoundError(f"no annotation CSV for split {split!r} under {root}\n{KINETICS_LAYOUT}")
    return None


def _clip_dir_name(root: Path, split: str) -> str:
    for name in (split, *_CSV_NAMES[split]):
        if (root / name).is_dir():
            return name
    return split


def _read_annotations(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if not _REQUIRED_COLUMNS <= columns:
            raise ValueError(f"{path} lacks columns {sorted(_REQUIRED_COLUMNS - columns)}\n{KINETICS_LAYOUT}")
        return [dict(row) for row in reader]


def _clip_stem(row: dict[str, str]) -> str:
    return f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"


def _index_files(folder: Path, extensions: tuple[str, ...]) -> dict[str, Path]:
    """Clip stem -> path, searching per-label subfolders too (one walk, not one stat per clip)."""
    found: dict[str, Path] = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() in extensions:
                found.setdefault(stem, Path(dirpath) / name)
    return found
