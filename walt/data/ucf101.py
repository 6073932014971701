"""UCF-101 in its official layout, with the official train/test split lists."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from walt.data.base import ClipDataset, VideoSample
from walt.data.transforms import Offset, ShortPolicy

__all__ = ["UCF101", "UCF101_LAYOUT"]

log = logging.getLogger(__name__)

UCF101_LAYOUT = """\
expected UCF-101 layout (as the official archives unpack):
  <root>/UCF-101/<ClassName>/v_<ClassName>_gXX_cYY.avi
  <root>/ucfTrainTestlist/classInd.txt        "1 ApplyEyeMakeup" ... "101 YoYo"
  <root>/ucfTrainTestlist/trainlist0{1,2,3}.txt  "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1"
  <root>/ucfTrainTestlist/testlist0{1,2,3}.txt   "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\""""


class UCF101(ClipDataset):
    """UCF-101 action clips with 0-based labels from ``classInd.txt``.

    ``split="all"`` joins the train and test lists of the fold, as class-conditional generation papers
    commonly train on all 13,320 videos. Files named in a list but missing on disk are counted and left out
    (see :attr:`num_missing`); a video that fails to decode is skipped at load time and counted.
    """

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test", "all"] = "train",
        fold: int = 1,
        num_frames: int = 17,
        stride: int = 1,
        resolution: int | Sequence[int] = 128,
        offset: Offset | None = None,
        short_policy: ShortPolicy = "loop",
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
        if fold not in (1, 2, 3):
            raise ValueError(f"fold must be 1, 2 or 3, got {fold}")
        self.root = Path(root)
        videos, lists = self.root / "UCF-101", self.root / "ucfTrainTestlist"
        names = {"train": [f"trainlist0{fold}.txt"], "test": [f"testlist0{fold}.txt"]}
        names["all"] = names["train"] + names["test"]
        needed = [videos, lists / "classInd.txt", *(lists / n for n in names[split])]
        absent = [str(p) for p in needed if not p.exists()]
        if absent:
            raise FileNotFoundError(f"UCF-101 files not found: {', '.join(absent)}\n{UCF101_LAYOUT}")
        self.classes = _read_class_index(lists / "classInd.txt")
        lookup = {name.lower(): i for i, name in enumerate(self.classes)}
        entries = [e for n in names[split] for e in _read_split_list(lists / n)]
        samples, missing = [], 0
        for rel in entries:
            path = videos / rel
            if not path.exists():
                missing += 1
                continue
            label = _label_of(rel, lookup)
            samples.append(VideoSample(path, label, _caption(self.classes[label])))
        self.num_missing = missing
        if missing:
            log.warning(
                "UCF-101 %s split: %d of %d listed videos are missing under %s",
                split,
                missing,
                len(entries),
                videos,
            )
        if not samples:
            raise FileNotFoundError(
                f"none of the {len(entries)} videos listed for split {split!r} exist\n{UCF101_LAYOUT}"
            )
        default_offset: Offset = "random" if split == "train" else "center"
        super().__init__(samples, num_frames, stride, resolution, offset or default_offset, short_policy)


def _read_class_index(path: Path) -> list[str]:
    pairs = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(
                f"{path}:{line_no}: expected '<index> <ClassName>', got {line!r}\n{UCF101_LAYOUT}"
            )
        pairs.append((int(parts[0]), parts[1]))
    pairs.sort()
    if [i for i, _ in pairs] != list(range(1, len(pairs) + 1)):
        raise ValueError(f"{path}: class indices must run 1..N without gaps")
    return [name for _, name in pairs]


def _read_split_list(path: Path) -> list[str]:
    # Train lists carry a 1-based label after the path, test lists do not; the label always comes from the
    # class folder, which both have.
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _label_of(rel: str, lookup: dict[str, int]) -> int:
    folder = rel.replace("\\", "/").split("/")[0]
    # The official lists and folders disagree in case for one class (HandstandPushups vs HandStandPushups).
    key = folder.lower()
    if key not in lookup:
        raise ValueError(f"class folder {folder!r} of {rel!r} is not in classInd.txt")
    return lookup[key]


def _caption(class_name: str) -> str:
    """``ApplyEyeMakeup`` -> ``apply eye makeup``."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", class_name).lower()
