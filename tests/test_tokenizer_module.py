"""TokenizerModule training/validation, the EMA, and `walt encode` (shards and latent statistics)."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from walt.checkpoint import weights_sha256
from walt.data import SyntheticVideos, collate_items
from walt.lightning import EMA, TokenizerModule
from walt.metrics import psnr
from walt.tokenizer import CausalVAE, presets
from walt.tokenizer.discriminator import Discriminator3D
from walt.tokenizer.encode import encode_main, encode_to_shards, latent_statistics, load_vae_weights
from walt.tokenizer.losses import TokenizerLoss


def loader(num_samples: int, batch_size: int, seed: int = 0, frames: int = 5, size: int = 16) -> DataLoader:
    data = SyntheticVideos(num_samples=num_samples, num_frames=frames, resolution=size, seed=seed)
    return DataLoader(data, batch_size=batch_size, collate_fn=collate_items)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="tb"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
    )
    return L.Trainer(**(defaults | kwargs))


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_ema_update_golden_value():
    live = nn.BatchNorm1d(3)
    ema = EMA(live, decay=0.9, warmup=False)
    with torch.no_grad():
        live.weight.fill_(2.0)  # EMA starts from the initial 1.0
        live.running_mean.fill_(5.0)
    ema.update(live)
    torch.testing.assert_close(ema.module.weight, torch.full((3,), 0.9 * 1.0 + 0.1 * 2.0))
    torch.testing.assert_close(ema.module.running_mean, torch.full((3,), 5.0))  # buffers are copied
    assert not ema.module.weight.requires_grad and int(ema.num_updates) == 1
    with pytest.raises(ValueError, match="decay"):
        EMA(live, decay=1.0)


def test_ema_warmup_forgets_the_initialization():
    """Decays 1/10, 2/11, 3/12, ... capped at `decay`; replayed by hand in float64."""
    live = nn.Linear(1, 1, bias=False)
    ema = EMA(live, decay=0.5)
    expected = float(live.weight)
    for n, value in enumerate([3.0, -1.0, 4.0, 2.0]):
        with torch.no_grad():
            live.weight.fill_(value)
        d = min(0.5, (1 + n) / (10 + n))
        assert ema.current_decay() == d
        ema.update(live)
        expected = d * expected + (1 - d) * value
        assert abs(float(ema.module.weight) - expected) < 1e-6
    assert EMA(live, decay=0.999).current_decay() == 0.1  # the first update keeps 10% of the initialization


def test_gan_starts_at_its_step_and_checkpoint_holds_ema(tmp_path):
    torch.manual_seed(0)
    disc = Discriminator3D(channels=4, multipliers=(2,))
    module = TokenizerModule(
        CausalVAE(**presets["tiny"]),
        TokenizerLoss(gan_start_step=2, gradient_penalty_weight=1.0, lecam_weight=0.1),
        disc,
        ema_decay=0.5,
    )
    vae_before, disc_before = snapshot(module.vae), snapshot(disc)
    fit = trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    fit.fit(module, loader(4, 2), loader(2, 2, seed=1))
    assert int(module.train_steps) == 2 and fit.global_step == 2  # no discriminator step yet
    assert changed(vae_before, module.vae) and not changed(disc_before, disc)

    fit = trainer(tmp_path, limit_train_batches=2, limit_val_batches=1)
    fit.fit(module, loader(4, 2), loader(2, 2, seed=1))
    assert int(module.train_steps) == 4 and changed(disc_before, disc)
    logged = fit.callback_metrics
    assert {
        "train/d",
        "train/gp",
        "train/lecam",
        "train/g",
        "train/gan_weight",
        "val/psnr",
        "val/ssim",
    } <= set(logged)

    # The EMA differs from the live weights, and `walt encode` loads it from a real checkpoint.
    assert changed(snapshot(module.ema.module), module.vae)
    fit.save_checkpoint(tmp_path / "last.ckpt")
    restored = CausalVAE(**presets["tiny"])
    assert load_vae_weights(restored, tmp_path / "last.ckpt") == "ema"
    for a, b in zip(restored.state_dict().values(), module.ema.module.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # The checkpoint describes its autoencoder: it loads without its config (walt evaluate rfvd2048_16f).
    from walt.pipeline import load_tokenizer
    from walt.pipeline.parts import describe_part

    described = load_tokenizer(tmp_path / "last.ckpt")
    assert describe_part("tokenizer", described) == describe_part("tokenizer", module.vae)
    for a, b in zip(described.state_dict().values(), module.ema.module.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Lightning's load_from_checkpoint works too, through walt's checked reading (weights_only, hash)
    loaded = TokenizerModule.load_from_checkpoint(
        tmp_path / "last.ckpt", vae=CausalVAE(**presets["tiny"]), loss=TokenizerLoss(), ema_decay=0.5,
        discriminator=Discriminator3D(channels=4, multipliers=(2,)),
    )  # fmt: skip
    for a, b in zip(loaded.state_dict().values(), module.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_validation_logs_side_by_side_videos(tmp_path):
    module = TokenizerModule(CausalVAE(**presets["tiny"]), TokenizerLoss(), num_log_videos=2)
    fit = trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    fit.fit(module, loader(2, 2), loader(3, 3, seed=1))
    events = EventAccumulator(fit.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["val/reconstruction_0", "val/reconstruction_1"]
    image = events.Images("val/reconstruction_0")[-1]
    assert image.encoded_image_string[:4] == b"GIF8"
    assert (image.height, image.width) == (16, 32)  # input | reconstruction


def test_training_reduces_reconstruction_error(tmp_path):
    torch.manual_seed(0)
    vae = CausalVAE(**presets["tiny"] | {"variational": False})
    batch = next(iter(loader(4, 4, frames=5, size=16)))
    with torch.no_grad():
        before = psnr(vae.decode_raw(vae.encode_moments(batch["video"])[0]), batch["video"]).mean()
    module = TokenizerModule(
        vae, TokenizerLoss(gan_weight=0.0), optimizer=lambda p: torch.optim.Adam(p, lr=3e-3)
    )
    same_batch = DataLoader([batch] * 40, batch_size=None)
    trainer(tmp_path, logger=False).fit(module, same_batch)
    with torch.no_grad():
        after = psnr(vae.decode_raw(vae.encode_moments(batch["video"])[0]), batch["video"]).mean()
    assert after > before + 5.0, (before, after)


# ---- walt encode -------------------------------------------------------------------------------------------


def random_vae(seed: int = 0) -> CausalVAE:
    torch.manual_seed(seed)
    vae = CausalVAE(**presets["tiny"])
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0, 0.2)
    return vae.eval()


def test_latent_statistics_match_a_direct_computation():
    vae, data = random_vae(), loader(5, 2)
    mean, std = latent_statistics(vae, data)
    with torch.no_grad():
        raw = torch.cat([vae.encode_moments(b["video"])[0] for b in data])  # (N, C, T, h, w)
    flat = raw.transpose(0, 1).flatten(1)
    torch.testing.assert_close(mean, flat.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(std, flat.std(1, correction=0), atol=1e-5, rtol=1e-5)
    limited = latent_statistics(vae, data, max_samples=3)[0]
    torch.testing.assert_close(limited, raw[:3].transpose(0, 1).flatten(1).mean(1), atol=1e-5, rtol=1e-5)


def test_shards_hold_every_clip_in_order(tmp_path):
    vae, data = random_vae(), loader(5, 2)
    shards = encode_to_shards(vae, data, tmp_path, shard_size=3)
    assert [s["num_samples"] for s in shards] == [3, 2]
    latents = torch.cat([load_file(str(tmp_path / s["file"]))["latents"] for s in shards])
    labels = torch.cat([load_file(str(tmp_path / s["file"]))["labels"] for s in shards])
    captions = []
    for s in shards:
        with safe_open(str(tmp_path / s["file"]), "pt") as f:
            captions += json.loads(f.metadata()["captions"])
    items = [data.dataset[i] for i in range(5)]
    with torch.no_grad():
        expected = vae.encode(torch.stack([it["video"] for it in items]))
    torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
    assert labels.tolist() == [it["label"] for it in items]
    assert captions == [it["caption"] for it in items]


def test_encode_command_writes_normalized_latents(tmp_path):
    vae = random_vae()
    vae_config = {"class_path": "walt.tokenizer.CausalVAE", "init_args": presets["tiny"]}
    data = {
        "class_path": "walt.data.VideoDataModule",
        "init_args": {
            "train": {
                "class_path": "walt.data.SyntheticVideos",
                "init_args": {"num_samples": 6, "num_frames": 5, "resolution": 16},
            },
            "batch_size": 2,
            "num_workers": 0,
        },
    }
    config = tmp_path / "tokenizer.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"vae": vae_config}}, "data": data}))
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, tmp_path / "t.ckpt")
    out = tmp_path / "latents"
    args = ["--config", str(config), "--checkpoint", str(tmp_path / "t.ckpt"), "--output", str(out)]
    assert encode_main([*args, "--batch-size", "4", "--shard-size", "4", "--num-workers", "0"]) == 0

    index = json.loads((out / "index.json").read_text())
    assert index["num_samples"] == 6 and len(index["shards"]) == 2
    latents = torch.cat([load_file(str(out / s["file"]))["latents"] for s in index["shards"]])
    flat = latents.transpose(0, 1).flatten(1)  # statistics were computed on this same data
    torch.testing.assert_close(flat.mean(1), torch.zeros(4), atol=1e-4, rtol=0)
    torch.testing.assert_close(flat.std(1, correction=0), torch.ones(4), atol=1e-4, rtol=0)
    # The saved tokenizer carries the statistics and decodes the shards.
    saved = CausalVAE(**presets["tiny"])
    assert load_vae_weights(saved, out / "vae.safetensors") == "file"
    torch.testing.assert_close(saved.latent_shift, torch.tensor(index["latent_shift"]))
    with safe_open(
        str(out / "vae.safetensors"), "pt"
    ) as f:  # the hash loading checks (tests/test_integrity.py)
        assert f.metadata()["weights_sha256"] == weights_sha256(saved.state_dict())
    assert yaml.safe_load((out / "vae.yaml").read_text()) == json.loads(json.dumps(vae_config))
