"""Captioned video files listed in a manifest, in the style of WebVid-like text-video datasets."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from walt.data.base import ClipDataset, VideoSample
from walt.data.transforms import Offset, ShortPolicy

__all__ = ["MANIFEST_FORMAT", "CaptionedVideos", "read_manifest"]

log = logging.getLogger(__name__)

MANIFEST_FORMAT = """\
expected manifest: a .csv file with a header row, or a .jsonl file with one JSON object per line, with
  path      the video file, absolute or relative to `root` (default: the manifest's folder)
  caption   its text
  start,end (optional) seconds: the captioned segment of the file; empty = the whole file
e.g.  path,caption,start,end
      videos/0001.mp4,"a dog runs on the beach",0.0,4.5"""


class CaptionedVideos(ClipDataset):
    """Clips of the video files in a CSV/JSONL manifest, each item with its ``caption``.

    Rows whose file is missing are counted in :attr:`num_missing` and left out (one warning); files that fail
    to decode are skipped at load time and counted, as in every file-backed dataset. ``path_column`` and
    ``caption_column`` adapt to manifests that name those columns differently (WebVid's CSV calls the caption
    ``name``).
    """

    def __init__(
        self,
        manifest: str | Path,
        root: str | Path | None = None,
        num_frames: int = 17,
        stride: int = 1,
        resolution: int | Sequence[int] = 128,
        offset: Offset = "random",
        short_policy: ShortPolicy = "loop",
        path_column: str = "path",
        caption_column: str = "caption",
    ) -> None:
        self.manifest = Path(manifest)
        self.root = Path(root) if root is not None else self.manifest.parent
        rows = read_manifest(self.manifest, path_column, caption_column)
        samples = []
        for row in rows:
            path = Path(row["path"])
            path = path if path.is_absolute() else self.root / path
            samples.append(VideoSample(path, None, row["caption"], row["start"], row["end"]))
        present = [s for s in samples if s.path.is_file()]
        self.num_missing = len(samples) - len(present)
        if self.num_missing:
            log.warning(
                "%d of the %d videos listed in %s are missing and left out (first: %s)",
                self.num_missing,
                len(samples),
                self.manifest,
                next(s.path for s in samples if not s.path.is_file()),
            )
        if not present:
            raise FileNotFoundError(
                f"none of the {len(samples)} videos listed in {self.manifest} exist under {self.root}; "
                "set root to the folder the paths are relative to"
            )
        super().__init__(present, num_frames, stride, resolution, offset, short_policy)


def read_manifest(
    manifest: str | Path, path_column: str = "path", caption_column: str = "caption"
) -> list[dict]:
    """Rows ``{"path": str, "caption": str, "start": float | None, "end": float | None}`` of a manifest."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise FileNotFoundError(f"manifest not found: {manifest}\n{MANIFEST_FORMAT}")
    suffix = manifest.suffix.lower()
    if suffix == ".csv":
        with manifest.open(newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".json"):
        raw = []
        for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{manifest} line {n} is not JSON ({err})\n{MANIFEST_FORMAT}") from None
    else:
        raise ValueError(f"{manifest}: the manifest must be .csv or .jsonl\n{MANIFEST_FORMAT}")
    if not raw:
        raise ValueError(f"{manifest} lists no videos\n{MANIFEST_FORMAT}")
    missing = [c for c in (path_column, caption_column) if c not in raw[0]]
    if missing:
        raise ValueError(
            f"{manifest} has no column {missing} (columns: {sorted(raw[0])}); set path_column / caption_column "
            f"to the names it uses\n{MANIFEST_FORMAT}"
        )
    return [
        {
            "path": str(row[path_column]),
            "caption": str(row[caption_column] or "").strip(),
            "start": _seconds(row.get("start"), manifest, n, "start"),
            "end": _seconds(row.get("end"), manifest, n, "end"),
        }
        for n, row in enumerate(raw, start=1)
    ]


def _seconds(value, manifest: Path, row: int, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{manifest} row {row}: {name} must be a number of seconds, got {value!r}") from None
    if seconds < 0:
        raise ValueError(f"{manifest} row {row}: {name} must be >= 0 seconds, got {seconds}")
    return seconds
