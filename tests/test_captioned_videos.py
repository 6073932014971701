"""CaptionedVideos: WebVid-style manifests (CSV / JSONL) of captioned video files with optional segments."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from walt.data import CaptionedVideos, VideoDataModule, read_manifest, write_video

FPS = 10


def ramp_video(path: Path, num_frames: int = 30) -> Path:
    """Frame i is a flat grey of level 8 i, so a clip's frames tell which frames of the file were read."""
    levels = (8 * np.arange(num_frames)).astype(np.uint8)
    frames = np.broadcast_to(levels[:, None, None, None], (num_frames, 16, 16, 3)).copy()
    return write_video(path, frames, fps=FPS)


def frame_numbers(video) -> list[int]:
    grey = (video.mean(dim=(0, 2, 3)) + 1) * 127.5  # (T,) back to 0..255
    return [round(float(g) / 8) for g in grey]


@pytest.fixture()
def folder(tmp_path) -> Path:
    ramp_video(tmp_path / "videos" / "ramp.mp4")
    return tmp_path


def test_csv_manifest_reads_captioned_segments_and_leaves_out_missing_files(folder):
    (folder / "train.csv").write_text(
        "path,caption,start,end\n"
        'videos/ramp.mp4,"a screen, slowly brightening",1.0,2.0\n'
        "videos/gone.mp4,a missing clip,,\n"
    )
    data = CaptionedVideos(folder / "train.csv", num_frames=4, resolution=16, offset="random")
    assert len(data) == 1 and data.num_missing == 1
    for _ in range(5):  # random offsets, always inside seconds 1..2 = frames 10..19
        item = data[0]
        frames = frame_numbers(item["video"])
        assert item["caption"] == "a screen, slowly brightening" and item["video"].shape == (3, 4, 16, 16)
        assert all(10 <= f < 20 for f in frames) and np.all(np.diff(frames) == 1), frames
    whole = CaptionedVideos(folder / "train.csv", num_frames=4, resolution=16, offset="start")
    whole.samples[0] = type(whole.samples[0])(whole.samples[0].path, None, "all of it")  # no start/end
    assert frame_numbers(whole[0]["video"]) == [0, 1, 2, 3]


def test_jsonl_manifest_with_other_column_names_and_root(folder):
    rows = [
        {"file": "ramp.mp4", "name": "a ramp", "start": 2.5},
        {"file": "ramp.mp4", "name": "the start", "end": 0.5},
    ]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = CaptionedVideos(
        folder / "m.jsonl",
        root=folder / "videos",
        num_frames=5,
        resolution=16,
        offset="start",
        path_column="file",
        caption_column="name",
    )
    assert frame_numbers(data[0]["video"]) == [25, 26, 27, 28, 29]
    assert data[1]["caption"] == "the start" and frame_numbers(data[1]["video"]) == [0, 1, 2, 3, 4]
    loader = VideoDataModule(data, val=data, batch_size=2, num_workers=0).val_dataloader()
    assert next(iter(loader))["caption"] == ["a ramp", "the start"]


def test_an_empty_segment_is_skipped_and_counted(folder):
    (folder / "m.csv").write_text(
        "path,caption,start,end\nvideos/ramp.mp4,too late,10,12\nvideos/ramp.mp4,fine,0,\n"
    )
    data = CaptionedVideos(folder / "m.csv", num_frames=2, resolution=16)
    assert data[0]["caption"] == "fine" and data.num_skipped == 1


def test_bad_manifests_say_what_is_wrong(folder):
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_manifest(folder / "nothing.csv")
    (folder / "a.csv").write_text("video,text\nvideos/ramp.mp4,hello\n")
    with pytest.raises(ValueError, match=r"no column \['path', 'caption'\].*path_column"):
        read_manifest(folder / "a.csv")
    (folder / "b.csv").write_text("path,caption,start\nvideos/ramp.mp4,hello,soon\n")
    with pytest.raises(ValueError, match="row 1: start must be a number of seconds, got 'soon'"):
        read_manifest(folder / "b.csv")
    (folder / "c.txt").write_text("videos/ramp.mp4 hello\n")
    with pytest.raises(ValueError, match=r"must be \.csv or \.jsonl"):
        read_manifest(folder / "c.txt")
    (folder / "d.csv").write_text("path,caption\nelsewhere/ramp.mp4,hello\n")
    with pytest.raises(FileNotFoundError, match="none of the 1 videos"):
        CaptionedVideos(folder / "d.csv")
