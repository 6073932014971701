"""Video files written and read back through PyAV: formats, frame selection, atomic writes, bad files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import walt.data.io
from tests.conftest import moving_bar
from walt.atomic import atomic_path, write_atomic
from walt.data import (
    ShortVideoError,
    VideoReadError,
    probe_video,
    read_video,
    resize_center_crop,
    sample_frame_indices,
    to_float_video,
    to_uint8,
    write_video,
)
from walt.metrics.evaluate import list_files

ROOT = Path(__file__).resolve().parents[1]
_SUFFIXES = (".mp4", ".avi", ".gif")


@pytest.mark.parametrize(("suffix", "max_mean_error"), [(".mp4", 5.0), (".avi", 6.0), (".gif", 6.0)])
def test_write_read_round_trip(tmp_path, suffix, max_mean_error):
    frames = moving_bar(12, 48, 64, (220, 40, 40))
    path = write_video(tmp_path / f"clip{suffix}", frames, fps=10)
    info = probe_video(path)
    back = read_video(path)
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert info.num_frames == 12 and (info.width, info.height) == (64, 48)
    # GIF stores delays in 1/100 s, so 10 fps is exact there too.
    assert info.fps == pytest.approx(10.0, rel=0.01)
    # Lossy codecs (4:2:0 chroma on a noisy background): close to the original on average, and the moving bar is where it should be in every frame.
    assert np.abs(back.astype(float) - frames).mean() < max_mean_error
    bar_column = back[..., 0].astype(float).mean(axis=1).argmax(axis=1)  # (T,) brightest red column
    expected = np.array([(t * 2) % 58 for t in range(12)])
    assert np.all(np.abs(bar_column - expected - 2.5) <= 3)


def test_frame_indices_select_the_same_frames_as_a_full_decode(tmp_path):
    path = write_video(tmp_path / "clip.mp4", moving_bar(16, 32, 32, (0, 255, 0)), fps=8)
    full = read_video(path)
    picked = read_video(path, [5, 0, 5, 15])
    np.testing.assert_array_equal(picked, full[[5, 0, 5, 15]])


def test_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    write_video(tmp_path / "a.mp4", moving_bar(4, 16, 16, (9, 9, 9)), fps=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]
    with pytest.raises(ValueError, match="even height and width"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


def test_a_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    def encode_then_fail(tmp, *args):
        Path(tmp).write_bytes(b"half a video")
        raise RuntimeError("disk full")

    monkeypatch.setattr(walt.data.io, "_encode", encode_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_video(tmp_path / "a.mp4", moving_bar(4, 16, 16, (9, 9, 9)))
    assert list(tmp_path.iterdir()) == []


def test_a_killed_write_leaves_only_a_hidden_file_that_listings_skip_and_the_next_write_removes(tmp_path):
    """SIGKILL while a long clip is being encoded (as when `walt sample` is killed): no sample_000.mp4, only a
    hidden temporary file beside it, which walt evaluate's listing leaves out; the next write of the same file
    removes it."""
    code = (
        "import sys, numpy as np\n"
        "from walt.data import write_video\n"
        "frames = np.random.default_rng(0).integers(0, 256, (600, 256, 256, 3), dtype=np.uint8)\n"
        "write_video(sys.argv[1], frames)\n"
    )
    target = tmp_path / "sample_000.mp4"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", code, str(target)], env=env)
    deadline = time.monotonic() + 120
    while not any(p.stat().st_size > 0 for p in tmp_path.glob(".sample_000.mp4.*.tmp")):
        assert process.poll() is None, "the writer ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.kill()  # SIGKILL: no handler, no cleanup
    process.wait()
    assert not target.exists()
    [orphan] = list(tmp_path.iterdir())
    assert orphan.name.startswith(".sample_000.mp4.")
    write_video(tmp_path / "sample_001.mp4", moving_bar(4, 16, 16, (9, 9, 9)))
    assert list_files(tmp_path, (".mp4",)) == [tmp_path / "sample_001.mp4"]
    write_video(target, moving_bar(4, 16, 16, (9, 9, 9)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample_000.mp4", "sample_001.mp4"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_umasks_mode(tmp_path, umask):
    """As a plain open() gives them, whatever the writer library does (mkstemp and safetensors make 0600)."""
    old = os.umask(umask)
    try:
        files = [
            write_video(tmp_path / f"v{suffix}", moving_bar(3, 16, 16, (9, 9, 9))) for suffix in _SUFFIXES
        ]
        files.append(write_atomic(tmp_path / "a.json", "{}"))
        with atomic_path(tmp_path / "t.safetensors") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp))
        files.append(tmp_path / "t.safetensors")
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}


def test_a_still_image_under_a_video_name_is_unreadable(tmp_path):
    """FFmpeg opens a PNG renamed .avi as a one-frame video; as a clip it would be that frame looped."""
    Image.fromarray(moving_bar(1, 32, 32, (9, 9, 9))[0]).save(tmp_path / "still.png")
    (tmp_path / "still.png").rename(tmp_path / "clip.avi")
    with pytest.raises(VideoReadError, match=r"clip\.avi is a still image \(png data\), not a video"):
        read_video(tmp_path / "clip.avi")
    with pytest.raises(VideoReadError, match="still image"):
        probe_video(tmp_path / "clip.avi")
    one = write_video(tmp_path / "one.mp4", moving_bar(1, 32, 32, (9, 9, 9)))  # a real one-frame video reads
    assert read_video(one).shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    ("name", "frames", "match"),
    [
        ("x.mkv", np.zeros((2, 8, 8, 3), np.uint8), "unknown suffix"),
        ("x.mp4", np.zeros((2, 8, 8, 3), np.float32), "must be uint8"),
        ("x.mp4", np.zeros((8, 8, 3), np.uint8), r"shape \(T, H, W, 3\)"),
    ],
)
def test_write_rejects_bad_input_with_a_clear_message(tmp_path, name, frames, match):
    with pytest.raises(ValueError, match=match):
        write_video(tmp_path / name, frames)


def test_corrupt_and_truncated_files_raise_video_read_error(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoReadError, match=r"garbage\.mp4"):
        read_video(garbage)
    whole = write_video(tmp_path / "whole.avi", moving_bar(24, 48, 64, (255, 0, 0)), fps=8).read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(VideoReadError, match=r"truncated\.avi"):  # fails to open or ends early, never crashes
        read_video(truncated, [23])
    with pytest.raises(VideoReadError):
        read_video(tmp_path / "does_not_exist.mp4")


def test_sample_frame_indices():
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = sample_frame_indices(40, 8, stride=3, offset="random", rng=rng)
        assert len(idx) == 8 and idx[0] >= 0 and idx[-1] < 40 and np.all(np.diff(idx) == 3)
    np.testing.assert_array_equal(sample_frame_indices(21, 5, 2, "center"), [6, 8, 10, 12, 14])
    np.testing.assert_array_equal(sample_frame_indices(21, 5, 2, "start"), [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(sample_frame_indices(4, 6, 1, short_policy="loop"), [0, 1, 2, 3, 0, 1])
    with pytest.raises(ShortVideoError, match="needs 6 frames"):
        sample_frame_indices(4, 6, 1, short_policy="skip")


def test_float_uint8_conversions_are_exact_inverses():
    frames = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    video = to_float_video(frames)  # (3, T, H, W)
    assert video.shape == (3, 3, 5, 7) and video.min() >= -1 and video.max() <= 1
    assert torch.equal(to_uint8(video), frames)
    assert torch.equal(to_uint8(video[None] * 5)[0] > 0, to_uint8(video.clamp(-1, 1) * 5) > 0)  # clamps


def test_resize_center_crop():
    video = torch.rand(3, 2, 40, 60)
    # Same height: no rescale, only a centre crop of the width.
    torch.testing.assert_close(resize_center_crop(video, 40), video[..., 10:50])
    assert resize_center_crop(video, (40, 60)) is video
    # Constant images stay constant when downscaled with antialiasing; aspect ratio is kept by cropping.
    flat = torch.full((3, 2, 90, 160), 0.25)
    out = resize_center_crop(flat, (32, 32))
    assert out.shape == (3, 2, 32, 32)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))
    # A left/right split image, cropped to a square, keeps the split in the middle.
    split = torch.zeros(1, 1, 64, 128)
    split[..., 64:] = 1
    sq = resize_center_crop(split, 32)[0, 0]  # (32, 32)
    assert sq[:, :15].max() < 0.05 and sq[:, 17:].min() > 0.95


def test_the_same_frames_always_give_the_same_mp4(tmp_path):
    """x264's macroblock-tree rate control is off: with it, 60 encodes of this clip gave 2-5 bitstreams."""
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (1, 8, 8, 3)).repeat(8, axis=1).repeat(8, axis=2)
    frames = np.clip(blocks + rng.normal(0, 60, (5, 64, 64, 3)), 0, 255).astype(np.uint8)
    files = {write_video(tmp_path / f"v{i}.mp4", frames).read_bytes() for i in range(60)}
    assert len(files) == 1


def test_procedural_data_needs_no_pyav_and_video_files_name_it():
    # sys.modules["av"] = None makes `import av` fail, as on a machine without PyAV.
    code = (
        "import sys; sys.modules['av'] = None\n"
        "from walt.data import MovingDigits, read_video\n"
        "assert MovingDigits(num_samples=1, num_frames=5, resolution=32)[0]['video'].shape == (3, 5, 32, 32)\n"
        "try:\n"
        "    read_video('x.mp4')\n"
        "except ImportError as err:\n"
        "    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "needs PyAV: pip install av" in out
