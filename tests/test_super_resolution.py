"""Super-resolution: low-res pairs, noise-conditioning augmentation, training, the SR configs and the cascade."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from walt.cli import WaltCLI, main
from walt.conditioning import Conditioning, downsample_video, upsample_latent, upsample_video
from walt.data import SyntheticVideos, VideoDataModule, read_video
from walt.diffusion import expand_like
from walt.lightning import BaseDiffusionModule, SuperResolutionModule
from walt.pipeline import ModelFileError, load_cascade
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = {**presets["tiny"], "variational": False}


def sr_backbone(input_size=(2, 4, 4), **kwargs) -> WALT:
    args = dict(in_channels=4, depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=input_size)
    return WALT(**{**args, "lowres": True, **kwargs})


def sr_module(**kwargs) -> SuperResolutionModule:
    torch.manual_seed(0)
    args = dict(
        backbone=sr_backbone(),
        tokenizer=CausalVAE(**TINY_VAE),
        warmup_steps=1,
        ema_decay=None,
        num_log_samples=0,
        sample_steps=3,
    )
    return SuperResolutionModule(**{**args, **kwargs})


def randomize(module: torch.nn.Module, std: float = 0.05) -> None:
    """Non-zero weights everywhere (a new WALT's zero-initialised paths would hide every input)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def clips(n: int, frames: int = 5, size: int = 32) -> torch.Tensor:
    videos = SyntheticVideos(num_samples=n, num_frames=frames, resolution=size, shapes=["circle"])
    return torch.stack([videos[i]["video"] for i in range(n)])  # (n, 3, T, H, W)


# ---- the (low-res, high-res) pair and the upsampled input -------------------------------------------------


def test_downsampling_keeps_every_other_frame_and_averages_pixel_blocks():
    video = torch.randn(2, 3, 17, 8, 12)
    low = downsample_video(video, spatial_factor=2, temporal_factor=2)
    assert low.shape == (2, 3, 9, 4, 6)
    expected = video[:, :, ::2].reshape(2, 3, 9, 4, 2, 6, 2).mean(dim=(4, 6))  # an independent box filter
    torch.testing.assert_close(low, expected)
    with pytest.raises(ValueError, match="1 \\+ 8k"):
        downsample_video(torch.randn(1, 3, 5, 8, 8), 2, 2)  # 5 frames -> 3: not 1 + 4j
    with pytest.raises(ValueError, match="divide by spatial_factor"):
        downsample_video(torch.randn(1, 3, 5, 6, 9), 2, 1)


def test_upsampling_puts_the_low_res_frames_where_they_came_from():
    low = torch.randn(1, 3, 9, 4, 4)
    up = upsample_video(low, spatial_factor=1, temporal_factor=2)  # (1, 3, 17, 4, 4)
    assert up.shape == (1, 3, 17, 4, 4)
    torch.testing.assert_close(up[:, :, ::2], low)  # high-res frame 2i is low-res frame i
    torch.testing.assert_close(up[:, :, 1], (low[:, :, 0] + low[:, :, 1]) / 2)
    z = torch.randn(1, 4, 3, 2, 2)  # 3 latent frames of a 9-frame clip
    zt = upsample_latent(z, spatial_factor=1, temporal_factor=2)
    # High-res latent frame k holds pixel frames 4k-3..4k, whose even frames are in low-res latent ceil(k/2).
    assert [next(j for j in range(3) if torch.equal(zt[:, :, k], z[:, :, j])) for k in range(5)] == [
        0,
        1,
        1,
        2,
        2,
    ]
    zs = upsample_latent(z, spatial_factor=2, temporal_factor=1)
    torch.testing.assert_close(zs, F.interpolate(z, size=(3, 4, 4), mode="trilinear", align_corners=False))


# ---- noise-conditioning augmentation ----------------------------------------------------------------------


def test_the_augmentation_level_diffuses_the_low_res_latent_and_reaches_the_model():
    m = sr_module(max_aug_level=0.8)
    randomize(m.backbone)
    video = clips(3)
    z = m.latents({"video": video})
    cond = m.conditioner({"video": video}, z, train=True, generator=torch.Generator().manual_seed(5))
    # The same draws, made independently: levels, then the noise that diffuses the clean low-res latent.
    gen = torch.Generator().manual_seed(5)
    level = torch.rand(3, generator=gen) * 0.8
    noise = torch.randn(z.shape, generator=gen)
    clean = m.tokenizer.encode(upsample_video(downsample_video(video, 2, 1), 2, 1))
    alpha, sigma = m.schedule.alpha_sigma(level)
    torch.testing.assert_close(cond.aug_level, level)
    torch.testing.assert_close(cond.lowres, expand_like(alpha, z) * clean + expand_like(sigma, z) * noise)
    # The level is an input of its own: same low-res latent, another level, another prediction.
    x_t, t = torch.randn_like(z), torch.full((3,), 0.5)
    v = m.backbone(x_t, t, cond)
    v_other = m.backbone(x_t, t, Conditioning(lowres=cond.lowres, aug_level=torch.full((3,), 0.9)))
    assert (v - v_other).abs().mean() > 1e-3
    # ... and the sampling-time level is honoured (same seeds, another level, other latents).
    low = downsample_video(video[:2], 2, 1)
    pipe = m.pipeline()
    kwargs = dict(lowres=low, seeds=[0, 1], steps=2, output="latent", progress=False)
    a, b = pipe.generate(aug_level=0.0, **kwargs), pipe.generate(aug_level=0.5, **kwargs)
    assert a.shape == (2, 4, 2, 4, 4) and not torch.allclose(a, b)
    assert torch.equal(pipe.generate(aug_level=0.0, **kwargs), a)
    with pytest.raises(ValueError, match="aug_level is a diffusion time in \\[0, 1\\]"):
        pipe.generate(aug_level=1.5, **kwargs)


def test_bad_setups_fail_with_clear_errors():
    with pytest.raises(ValueError, match="lowres=True"):
        sr_module(backbone=sr_backbone(lowres=False))
    with pytest.raises(ValueError, match="lowres_path"):
        sr_module(lowres_path="nearest")
    with pytest.raises(ValueError, match="pixel batches"):
        m = sr_module()
        m._loss({"latent": torch.randn(2, 4, 2, 4, 4)}, train=True)


# ---- training -----------------------------------------------------------------------------------------------


def test_sr_training_lowers_the_loss_on_synthetic_videos(tmp_path):
    m = sr_module(self_condition_prob=0.0, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3))
    videos = SyntheticVideos(num_samples=8, num_frames=5, resolution=32, shapes=["circle"], motions=["left"])
    data = VideoDataModule(videos, val=videos, batch_size=4, num_workers=0, seed=0)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    gen = lambda: torch.Generator().manual_seed(0)
    before = m._loss(batch, train=False, generator=gen()).item()
    L.Trainer(
        accelerator="cpu",
        max_epochs=25,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    ).fit(m, data)
    after = m._loss(batch, train=False, generator=gen()).item()
    assert after < 0.7 * before, (before, after)


def test_temporal_super_resolution_doubles_the_frame_rate():
    m = sr_module(backbone=sr_backbone(input_size=(5, 4, 4)), spatial_factor=1, temporal_factor=2)
    video = clips(2, frames=17)
    loss = m._loss({"video": video}, train=True)
    assert torch.isfinite(loss)
    low = downsample_video(video, 1, 2)  # 9 frames in
    z = m.pipeline().generate(lowres=low, steps=2, output="latent", progress=False)
    assert z.shape == (2, 4, 5, 4, 4) and m.tokenizer.decode(z).shape == (2, 3, 17, 32, 32)
    videos = m.pipeline().generate(lowres=low, steps=2, output="float", progress=False)
    assert videos.shape == (2, 3, 17, 32, 32)


@pytest.mark.parametrize("config", sorted((ROOT / "configs/sr").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sr_config_runs_a_fast_dev_run(config, tmp_path, monkeypatch):
    """Each SR config as written (module, factors, augmentation, trainer), shrunk to run on a CPU."""
    monkeypatch.setattr(sys, "argv", ["walt"])
    content = yaml.safe_load(config.read_text())
    model = content["model"]["init_args"]
    model["backbone"]["init_args"].update(
        in_channels=4,
        depth=2,
        hidden_size=32,
        num_heads=2,
        input_size=[5, 4, 4],
        gradient_checkpointing=False,
    )
    model.update(
        tokenizer={"class_path": "walt.tokenizer.CausalVAE", "init_args": TINY_VAE}, tokenizer_weights=None
    )
    text = (model.get("conditioner") or {}).get("text_encoder")
    if text is not None:  # a text SR stage: the offline encoder, its caption cache here
        text["init_args"]["cache_dir"] = str(tmp_path / "text_cache")
    videos = {
        "class_path": "walt.data.SyntheticVideos",
        "init_args": {"num_samples": 2, "num_frames": 17, "resolution": 32},
    }
    content["data"]["init_args"].update(train=videos, val=videos, batch_size=2, num_workers=0)
    content["trainer"].update(accelerator="cpu", precision="32-true", default_root_dir=str(tmp_path))
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(content))
    WaltCLI(
        args=[
            "fit",
            "--config",
            str(path),
            "--trainer.fast_dev_run",
            "true",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )


# ---- the cascade ------------------------------------------------------------------------------------------------


def _tiny_cascade(tmp_path: Path) -> Path:
    """Base 16x16 (class-conditional) -> SR x2 32x32 -> SR x2 64x64, random non-zero weights: the base and the
    first SR stage as the checkpoints `walt fit` writes (weights and model description), the second SR stage as
    the model folder `walt export` writes; the cascade YAML names them."""
    stages = []
    for name, size, sr in (("base", 2, False), ("sr1", 4, True), ("sr2", 8, True)):
        backbone = dict(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=[5, size, size])
        if sr:
            backbone.update(patch_size=2, lowres=True, self_conditioning=True)
        else:
            backbone.update(num_classes=4)
        torch.manual_seed(len(stages))
        cls = SuperResolutionModule if sr else BaseDiffusionModule
        # one latent frame per tokenizer chunk, as the old cascade YAML's decode_chunk_size: 1
        module = cls(WALT(**backbone), CausalVAE(**TINY_VAE), ema_decay=None, tokenizer_chunk_size=1)
        randomize(module.backbone)
        if name == "sr2":
            model = module.pipeline().save_pretrained(tmp_path / name)
        else:
            model = tmp_path / f"{name}.ckpt"
            torch.save({"state_dict": module.state_dict(), "walt_model": module.model_description()}, model)
        stages.append({"model": str(model), "steps": 2})
    stages[1].update(aug_level=0.2, guidance=1.0)
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump({"stages": stages}))
    return path


def test_walt_sample_runs_the_cascade_deterministically(tmp_path):
    cascade = _tiny_cascade(tmp_path)

    def sample(seed: int, out: str) -> list:
        args = ["sample", "--cascade", str(cascade), "--output", str(tmp_path / out), "--num-samples", "2"]
        with pytest.raises(SystemExit) as done:
            main([*args, "--frames", "5", "--class", "2", "--seed", str(seed), "--device", "cpu"])
        assert done.value.code == 0
        return [read_video(tmp_path / out / f"sample_00{i}_class2.mp4") for i in range(2)]

    a, b, c = sample(0, "a"), sample(0, "b"), sample(1, "c")
    assert a[0].shape == (5, 64, 64, 3)  # 5x16x16 base -> 32x32 -> 64x64
    # Same seed, same videos, to the bit (MP4 encoding included); another seed differs by ~100+.
    same = [int(np.abs(x.astype(int) - y).max()) for x, y in zip(a, b)]
    other = [int(np.abs(x.astype(int) - y).max()) for x, y in zip(a, c)]
    assert max(same) == 0 and min(other) > 50 and np.abs(a[0].astype(int) - a[1]).max() > 50, (same, other)
    # Sample i has seed + i of its own: seed 1's first video is seed 0's second one.
    assert int(np.abs(c[0].astype(int) - a[1]).max()) == 0
    with pytest.raises(SystemExit):
        main(["sample", "--cascade", str(cascade), "--steps", "3"])  # steps are per stage in the YAML


def test_cascade_yaml_errors_name_the_stage(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"stages": [{"checkpoint": "a.ckpt"}]}))
    with pytest.raises(ModelFileError, match="stage 0 needs 'model'"):
        load_cascade(bad)
    bad.write_text(yaml.safe_dump({"stages": [{"model": "a.ckpt", "aug_level": 0.1}]}))
    with pytest.raises(ModelFileError, match="aug_level belongs to super-resolution"):
        load_cascade(bad)
    bad.write_text(yaml.safe_dump({"stages": [{"model": "a.ckpt", "stpes": 3}]}))
    with pytest.raises(ModelFileError, match="stage 0 has unknown keys \\['stpes'\\]"):
        load_cascade(bad)
    bad.write_text(yaml.safe_dump({"stages": [{"model": "a.ckpt"}], "decode_chunk_size": 1}))
    with pytest.raises(ModelFileError, match="unknown keys \\['decode_chunk_size'\\]"):
        load_cascade(bad)  # chunking is each model's own tokenizer_chunk_size now
