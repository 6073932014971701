"""TokenizerModule training/validation, the EMA, and `walt encode` (shards and latent statistics)."""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader

from walt.checkpoint import weights_sha256
from walt.data import UCF101, LatentShards, SyntheticVideos, collate_items
from walt.lightning import EMA, TokenizerModule
from walt.metrics import chroma_error, pooled_grid_ratio, psnr
from walt.tokenizer import CausalVAE, presets
from walt.tokenizer.discriminator import Discriminator3D
from walt.tokenizer.encode import encode_main, encode_to_shards, latent_statistics, load_vae_weights
from walt.tokenizer.losses import TokenizerLoss

ROOT = Path(__file__).resolve().parents[1]


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


class RecordingLoss(TokenizerLoss):
    """The real loss, noting for each discriminator step whether R1 ran and whether D's input could carry it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[bool, bool, bool]] = []

    def discriminator_loss(self, real, logits_real, logits_fake, penalty=True):
        total, logs = super().discriminator_loss(real, logits_real, logits_fake, penalty)
        self.calls.append((penalty, real.requires_grad, "gp" in logs))
        return total, logs


def test_lazy_gradient_penalty_runs_on_every_kth_discriminator_step(tmp_path):
    torch.manual_seed(0)
    loss = RecordingLoss(gan_start_step=1, gradient_penalty_weight=1.0, gradient_penalty_every=2)
    module = TokenizerModule(
        CausalVAE(**presets["tiny"]), loss, Discriminator3D(channels=4, multipliers=(2,))
    )
    trainer(tmp_path, limit_train_batches=6, limit_val_batches=0).fit(module, loader(12, 2))
    # batches 1..5 train D; R1 (and a D input that requires grad) on batches 1, 3 and 5 only
    assert loss.calls == [(True, True, True), (False, False, False)] * 2 + [(True, True, True)]


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
    # An autoencoder built otherwise is refused by name, also where no tensor shape differs (how it resizes)
    for other in ({"upsampler": "resize"}, {"modulation_upsample": "lanczos"}):
        with pytest.raises(ValueError, match=f"{next(iter(other))}: .* \\(here"):
            load_vae_weights(CausalVAE(**presets["tiny"], **other), tmp_path / "last.ckpt")
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


VAE_CONFIG = {"class_path": "walt.tokenizer.CausalVAE", "init_args": presets["tiny"]}
SYNTHETIC = {
    "class_path": "walt.data.SyntheticVideos",
    "init_args": {"num_samples": 6, "num_frames": 5, "resolution": 16},
}


def encode_args(folder: Path, train: dict = SYNTHETIC, out: str = "latents") -> list[str]:
    """`walt encode` arguments for a random tiny tokenizer's checkpoint and a config whose data is ``train``."""
    data = {"class_path": "walt.data.VideoDataModule", "init_args": {"train": train, "batch_size": 2}}
    config = folder / "tokenizer.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"vae": VAE_CONFIG}}, "data": data}))
    vae = random_vae()
    torch.save({"state_dict": {f"vae.{k}": v for k, v in vae.state_dict().items()}}, folder / "t.ckpt")
    return ["--config", str(config), "--checkpoint", str(folder / "t.ckpt"), "--output", str(folder / out)]


def test_encode_command_writes_normalized_latents(tmp_path):
    args = encode_args(tmp_path)
    out = tmp_path / "latents"
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
    assert yaml.safe_load((out / "vae.yaml").read_text()) == json.loads(json.dumps(VAE_CONFIG))


def test_encode_skips_unreadable_files_and_keeps_every_clip_with_its_own_label(tmp_path, ucf_root, capsys):
    """Training hands over the next file in place of an unreadable one; encoding must not, or the shards would
    hold a neighbour's clip (and, in class-sorted data, its class) in the skipped file's place. Two bad files
    (a corrupt AVI, a PNG renamed .avi): the shards hold the 4 readable clips with their own labels, and the
    summary names the 2 skipped files, counted once though read twice (statistics, then shards). Every file
    gets the umask's mode."""
    root = tmp_path / "ucf"
    shutil.copytree(ucf_root, root)
    corrupt = root / "UCF-101/Basketball/v_Basketball_g08_c01.avi"
    still = root / "UCF-101/HandstandPushups/v_HandStandPushups_g08_c02.avi"
    corrupt.write_bytes(b"RIFF not really an avi")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(still.with_suffix(".png"))
    still.with_suffix(".png").rename(still)
    ucf = {
        "class_path": "walt.data.UCF101",
        "init_args": {"root": str(root), "num_frames": 5, "resolution": 16},
    }
    old_umask = os.umask(0o022)
    try:
        assert encode_main([*encode_args(tmp_path, ucf), "--num-workers", "2"]) == 0
    finally:
        os.umask(old_umask)

    out = tmp_path / "latents"
    index = json.loads((out / "index.json").read_text())
    dataset = UCF101(root, split="train", num_frames=5, resolution=16)
    readable = [s for s in dataset.samples if s.path not in (corrupt, still)]
    labels = torch.cat([load_file(str(out / s["file"]))["labels"] for s in index["shards"]])
    assert labels.tolist() == [s.label for s in readable] == [0, 0, 1, 2]
    assert index["num_samples"] == 4 and index["num_files"] == 6
    assert [s["file"] for s in index["skipped"]] == [str(corrupt), str(still)]
    assert "still image" in index["skipped"][1]["reason"]
    printed = capsys.readouterr().out
    assert (
        "walt encode: skipped 2 of 6 files (unreadable): v_Basketball_g08_c01.avi, v_HandStandPushups_g08_c02.avi"
        in printed
    )
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        p.name: 0o644 for p in out.iterdir()
    }


def test_encode_refuses_an_earlier_runs_folder_and_overwrite_replaces_every_file(tmp_path, capsys):
    args = [*encode_args(tmp_path), "--num-workers", "0", "--stats-samples", "2"]
    out = tmp_path / "latents"
    assert encode_main([*args, "--shard-size", "1"]) == 0  # 6 shards
    first = (out / "index.json").read_bytes()
    assert encode_main([*args, "--shard-size", "4"]) == 1
    assert (
        "holds the outputs of an earlier walt encode (6 shard(s)); choose a new --output or pass --overwrite"
        in capsys.readouterr().err
    )
    assert (out / "index.json").read_bytes() == first  # untouched
    (out / "notes.txt").write_text("mine")
    assert encode_main([*args, "--shard-size", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "index.json", "notes.txt", "shard-00000.safetensors", "shard-00001.safetensors", "vae.safetensors", "vae.yaml",
    ]  # fmt: skip
    assert len(LatentShards(out)) == 6


def test_a_killed_encode_leaves_a_folder_that_latent_shards_refuses(tmp_path):
    """SIGKILL after two shards are written: no index.json (written last), so the folder is refused as
    incomplete rather than read as a dataset of some of the clips (or, overwriting, of two runs' clips); a new
    run into it is refused too, and --overwrite completes it."""
    flag = tmp_path / "paused"
    pausing = {
        "class_path": "tests._kill_points.PausingVideos",
        "init_args": {"pause_at": 5, "flag": str(flag), "num_samples": 6, "num_frames": 5, "resolution": 16},
    }
    args = [
        *encode_args(tmp_path, pausing),
        "--num-workers",
        "0",
        "--stats-samples",
        "2",
        "--shard-size",
        "2",
        "--batch-size",
        "2",
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
    }
    process = subprocess.Popen([sys.executable, "-m", "walt", "encode", *args], env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not flag.exists():
        assert process.poll() is None and time.monotonic() < deadline, "walt encode never reached item 5"
        time.sleep(0.01)
    process.kill()
    process.wait()
    out = tmp_path / "latents"
    assert sorted(p.name for p in out.iterdir()) == [
        "shard-00000.safetensors", "shard-00001.safetensors", "vae.safetensors", "vae.yaml",
    ]  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"is incomplete: no index\.json; re-run walt encode"):
        LatentShards(out)
    assert encode_main(args) == 1
    assert encode_main([*args, "--overwrite"]) == 0  # the flag is there: no pause this time
    assert len(LatentShards(out)) == 6


def test_stats_samples_0_keeps_the_statistics_of_an_encoded_tokenizer_and_refuses_a_checkpoint_without(
    tmp_path, capsys
):
    """0 clips would give no statistics: 0 means "keep the checkpoint's", which only a tokenizer written by
    walt encode (vae.safetensors) has; a training checkpoint's are the identity, and would leave the latents
    unnormalized without a word."""
    args = [*encode_args(tmp_path), "--num-workers", "0"]
    assert encode_main([*args, "--stats-samples", "0", "--output", str(tmp_path / "none")]) == 1
    assert "--stats-samples 0 keeps the latent statistics of the checkpoint, but" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    assert encode_main(args) == 0
    again = [
        *args,
        "--checkpoint",
        str(tmp_path / "latents/vae.safetensors"),
        "--output",
        str(tmp_path / "again"),
    ]
    assert encode_main([*again, "--stats-samples", "0"]) == 0
    first, second = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("latents", "again"))
    assert first["latent_scale"] == second["latent_scale"]
    latents = [
        load_file(str(tmp_path / d / "shard-00000.safetensors"))["latents"] for d in ("latents", "again")
    ]
    assert torch.isfinite(latents[0]).all() and torch.equal(latents[0], latents[1])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--shard-size", "-1"], "argument --shard-size: must be >= 1, got -1"),
        (["--stats-samples", "-1"], "argument --stats-samples: must be >= 0, got -1"),
        (["--num-workers", "two"], "argument --num-workers: expected an integer >= 0, got 'two'"),
        (["--checkpoint", "missing.ckpt"], "--checkpoint missing.ckpt: no such file"),
    ],
)
def test_encode_refuses_bad_arguments_before_any_work(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        encode_main([*encode_args(tmp_path), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "latents").exists()


def test_encode_shows_its_progress_in_clips(tmp_path, capsys):
    """Both passes report on stderr how many clips they have read of how many: the statistics over their
    --stats-samples, the shards over the whole split."""
    assert encode_main([*encode_args(tmp_path), "--stats-samples", "4", "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    assert "walt encode: statistics" in err and "4/4" in err
    assert "walt encode: shards" in err and "6/6" in err


def test_encode_of_a_split_the_config_lacks_names_the_splits_it_has(tmp_path, capsys):
    """A config with a train dataset only, asked for --split test: the error lists what there is to encode."""
    assert encode_main([*encode_args(tmp_path), "--split", "test", "--num-workers", "0"]) == 1
    err = capsys.readouterr().err
    assert "no 'test' dataset; choose --split among those it has: train" in err
    assert not (tmp_path / "latents" / "index.json").exists()


def test_encode_errors_are_one_line_without_a_traceback(tmp_path):
    """As the command runs: an empty checkpoint is named, in one line."""
    args = encode_args(tmp_path)
    (tmp_path / "t.ckpt").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "walt", "encode", *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"walt encode: {tmp_path / 't.ckpt'} is an empty file (0 bytes), not a checkpoint: was its copy or write cut short?"
    ]


def test_validation_logs_grid_ratio_and_chroma_error_of_the_reconstructions(tmp_path):
    """The logged values are the metrics of the EMA's reconstructions of the (single) validation batch."""
    torch.manual_seed(0)
    module = TokenizerModule(CausalVAE(**presets["tiny"]), TokenizerLoss(), ema_decay=0.5)
    val = loader(2, 2, seed=1, size=32)
    fit = trainer(tmp_path, limit_train_batches=1, limit_val_batches=1)
    fit.fit(module, loader(2, 2), val)
    x = next(iter(val))["video"]  # (2, 3, 5, 32, 32)
    vae = module.inference_vae
    with torch.no_grad():
        x_rec = vae.decode_raw(vae.encode_moments(x)[0]).clamp(-1, 1)  # (2, 3, 5, 32, 32)
    logged = fit.callback_metrics
    period = vae.spatial_factor
    assert period == 2 ** (len(presets["tiny"]["multipliers"]) - 1)
    grid = pooled_grid_ratio(x_rec, period, margin=period).float()  # the outermost cells left out
    torch.testing.assert_close(logged["val/grid_ratio"], grid)
    torch.testing.assert_close(logged["val/chroma_error"], chroma_error(x_rec, x).mean().float())
    assert logged["val/chroma_error"] > 0 and logged["val/grid_ratio"] > 0
