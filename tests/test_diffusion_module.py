"""DiffusionModule: the base model, super-resolution stages and distillation rounds as configurations of one
module; the earlier flat-argument classes, their configs and checkpoints; super-resolution with text and
context frames, through the cascade; and a super-resolution stage that follows its prompt."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from tests.conftest import train_in_a_loop
from walt.conditioning import (
    Conditioner,
    Conditioning,
    LowresConditioning,
    MiniLMTextEncoder,
    downsample_video,
)
from walt.data import SyntheticVideos, VideoDataModule
from walt.data.synthetic import read_colour_and_motion
from walt.diffusion import GuidanceDistillation, ProgressiveDistillation, VPrediction
from walt.lightning import (
    BaseDiffusionModule,
    DiffusionModule,
    DistillationModule,
    SuperResolutionModule,
    Teacher,
)
from walt.pipeline import CascadePipeline, Pipeline
from walt.sample import build_module
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT

ROOT = Path(__file__).resolve().parents[1]
FLAT_CONFIGS = (
    Path(__file__).parent / "fixtures" / "flat_configs"
)  # configs/ as they were before DiffusionModule
TINY_VAE = {**presets["tiny"], "variational": False}
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


def walt_backbone(seed: int = 0, **kwargs) -> WALT:
    """A tiny WALT whose every path (the zero-initialised ones too) does something, as in a trained model."""
    args = dict(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=(5, 4, 4))
    model = WALT(**{**args, **kwargs})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def clips(n: int, frames: int = 17, size: int = 32) -> dict:
    videos = SyntheticVideos(
        num_samples=n, num_frames=frames, resolution=size, shapes=["circle"], colors=COLOURS
    )
    items = [videos[i] for i in range(n)]
    return {
        "video": torch.stack([it["video"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
        "caption": [it["caption"] for it in items],
    }


def seeded_loss(module: DiffusionModule, batch: dict) -> torch.Tensor:
    return module._loss(batch, train=True, generator=torch.Generator().manual_seed(0))


def save_teacher(path: Path, model: WALT) -> Path:
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


# ---- one module, three configurations; the earlier classes are the same configurations -----------------------


def test_the_earlier_classes_build_the_same_module_as_its_parts():
    tokenizer = CausalVAE(**TINY_VAE)
    shared = dict(tokenizer=tokenizer, ema_decay=None, num_log_samples=0)
    base = walt_backbone(num_classes=8, context_frames=True, self_conditioning=True)
    flat = BaseDiffusionModule(copy.deepcopy(base), label_dropout=0.3, self_condition_prob=0.5,
                               frame_prediction_prob=0.5, max_context_frames=1, **shared)  # fmt: skip
    parts = DiffusionModule(
        copy.deepcopy(base), objective=VPrediction(self_condition_prob=0.5),
        conditioner=Conditioner(label_dropout=0.3, frame_prediction_prob=0.5, max_context_frames=1), **shared,
    )  # fmt: skip
    batch = clips(4)
    assert torch.equal(seeded_loss(flat, batch), seeded_loss(parts, batch))
    assert flat.conditioner == parts.conditioner and flat.sample_steps == parts.sample_steps == 50

    sr = walt_backbone(patch_size=2, lowres=True, self_conditioning=True)
    flat = SuperResolutionModule(copy.deepcopy(sr), max_aug_level=0.7, sample_aug_level=0.2, **shared)
    lowres = LowresConditioning(spatial_factor=2, aug_level=0.2, max_aug_level=0.7)
    parts = DiffusionModule(copy.deepcopy(sr), conditioner=Conditioner(lowres=lowres), **shared)
    assert torch.equal(seeded_loss(flat, batch), seeded_loss(parts, batch))
    assert flat.pipeline().super_resolution == parts.pipeline().super_resolution == lowres


def test_a_distillation_round_is_an_objective_and_a_teacher(tmp_path):
    teacher = save_teacher(
        tmp_path / "base.ckpt", walt_backbone(seed=1, num_classes=8, self_conditioning=True)
    )
    student = walt_backbone(num_classes=8, self_conditioning=True, guidance_input=True)
    shared = dict(ema_decay=None, num_log_samples=0)
    flat = DistillationModule(copy.deepcopy(student), str(teacher), stage="guidance", student_steps=4,
                              guidance_range=(1.0, 3.0), **shared)  # fmt: skip
    parts = DiffusionModule(
        copy.deepcopy(student), objective=GuidanceDistillation(student_steps=4, guidance_range=(1.0, 3.0)),
        teacher=Teacher(str(teacher)), **shared,
    )  # fmt: skip
    for m in (flat, parts):
        m.setup("fit")  # the student starts as the teacher
        assert bool(m.student_initialized) and m.sample_steps == 4
    batch = {"latent": torch.randn(3, 4, 5, 4, 4), "label": torch.tensor([0, 1, 2])}
    assert torch.equal(seeded_loss(flat, batch), seeded_loss(parts, batch))
    # The earlier class kept its own defaults; DiffusionModule has one of each (README: "One module").
    assert (flat.warmup_steps, parts.warmup_steps) == (100, 1000)
    with pytest.raises(ValueError, match="learns from a teacher"):
        DiffusionModule(copy.deepcopy(student), objective=ProgressiveDistillation())
    with pytest.raises(ValueError, match="learns from none"):
        DiffusionModule(copy.deepcopy(student), teacher=Teacher(str(teacher)))


def _shrunk(config: Path, tmp_path: Path, teacher: Path) -> Path:
    """A config at CPU size: 2-layer backbone, the tiny tokenizer, no compilation, the teacher given."""
    content = yaml.safe_load(config.read_text())
    model = content["model"]["init_args"]
    model["backbone"]["init_args"].update(
        in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=[5, 4, 4]
    )
    model.update(tokenizer={"class_path": "walt.tokenizer.CausalVAE", "init_args": TINY_VAE}, compile=False)
    if "teacher_checkpoint" in model:
        model["teacher_checkpoint"] = str(teacher)
    if "teacher" in model:
        model["teacher"]["init_args"]["checkpoint"] = str(teacher)
    text = model.get("text_encoder") or (model.get("conditioner") or {}).get("text_encoder")
    if text is not None:
        text["init_args"] = {}  # no caption cache
    path = tmp_path / f"{config.parent.name}_{config.name}"
    path.write_text(yaml.safe_dump(content))
    return path


@pytest.mark.parametrize(
    ("flat", "current"),
    [
        ("moving_digits_base.yaml", "moving_digits/base.yaml"),
        ("sr_tiny.yaml", "sr/tiny.yaml"),
        ("moving_digits_distill.yaml", "moving_digits/distill.yaml"),
        ("text_quickstart.yaml", "text/quickstart.yaml"),
    ],
)
def test_configs_with_the_earlier_class_paths_load_and_train_as_the_moved_ones(
    flat, current, tmp_path, monkeypatch
):
    """A config as it was written before DiffusionModule (tests/fixtures/flat_configs) builds its earlier class,
    whose loss is the moved config's to the bit, from the same weights and draws."""
    monkeypatch.setattr(sys, "argv", ["walt"])
    guided = "distill" in flat
    teacher = save_teacher(
        tmp_path / "teacher.ckpt", walt_backbone(seed=1, num_classes=10, self_conditioning=True)
    )
    earlier, _ = build_module(_shrunk(FLAT_CONFIGS / flat, tmp_path, teacher))
    moved, _ = build_module(_shrunk(ROOT / "configs" / current, tmp_path, teacher))
    assert type(earlier).__name__ in ("BaseDiffusionModule", "SuperResolutionModule", "DistillationModule")
    assert isinstance(earlier, DiffusionModule) and type(moved) is DiffusionModule
    keys = moved.state_dict().keys()  # base.yaml has dropped its EMA since: the rest must match
    moved.load_state_dict({k: v for k, v in earlier.state_dict().items() if k in keys})
    for m in (earlier, moved):
        if guided:
            m.setup("fit")
    if "sr" in flat:
        batch = clips(2, size=32)  # the SR configs' 64x64 target at half size: 5 x 4 x 4 latents, patch 2
    else:
        batch = {"latent": torch.randn(2, 4, 5, 4, 4), "label": torch.tensor([1, 3]), "caption": ["a", "b"]}
    assert torch.equal(seeded_loss(earlier, batch), seeded_loss(moved, batch))
    assert earlier.sample_steps == moved.sample_steps and earlier.warmup_steps == moved.warmup_steps


# ---- checkpoints written before DiffusionModule ----------------------------------------------------------------


def test_checkpoints_of_the_earlier_modules_load(tmp_path):
    """An SR checkpoint whose description predates LowresConditioning's max_aug_level (the one thing earlier
    descriptions lack) loads through every path: DiffusionModule, its earlier class, the pipeline; a distilled
    student (which carries student_initialized) loads as a plain model too."""
    torch.manual_seed(0)
    sr = SuperResolutionModule(walt_backbone(patch_size=2, lowres=True), CausalVAE(**TINY_VAE), ema_decay=0.9,
                               sample_aug_level=0.2)  # fmt: skip
    description = sr.model_description()
    del description["super_resolution"]["max_aug_level"]
    path = tmp_path / "sr.ckpt"
    torch.save({"state_dict": sr.state_dict(), "walt_model": description}, path)
    for cls in (DiffusionModule, SuperResolutionModule):
        loaded = cls.load_from_checkpoint(path)
        assert loaded.conditioner.lowres == LowresConditioning(aug_level=0.2)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), sr.state_dict().values()))
    pipe = Pipeline.from_pretrained(path)
    assert pipe.super_resolution.aug_level == 0.2 and torch.equal(
        pipe.backbone.state_dict()["final_layer.unembed.proj.weight"],
        sr.ema.module.state_dict()["final_layer.unembed.proj.weight"],
    )

    teacher = save_teacher(tmp_path / "base.ckpt", walt_backbone(seed=1, num_classes=8))
    round1 = DistillationModule(walt_backbone(num_classes=8, guidance_input=True), str(teacher),
                                stage="guidance", tokenizer=CausalVAE(**TINY_VAE))  # fmt: skip
    path = tmp_path / "round1.ckpt"
    torch.save({"state_dict": round1.state_dict(), "walt_model": round1.model_description()}, path)
    plain = DiffusionModule.load_from_checkpoint(path)
    assert plain.teacher is None and plain.sample_steps == 8
    again = DiffusionModule.load_from_checkpoint(
        path, objective=ProgressiveDistillation(), teacher=Teacher(str(path))
    )
    assert "student_initialized" in again.state_dict()


# ---- super-resolution with text and context frames -------------------------------------------------------------


def text_sr_module(minilm, **conditioner) -> DiffusionModule:
    backbone = walt_backbone(
        patch_size=2, lowres=True, text_dim=384, context_frames=True, self_conditioning=True
    )
    settings = dict(text_encoder=minilm, text_dropout=0.0, lowres=LowresConditioning(), **conditioner)
    return DiffusionModule(backbone, conditioner=Conditioner(**settings), tokenizer=CausalVAE(**TINY_VAE),
                           ema_decay=None, num_log_samples=2, sample_steps=2)  # fmt: skip


def test_a_super_resolution_stage_takes_text_and_context_frames(minilm):
    m = text_sr_module(minilm, frame_prediction_prob=1.0, max_context_frames=1)
    batch = clips(2)
    z = m.latents(batch)  # (2, 4, 5, 4, 4)
    cond = m.conditioner(batch, z, train=True, generator=torch.Generator().manual_seed(0))
    tokens, mask = minilm.encode(batch["caption"])
    assert torch.equal(cond.text, tokens) and torch.equal(cond.text_mask, mask)
    assert cond.lowres.shape == z.shape and cond.aug_level.shape == (2,)
    assert cond.context_mask[:, 0, :, 0, 0].tolist() == [[1, 0, 0, 0, 0]] * 2 and torch.equal(cond.context, z)
    loss = m._loss(batch, train=True)
    loss.backward()
    cross = [p.grad for n, p in m.backbone.named_parameters() if "cross_attn" in n]
    assert cross and all(g is not None and g.abs().sum() > 0 for g in cross)  # the text reaches the loss

    pipe = m.pipeline()
    low = downsample_video(batch["video"], 2, 1)  # (2, 3, 17, 16, 16)
    kwargs = dict(
        lowres=low, seeds=[0, 1], output="latent", progress=False, context=batch["video"], context_frames=1
    )
    a = pipe.generate(prompts=batch["caption"], **kwargs)
    b = pipe.generate(prompts=["a green circle moving left"] * 2, **kwargs)
    assert a.shape == (2, 4, 5, 4, 4) and not torch.allclose(a[:, :, 1:], b[:, :, 1:], atol=1e-4)
    given = m.tokenizer.encode(batch["video"][:, :, :1])  # the given frame, at the stage's own resolution
    assert torch.equal(a[:, :, :1], given) and torch.equal(b[:, :, :1], given)


def test_the_cascade_passes_prompts_and_given_frames_to_every_stage_that_takes_them(minilm):
    torch.manual_seed(0)
    base = walt_backbone(seed=2, input_size=(5, 2, 2), text_dim=384, context_frames=True)
    base_pipe = Pipeline(base, CausalVAE(**TINY_VAE), text_encoder=minilm, sample_steps=2)
    text_sr = text_sr_module(minilm).pipeline()
    plain_sr = DiffusionModule(walt_backbone(seed=3, patch_size=2, lowres=True, input_size=(5, 8, 8)),
                               conditioner=Conditioner(lowres=LowresConditioning()), tokenizer=CausalVAE(**TINY_VAE),
                               sample_steps=2).pipeline()  # fmt: skip
    seen: dict[str, list[Conditioning]] = {"sr": [], "plain": []}
    text_sr.backbone.register_forward_hook(lambda mod, args, out: seen["sr"].append(args[2]))
    plain_sr.backbone.register_forward_hook(lambda mod, args, out: seen["plain"].append(args[2]))
    prompts = ["a red circle moving left", "a blue circle moving right"]
    context = clips(2, size=16)["video"]
    videos = CascadePipeline([base_pipe, text_sr, plain_sr]).generate(
        prompts=prompts, seeds=[0, 1], context=context, context_frames=1, output="float", progress=False
    )
    assert videos.shape == (2, 3, 17, 64, 64)
    tokens, _ = minilm.encode(prompts)
    cond = seen["sr"][0]  # the text SR stage: the prompts, and the given first frame at its own resolution
    assert (
        torch.equal(cond.text[:2, : tokens.shape[1]], tokens)
        and cond.context_mask[:2, 0, :, 0, 0].tolist() == [[1, 0, 0, 0, 0]] * 2
    )
    assert (
        seen["plain"][0].text is None and seen["plain"][0].context is None
    )  # a stage takes what it was built for


def test_validation_videos_of_a_text_super_resolution_stage(minilm, tmp_path):
    """Low-res inputs above the outputs, generated from the first validation batch's clips and captions."""
    m = text_sr_module(minilm)
    videos = SyntheticVideos(num_samples=4, num_frames=17, resolution=32, shapes=["circle"])
    data = VideoDataModule(videos, val=videos, batch_size=2, num_workers=0, seed=0)
    L.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=1, val_check_interval=1, num_sanity_val_steps=0,
              logger=TensorBoardLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(m, data)  # fmt: skip
    assert m._log_batch["captions"] == [videos[0]["caption"], videos[1]["caption"]]
    assert list(tmp_path.rglob("events.out.tfevents.*"))


# ---- a super-resolution stage follows its prompt -----------------------------------------------------------------
# As in tests/test_text_to_video.py, the clip is its own latent (a tokenizer that is the identity) so that a tiny
# model learns in seconds: 5 x 16 x 16 synthetic circles, their 8 x 8 low-res versions as the input. Training
# augments the low-res input up to level 1, where it is pure noise: there the stage must take colour from the
# prompt, and that is what is measured, reading the outputs back with the demo's colour reader.


class PixelsAsLatents(torch.nn.Module):
    """A stand-in tokenizer whose latent is the clip itself."""

    temporal_factor = spatial_factor = 1

    def encode(self, video: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        return video

    def decode(self, z: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        return z


def train_text_sr(encoder: MiniLMTextEncoder, steps: int, batch_size: int = 32) -> DiffusionModule:
    data = clips(512, frames=5, size=16)
    torch.manual_seed(0)
    backbone = WALT(in_channels=3, depth=2, hidden_size=96, num_heads=4, patch_size=4, input_size=(5, 16, 16),
                    text_dim=384, lowres=True)  # fmt: skip
    conditioner = Conditioner(text_encoder=encoder, lowres=LowresConditioning(max_aug_level=1.0))
    module = DiffusionModule(backbone, objective=VPrediction(self_condition_prob=0.0), conditioner=conditioner,
                             tokenizer=PixelsAsLatents(), optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3),
                             warmup_steps=20, ema_decay=None)  # fmt: skip
    batch = lambda rows: {"video": data["video"][rows], "caption": [data["caption"][i] for i in rows]}
    train_in_a_loop(module, batch, len(data["video"]), steps, batch_size)
    return module.eval()


def test_a_super_resolution_stage_follows_its_prompt(minilm):
    """The outputs show their prompt's colour far above chance (4 of 16), whether the low-res input is noised away
    (augmentation level 1) or shows another colour (level 0): the prompt reaches the super-resolution stage.

    Measured after 200 steps (guidance 3): 14 and 13 of 16. This toy leans on the prompt for colour rather
    than on its blurred input (trained for 250 steps, its outputs at level 0 showed the input's colour only
    where that was also the prompt's, at guidance 1 and 3 alike): in training the two always agree, and the
    caption is the easier of the two to read."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs faster on one thread, the more so on a shared machine
    try:
        module = train_text_sr(minilm, steps=200)
    finally:
        torch.set_num_threads(threads)
    asked = [COLOURS[i % 4] for i in range(16)]
    prompts = [f"a {c} circle moving {'left' if i < 8 else 'right'}" for i, c in enumerate(asked)]
    low = downsample_video(clips(16, frames=5, size=16)["video"], 2, 1)  # (16, 3, 5, 8, 8), 4 of each colour
    pipe = module.pipeline()
    kwargs = dict(prompts=prompts, lowres=low, guidance=3.0, steps=10, output="latent", progress=False)
    for level in (1.0, 0.0):
        videos = pipe.generate(aug_level=level, **kwargs)  # (16, 3, 5, 16, 16)
        follows = sum(read_colour_and_motion(v, COLOURS)[0] == c for v, c in zip(videos, asked))
        print(
            f"SR outputs in their prompt's colour, low-res input at augmentation level {level}: {follows} / 16"
        )
        assert follows >= 10  # P(>= 10 of 16 | chance 1/4) < 0.001
