"""BaseDiffusionModule: training, frame prediction, freezing, exact resumption, NaN stops, sampling, the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from tests.conftest import cpu_sized_config, write_tiny_latents
from walt.cli import WaltCLI, main
from walt.conditioning import frames_to_generate
from walt.data import SyntheticVideos, VideoDataModule, read_video, to_uint8, write_video
from walt.lightning import BaseDiffusionModule
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT

ROOT = Path(__file__).resolve().parents[1]
LATENT = (4, 2, 2, 2)  # tiny tokenizer on 5 frames of 16x16


def backbone(**kwargs) -> WALT:
    args = dict(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=LATENT[1:], num_classes=4)
    return WALT(**{**args, **kwargs})


def module(**kwargs) -> BaseDiffusionModule:
    torch.manual_seed(0)
    args = dict(
        backbone=backbone(),
        tokenizer=CausalVAE(**presets["tiny"]),
        warmup_steps=1,
        ema_decay=0.9,
        num_log_samples=0,
        sample_steps=4,
    )
    return BaseDiffusionModule(**{**args, **kwargs})


def data(num_samples: int = 16, batch_size: int = 4) -> VideoDataModule:
    videos = SyntheticVideos(
        num_samples=num_samples,
        num_frames=5,
        resolution=16,
        colors=["red"],
        motions=["left", "right"],
        shapes=["circle", "square"],
    )
    return VideoDataModule(videos, val=videos, batch_size=batch_size, num_workers=0, seed=0)


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**args, **kwargs})


def test_training_lowers_the_validation_loss(tmp_path):
    m, d = module(ema_decay=None, optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3)), data(num_samples=8)
    d.setup("fit")
    batch = next(iter(d.val_dataloader()))
    gen = lambda: torch.Generator().manual_seed(0)
    before = m._loss(batch, train=False, generator=gen()).item()
    trainer(tmp_path, max_epochs=25, enable_checkpointing=False).fit(m, d)
    after = m._loss(batch, train=False, generator=gen()).item()
    assert after < 0.7 * before, (before, after)


def test_resuming_follows_the_uninterrupted_run_exactly(tmp_path):
    full = LossRecorder()
    trainer(tmp_path / "a", max_epochs=2, callbacks=[full], enable_checkpointing=False).fit(module(), data())
    first = LossRecorder()
    t1 = trainer(tmp_path / "b", max_epochs=1, callbacks=[first], enable_checkpointing=False)
    t1.fit(module(), data())
    t1.save_checkpoint(tmp_path / "epoch1.ckpt")
    torch.manual_seed(1234)  # whatever the process did in between must not matter
    second = LossRecorder()
    trainer(tmp_path / "b", max_epochs=2, callbacks=[second], enable_checkpointing=False).fit(
        module(), data(), ckpt_path=tmp_path / "epoch1.ckpt"
    )
    assert len(full.losses) == 8 and first.losses + second.losses == full.losses


def test_a_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(tmp_path):
    m = module()
    t = trainer(tmp_path, max_epochs=1, enable_checkpointing=False)
    t.fit(m, data())
    good = tmp_path / "good.ckpt"
    t.save_checkpoint(good)
    with torch.no_grad():
        m.backbone.final_layer.unembed.proj.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer(tmp_path, max_epochs=2, enable_checkpointing=False).fit(m, data())
    state = torch.load(good, weights_only=True)["state_dict"]
    assert torch.isfinite(state["backbone.final_layer.unembed.proj.weight"]).all()


def test_frame_prediction_gives_first_frames_and_masks_their_loss():
    m = module(backbone=backbone(context_frames=True), frame_prediction_prob=1.0, max_context_frames=1)
    z = torch.randn(6, *LATENT)
    cond = m.conditioner({"label": torch.zeros(6, dtype=torch.long)}, z, train=True, generator=None)
    weight = frames_to_generate(cond.context_mask)  # the loss's weight: 0 on the given frames
    assert torch.equal(cond.context, z)
    assert (
        torch.equal(cond.context_mask[:, :, 0], torch.ones(6, 1, 2, 2))
        and not cond.context_mask[:, :, 1].any()
    )
    assert torch.equal(weight, 1 - cond.context_mask)
    with pytest.raises(ValueError, match="context_frames=True"):
        module(frame_prediction_prob=0.5)


def test_only_spatiotemporal_blocks_train_when_asked(tmp_path):
    m = module(train_only_spatiotemporal=True, ema_decay=None)
    with torch.no_grad():  # stands for a pretrained image model: its zero-initialised output layer is trained
        for p in m.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spatial, st = m.backbone.blocks[0], m.backbone.blocks[1]  # windows alternate (1, H, W) and (5, 8, 8)
    before = [p.clone() for p in spatial.parameters()], [p.clone() for p in st.parameters()]
    trainer(tmp_path, max_steps=2, enable_checkpointing=False).fit(m, data())
    assert all(torch.equal(a, b) for a, b in zip(before[0], spatial.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(before[1], st.parameters()))


def test_sampling_is_deterministic_and_keeps_the_given_frames():
    """Through the module's pipeline (its current EMA weights): the same seeds give the same latents, given
    context frames are kept exactly (the tokenizer's latents of the context) while the rest changes, and the
    decoded videos are in range."""
    m = module(backbone=backbone(context_frames=True)).eval()
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.normal_(0, 0.05)
    m.ema.module.load_state_dict(m.backbone.state_dict())
    pipe = m.pipeline()
    assert pipe.backbone is m.ema.module and pipe.sample_steps == 4  # the EMA weights, shared, not copied
    kwargs = dict(labels=[0, 3], seeds=[7, 8], steps=3, output="latent", progress=False)
    a = pipe.generate(**kwargs)
    b = pipe.generate(**kwargs)
    assert a.shape == (2, *LATENT) and torch.equal(a, b)
    context = torch.rand(2, 3, 5, 16, 16) * 2 - 1  # pixels (N, 3, T, H, W) in [-1, 1]
    c = pipe.generate(**kwargs, context=context, context_frames=1, guidance=2.0)
    with torch.no_grad():
        given = m.tokenizer.encode(context[:, :, :1])  # (2, C, 1, h, w): 1 pixel frame -> 1 latent frame
    assert torch.equal(c[:, :, :1], given) and not torch.equal(c[:, :, 1:], a[:, :, 1:])
    pixels = pipe.generate(labels=[0, 3], seeds=[7, 8], steps=2, output="float", progress=False)
    assert pixels.shape == (2, 3, 5, 16, 16) and pixels.abs().max() <= 1
    videos = pipe.generate(labels=[0, 3], seeds=[7, 8], steps=2, progress=False)  # uint8, as walt sample gets
    assert videos.dtype == torch.uint8 and videos.shape == (2, 5, 16, 16, 3)
    assert torch.equal(videos, to_uint8(pixels))


def _runnable_here(config_path: Path, tmp_path: Path) -> Path:
    """The config with its data and tokenizer pointed at tiny files made here, shrunk to run on a CPU."""
    write_tiny_latents(tmp_path)
    return cpu_sized_config(yaml.safe_load(config_path.read_text()), tmp_path, config_path.name)


BASE_CONFIGS = [*sorted((ROOT / "configs/base").glob("*.yaml")), ROOT / "configs/moving_digits/base.yaml"]


@pytest.mark.parametrize("config", BASE_CONFIGS, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_base_config_runs_a_fast_dev_run(config, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["walt"])
    WaltCLI(
        args=[
            "fit",
            "--config",
            str(_runnable_here(config, tmp_path)),
            "--trainer.fast_dev_run",
            "true",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )


def test_quickstart_config_trains_and_walt_sample_writes_videos(tmp_path, monkeypatch):
    """`walt fit` leaves <default_root_dir>/checkpoints/last.ckpt, which `walt sample --model` samples without
    the YAML (class names included); a checkpoint without a model description still samples with --config."""
    monkeypatch.setattr(sys, "argv", ["walt"])
    config = _runnable_here(ROOT / "configs/base/quickstart.yaml", tmp_path)
    WaltCLI(
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "2",
            "--trainer.max_epochs",
            "1",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    ckpt = tmp_path / "run/checkpoints/last.ckpt"  # cpu_sized_config's default_root_dir is tmp_path / "run"
    assert ckpt.is_file()
    out = tmp_path / "samples"
    common = ["sample", "--num-samples", "3", "--steps", "2", "--device", "cpu"]
    with pytest.raises(SystemExit) as done:
        main([*common, "--model", str(ckpt), "--output", str(out), "--class", "red circle moving right",
              "--class", "0"])  # fmt: skip
    assert done.value.code == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == [
        "grid.gif",
        "sample_000_class1.mp4",
        "sample_001_class0.mp4",
        "sample_002_class1.mp4",
        "samples.json",
    ]
    index = json.loads((out / "samples.json").read_text())
    assert [e["class"] for e in index] == [1, 0, 1]
    assert [index[0]["class_name"], index[2]["class_name"]] == ["red circle moving right"] * 2
    assert read_video(out / "sample_000_class1.mp4").shape == (17, 32, 32, 3)
    with pytest.raises(SystemExit, match="unknown class 'purple blob'"):
        main([*common, "--model", str(ckpt), "--output", str(tmp_path / "none"), "--class", "purple blob"])
    # A checkpoint from before models described themselves samples with the config it was trained with, to the
    # same videos.
    old = torch.load(ckpt, map_location="cpu", weights_only=True)
    del old["walt_model"]
    torch.save(old, tmp_path / "old.ckpt")
    legacy = [*common, "--model", str(tmp_path / "old.ckpt"), "--output", str(tmp_path / "old")]
    with pytest.raises(SystemExit, match="holds no model description"):
        main(legacy)
    with pytest.raises(SystemExit) as done:
        main([*legacy, "--config", str(config), "--class", "1", "--class", "0"])
    assert done.value.code == 0
    for entry in index:
        assert np.array_equal(read_video(tmp_path / "old" / entry["file"]), read_video(out / entry["file"]))


def test_a_failed_checkpoint_write_leaves_the_previous_file_intact(tmp_path):
    m = module()
    t = trainer(tmp_path, max_steps=1, enable_checkpointing=False)
    t.fit(m, data())
    path = tmp_path / "last.ckpt"
    t.save_checkpoint(path)
    before = path.read_bytes()

    class Unpicklable(Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
            checkpoint["broken"] = lambda: None  # torch.save cannot pickle this: the write fails midway

    t.callbacks.append(Unpicklable())
    with pytest.raises(Exception, match="pickle"):
        t.save_checkpoint(path)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]


def test_walt_sample_continues_a_video_and_extends_it(tmp_path, monkeypatch):
    """Frame prediction from a video file and autoregressive extension, with the K600 config's model."""
    monkeypatch.setattr(sys, "argv", ["walt"])
    config = _runnable_here(ROOT / "configs/base/k600_frame_prediction.yaml", tmp_path)
    WaltCLI(
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "1",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    clip = SyntheticVideos(num_samples=1, num_frames=9, resolution=32)[0]["video"]
    write_video(tmp_path / "context.mp4", to_uint8(clip).numpy(), fps=8)
    args = [
        "sample",
        "--model",
        str(tmp_path / "run/checkpoints/last.ckpt"),
        "--num-samples",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--context",
        str(tmp_path / "context.mp4"),
    ]
    out = tmp_path / "samples"
    with pytest.raises(SystemExit) as done:
        main([*args, "--output", str(out), "--context-frames", "5", "--extend", "1"])
    assert done.value.code == 0
    # 5 latent frames, then a segment that keeps 2 of them and adds 3: 8 latent frames = 29 pixel frames.
    assert read_video(out / "sample_000.mp4").shape == (29, 32, 32, 3)
    assert all(
        e["context_frames"] == 5 and e["extend"] == 1 for e in json.loads((out / "samples.json").read_text())
    )
    with pytest.raises(SystemExit, match="1 \\+ 4j"):
        main([*args, "--output", str(tmp_path / "bad"), "--context-frames", "4"])


def test_compile_compiles_backbone_and_ema_in_place_and_sampling_overrides_it(tmp_path):
    """``compile: true`` compiles in place (checkpoint keys unchanged); `walt sample` runs eager unless asked.
    Compilation is lazy, so nothing is compiled here."""
    from walt.sample import build_module

    config = yaml.safe_load((ROOT / "configs/moving_digits/base.yaml").read_text())
    assert config["model"]["init_args"]["compile"] is True
    config["model"]["init_args"]["ema_decay"] = 0.999  # the EMA copy is compiled too
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    compiled, _ = build_module(path)
    eager, _ = build_module(path, compile=False)
    for module in (compiled.backbone, compiled.ema.module):
        assert module._compiled_call_impl is not None
    for module in (eager.backbone, eager.ema.module):
        assert module._compiled_call_impl is None
    assert compiled.state_dict().keys() == eager.state_dict().keys()


def test_compile_under_fsdp_is_refused_before_training_with_the_fix():
    """Measured on 2 GPUs: a whole-model compiled backbone crashes at FSDP's first gathering. The module refuses
    the combination in `setup` (before any step) and names the setting to change; DDP keeps compile."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    backbone = WALT(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=(2, 4, 4))
    module = BaseDiffusionModule(backbone, compile=True)
    for strategy, refused in ((FSDPStrategy(), True), (DDPStrategy(), False)):
        module._trainer = SimpleNamespace(strategy=strategy)
        if refused:
            with pytest.raises(ValueError, match="compile to false"):
                module.setup("fit")
        else:
            module.setup("fit")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: module(label_dropout=3.0), r"label_dropout must be a probability in \[0, 1\], got 3.0"),
        (
            lambda: module(self_condition_prob=2),
            r"self_condition_prob must be a probability in \[0, 1\], got 2",
        ),
        (lambda: module(warmup_steps=-5), "warmup_steps must be an integer >= 0, got -5"),
        (lambda: module(sample_steps=0), "sample_steps must be an integer >= 1, got 0"),
        (lambda: backbone(in_channels=None), "in_channels must be an integer >= 1, got None"),
        (lambda: data(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (lambda: data(batch_size=-4), "batch_size must be an integer >= 1, got -4"),
    ],
)
def test_out_of_range_settings_fail_at_construction_naming_the_setting_and_its_range(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def _set(section: str, **values):
    def edit(config: dict) -> None:
        node = config
        for key in section.split("."):
            node = node[key]
        node.update(values)

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            _set("model.init_args.conditioner", label_dropout=3.0),
            "label_dropout must be a probability in [0, 1], got 3.0",
        ),
        (_set("model.init_args", warmup_steps=-5), "warmup_steps must be an integer >= 0, got -5"),
        (
            _set("model.init_args.backbone.init_args", in_channels=None),
            "in_channels must be an integer >= 1, got None",
        ),
        (_set("data.init_args", batch_size=0), "batch_size must be an integer >= 1, got 0"),
    ],
)
def test_walt_fit_reports_an_out_of_range_setting_in_one_line_before_training(
    tmp_path, monkeypatch, edit, message
):
    """jsonargparse wraps the constructor's error in one that prints the whole parsed config; walt fit shows the
    constructor's message alone, and nothing is trained or written."""
    write_tiny_latents(tmp_path)
    config = yaml.safe_load((ROOT / "configs/base/quickstart.yaml").read_text())
    path = cpu_sized_config(config, tmp_path, "base.yaml")
    edited = yaml.safe_load(path.read_text())
    edit(edited)
    path.write_text(yaml.safe_dump(edited))
    monkeypatch.setattr(sys, "argv", ["walt"])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path)])
    assert str(exit_info.value.code) == f"walt fit: {message}"
    assert not (tmp_path / "run").exists()
