"""Datasets read through real files (UCF-101 / Kinetics-600 trees written with PyAV) and the procedural sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.conftest import UCF_CLASSES, moving_bar
from walt.data import (
    UCF101,
    ImageFolderVideos,
    Kinetics600,
    MovingDigits,
    SyntheticVideos,
    VideoReadError,
    write_video,
)
from walt.data.synthetic import COLORS


def _check_item(item, frames, size):
    video = item["video"]
    assert video.shape == (3, frames, *size) and video.dtype == torch.float32
    assert video.min() >= -1.0 and video.max() <= 1.0


def test_ucf101_splits_labels_and_clips(ucf_root):
    train = UCF101(ucf_root, split="train", num_frames=9, stride=2, resolution=32)
    test = UCF101(ucf_root, split="test", num_frames=9, resolution=(32, 48))
    both = UCF101(ucf_root, split="all", num_frames=9, resolution=32)
    assert (len(train), len(test), len(both)) == (6, 6, 12)
    assert train.classes == UCF_CLASSES and train.num_classes == 3
    assert {s.path for s in train.samples}.isdisjoint({s.path for s in test.samples})
    for ds, size in ((train, (32, 32)), (test, (32, 48))):
        for i in range(len(ds)):
            item = ds[i]
            _check_item(item, 9, size)
            folder = ds.samples[i].path.parent.name
            assert item["label"] == UCF_CLASSES.index(folder)  # 0-based, from classInd
    assert test[0]["caption"] == "apply eye makeup"
    assert train.offset == "random" and test.offset == "center"
    # The red channel encodes the class colour: class 0 has no green, class 2 has the most.
    greens = [test[i]["video"][1].max().item() for i in range(len(test))]
    assert greens[0] < greens[-1]


def test_ucf101_missing_layout_fails_at_construction(tmp_path, ucf_root):
    with pytest.raises(FileNotFoundError, match=r"expected UCF-101 layout(.|\n)*classInd.txt"):
        UCF101(tmp_path)
    with pytest.raises(FileNotFoundError, match="trainlist02"):
        (tmp_path / "UCF-101").mkdir()
        (tmp_path / "ucfTrainTestlist").mkdir()
        (tmp_path / "ucfTrainTestlist" / "classInd.txt").write_text("1 A\n")
        UCF101(tmp_path, fold=2)


def test_corrupt_video_is_skipped_and_counted(tmp_path, ucf_root):
    import shutil

    root = tmp_path / "ucf"
    shutil.copytree(ucf_root, root)
    bad = root / "UCF-101" / "Basketball" / "v_Basketball_g08_c01.avi"
    bad.write_bytes(b"RIFF not really an avi")
    ds = UCF101(root, split="train", num_frames=4, resolution=16)
    bad_index = [s.path for s in ds.samples].index(bad)
    item = ds[bad_index]
    assert ds.num_skipped == 1
    # The next file in the index stands in for the bad one.
    assert item["label"] == ds.samples[bad_index + 1].label
    # Across data-loader workers the count is shared with the main process.
    ds2 = UCF101(root, split="train", num_frames=4, resolution=16)
    seen = sum(len(b["label"]) for b in DataLoader(ds2, batch_size=2, num_workers=2, collate_fn=_collate))
    assert seen == len(ds2) and ds2.num_skipped == 1


def test_the_skip_count_is_of_files_not_of_skip_events(tmp_path, ucf_root):
    """Two bad files side by side (one a PNG renamed .avi, which FFmpeg would read as a one-frame video), read
    over three epochs through two workers: each bad file is met many times (by its own index, by its
    neighbour's fallback, every epoch) and counted once."""
    import shutil

    root = tmp_path / "ucf"
    shutil.copytree(ucf_root, root)
    first = root / "UCF-101" / "Basketball" / "v_Basketball_g08_c01.avi"
    second = root / "UCF-101" / "Basketball" / "v_Basketball_g08_c02.avi"
    first.write_bytes(b"RIFF not really an avi")
    Image.fromarray(moving_bar(1, 32, 32, (9, 9, 9))[0]).save(second.with_suffix(".png"))
    second.with_suffix(".png").rename(second)
    ds = UCF101(root, split="train", num_frames=4, resolution=16)
    for _ in range(3):
        assert (
            sum(len(b["label"]) for b in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=_collate))
            == 6
        )
    assert ds.num_skipped == 2 and ds.skips.num_files == 6
    with pytest.raises(VideoReadError, match="still image"):
        ds.load(next(s for s in ds.samples if s.path == second))


def test_too_short_video_follows_the_policy(tmp_path):
    root = tmp_path / "ucf"
    (root / "ucfTrainTestlist").mkdir(parents=True)
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 Short\n")
    (root / "ucfTrainTestlist" / "trainlist01.txt").write_text(
        "Short/v_Short_g01_c01.avi 1\nShort/v_Short_g01_c02.avi 1\n"
    )
    write_video(root / "UCF-101/Short/v_Short_g01_c01.avi", moving_bar(5, 32, 32, (255, 0, 0)), fps=5)
    write_video(root / "UCF-101/Short/v_Short_g01_c02.avi", moving_bar(20, 32, 32, (255, 0, 0)), fps=5)
    looped = UCF101(root, num_frames=8, resolution=32, short_policy="loop")[0]["video"]
    torch.testing.assert_close(looped[:, 5:], looped[:, :3])  # frames 5, 6, 7 repeat frames 0, 1, 2
    skipping = UCF101(root, num_frames=8, resolution=32, short_policy="skip")
    skipping[0]
    assert skipping.num_skipped == 1


def test_kinetics600_layout_missing_clips_and_labels(k600_root):
    train = Kinetics600(k600_root, split="train", num_frames=8, resolution=32)
    val = Kinetics600(k600_root, split="val", num_frames=8, resolution=32, offset="start")
    assert train.classes == ["abseiling", "playing drums", "zumba"] == val.classes
    assert (len(train), train.num_missing) == (4, 1)
    assert (len(val), val.num_missing) == (2, 0)
    labels = sorted(train[i]["label"] for i in range(len(train)))
    assert labels == [0, 1, 1, 2]
    item = val[0]
    _check_item(item, 8, (32, 32))
    assert item["caption"] == "zumba" and item["label"] == 2
    with pytest.raises(FileNotFoundError, match="expected Kinetics-600 layout"):
        Kinetics600(k600_root, split="test")


def test_image_folder_videos(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / cls / f"{i}.png"
            )
    (tmp_path / "dogs" / "0.txt").write_text("a dog on grass\n")
    (tmp_path / "cats" / "broken.jpg").write_bytes(b"not a jpeg")
    ds = ImageFolderVideos(tmp_path, resolution=24)
    assert ds.classes == ["cats", "dogs"] and len(ds) == 5
    items = [ds[i] for i in range(len(ds))]
    for item in items:
        _check_item(item, 1, (24, 24))
    assert ds.num_skipped == 1
    # The broken cat image (third in sorted order) is replaced by the next file, the first dog.
    assert [it["label"] for it in items] == [0, 0, 1, 1, 1]
    assert any(it.get("caption") == "a dog on grass" for it in items)


def test_synthetic_videos_are_deterministic_and_move_as_captioned():
    ds = SyntheticVideos(num_samples=24, num_frames=9, resolution=48, seed=3)
    again = SyntheticVideos(num_samples=24, num_frames=9, resolution=48, seed=3)
    other = SyntheticVideos(num_samples=24, num_frames=9, resolution=48, seed=4)
    assert torch.equal(ds[5]["video"], again[5]["video"])
    assert not torch.equal(ds[5]["video"], other[5]["video"])
    assert ds.num_classes == 3 * 4 * 4
    for i in range(len(ds)):
        item = ds[i]
        _check_item(item, 9, (48, 48))
        colour, shape, _, motion = ds.classes[item["label"]].split()
        assert item["caption"] == f"a {colour} {shape} moving {motion}"
        # The shape's pixels are the ones close to its colour; their centroid moves as the caption says.
        rgb = torch.tensor(COLORS[colour]).float().div(127.5).sub(1)
        mask = (item["video"] - rgb[:, None, None, None]).abs().amax(0) < 0.05  # (T, H, W)
        ys, xs = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")
        cy = (mask * ys).sum((1, 2)) / mask.sum((1, 2))
        cx = (mask * xs).sum((1, 2)) / mask.sum((1, 2))
        dy, dx = (cy[-1] - cy[0]).item(), (cx[-1] - cx[0]).item()
        expected = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}[motion]
        assert dy * expected[0] + dx * expected[1] > 5  # moved at least 5 pixels the right way
        assert abs(dy * expected[1]) + abs(dx * expected[0]) < 1.5  # and not sideways


def test_moving_digits_split_by_instance_and_deterministic():
    train = MovingDigits("train", num_samples=16, num_frames=6, resolution=32)
    test = MovingDigits("test", num_samples=16, num_frames=6, resolution=32)
    assert set(train.instance_ids).isdisjoint(test.instance_ids)
    assert len(train.instance_ids) + len(test.instance_ids) == 1797
    assert torch.equal(train[3]["video"], MovingDigits("train", 16, 6, 32)[3]["video"])
    for ds in (train, test):
        item = ds[0]
        _check_item(item, 6, (32, 32))
        a, b = divmod(item["label"], 10)
        assert item["caption"] == f"the digits {a} and {b} bouncing"
        assert torch.equal(item["video"][0], item["video"][1])  # grey: all channels equal
        assert (item["video"] > 0).any() and (item["video"] == -1).float().mean() > 0.5  # digits on black
    one = MovingDigits("train", num_samples=4, num_digits=1, resolution=32, num_frames=3)
    assert one.num_classes == 10 and one[0]["caption"] == f"the digit {one[0]['label']} bouncing"


def test_moving_digits_first_digit_labels_and_digits_of():
    both = MovingDigits("test", num_samples=20, num_frames=3, resolution=32)
    first = MovingDigits("test", num_samples=20, num_frames=3, resolution=32, label="first")
    assert first.num_classes == 10 and first.classes == [str(d) for d in range(10)]
    for i in range(20):
        a, b = divmod(both[i]["label"], 10)
        assert both.digits_of(i) == first.digits_of(i) == [a, b]  # digits_of reads the same draw
        assert first[i]["label"] == a and torch.equal(first[i]["video"], both[i]["video"])
    with pytest.raises(ValueError, match="label must be 'both' or 'first'"):
        MovingDigits(label="second")


def _collate(items):
    return {"label": [it["label"] for it in items]}


def test_colour_and_motion_can_be_read_back_from_synthetic_clips():
    from walt.data.synthetic import read_colour_and_motion

    ds = SyntheticVideos(num_samples=48, num_frames=9, resolution=32, seed=5)
    for i in range(len(ds)):
        colour, _, _, motion = ds.classes[ds[i]["label"]].split()
        assert read_colour_and_motion(ds[i]["video"], ["red", "green", "blue", "yellow"]) == (colour, motion)
    assert read_colour_and_motion(torch.full((3, 4, 8, 8), -0.6)) == ("none", "none")  # background only
