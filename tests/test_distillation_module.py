"""Distillation rounds (DiffusionModule with a distillation objective and a Teacher) and the guidance input:
exact start from the teacher, one round learns, one pass per sampling step, and the config's rounds chained
through `walt fit` and sampled with `walt sample`."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from tests.conftest import cpu_sized_config, write_tiny_latents
from walt.cli import WaltCLI, main
from walt.conditioning import Conditioning
from walt.data import read_video
from walt.diffusion import GuidanceDistillation, ProgressiveDistillation
from walt.lightning import DiffusionModule, Teacher
from walt.lightning.distillation import load_teacher_weights, teacher_weights
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT

ROOT = Path(__file__).resolve().parents[1]
LATENT = (4, 2, 4, 4)


def backbone(**kwargs) -> WALT:
    args = dict(
        in_channels=4,
        depth=2,
        hidden_size=32,
        num_heads=2,
        input_size=LATENT[1:],
        num_classes=3,
        self_conditioning=True,
    )
    return WALT(**{**args, **kwargs})


def randomized(model: WALT, seed: int, std: float = 0.1) -> WALT:
    """A trained-looking model: every path, the zero-initialised ones too, does something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *LATENT, generator=g)
    t = torch.rand(batch, generator=g)
    cond = Conditioning(labels=torch.arange(batch) % 3, self_cond=torch.randn(batch, *LATENT, generator=g))
    return x, t, cond


def with_guidance(cond: Conditioning, w: float) -> Conditioning:
    return Conditioning(**{**vars(cond), "guidance": torch.full((cond.labels.shape[0],), w)})


@torch.no_grad()
def test_a_student_built_from_the_teacher_is_exactly_the_teacher_until_w_is_learned():
    torch.manual_seed(0)
    teacher = randomized(backbone(), seed=1)
    student = backbone(guidance_input=True).eval()
    load_teacher_weights(student, teacher.state_dict())
    x, t, cond = inputs()
    expected = teacher(x, t, cond)
    for w in (0.0, 2.5, 7.0):
        assert torch.equal(student(x, t, with_guidance(cond, w)), expected)
    torch.nn.init.normal_(student.guidance_embed.mlp[2].weight, std=0.1)  # as training makes it
    low, high = student(x, t, with_guidance(cond, 0.0)), student(x, t, with_guidance(cond, 3.0))
    assert (low - high).abs().max() > 1e-3
    assert torch.equal(student(x, t, with_guidance(cond, 3.0)), high)  # a function of w, nothing else


def test_the_guidance_input_is_required_exactly_when_built():
    x, t, cond = inputs()
    with pytest.raises(ValueError, match=r"guidance_input=True: cond\.guidance is required"):
        backbone(guidance_input=True)(x, t, cond)
    with pytest.raises(ValueError, match=r"cond\.guidance was given but the model ignores it"):
        backbone()(x, t, with_guidance(cond, 2.0))


def test_loading_a_teacher_that_does_not_fit_names_the_weights():
    student = backbone(guidance_input=True)
    with pytest.raises(ValueError, match=r"missing: blocks\.2\..*guidance_input: true"):
        bigger = backbone(depth=3)
        load_teacher_weights(bigger, backbone().state_dict())
    with pytest.raises(ValueError, match=r"unexpected: blocks\.2\."):
        load_teacher_weights(student, backbone(depth=3).state_dict())
    with pytest.raises(ValueError, match=r"shape: label_embed\.table\.weight \(6, 32\) -> \(4, 32\)"):
        load_teacher_weights(student, backbone(num_classes=5).state_dict())


def save_teacher(path: Path, model: WALT, ema: WALT | None = None) -> Path:
    """A diffusion-module checkpoint as Lightning writes it: backbone and (optionally) EMA weights."""
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        state.update({f"ema.module.{k}": v for k, v in ema.state_dict().items()})
    torch.save({"state_dict": state}, path)
    return path


def distillation(
    teacher_checkpoint: Path, stage: str = "progressive", guidance_range=(0.0, 4.0), **kwargs
) -> DiffusionModule:
    """A round's module: stage "guidance" or "progressive", a 2-step student."""
    torch.manual_seed(0)
    objective = GuidanceDistillation if stage == "guidance" else ProgressiveDistillation
    args = dict(
        backbone=backbone(guidance_input=True),
        objective=objective(student_steps=2, guidance_range=guidance_range),
        teacher=Teacher(str(teacher_checkpoint)),
        warmup_steps=1,
        ema_decay=None,
        num_log_samples=0,
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3),
    )
    return DiffusionModule(**{**args, **kwargs})


def test_the_teacher_is_the_checkpoints_ema_frozen_and_outside_checkpoint_and_optimizer(tmp_path):
    plain, ema = randomized(backbone(), seed=1), randomized(backbone(), seed=2)
    ckpt = save_teacher(tmp_path / "base.ckpt", plain, ema)
    m = distillation(ckpt, stage="guidance", ema_decay=0.9)
    m.setup("fit")
    x, t, cond = inputs()
    with torch.no_grad():
        assert torch.equal(m.teacher_model(x, t, with_guidance(cond, 1.0)), ema(x, t, cond))
        assert torch.equal(m.backbone.eval()(x, t, with_guidance(cond, 4.0)), ema(x, t, cond))
        assert torch.equal(m.ema.module(x, t, with_guidance(cond, 4.0)), ema(x, t, cond))
    assert not any(p.requires_grad for p in m.teacher_model.parameters()) and not m.teacher_model.training
    assert all(k.split(".")[0] in ("backbone", "ema", "student_initialized") for k in m.state_dict())
    optimized = {
        id(p) for group in m.configure_optimizers()["optimizer"].param_groups for p in group["params"]
    }
    assert optimized == {id(p) for p in m.backbone.parameters()}
    assert set(teacher_weights(ckpt)) == set(ema.state_dict())
    with pytest.raises(ValueError, match="run stage: guidance on it first"):
        distillation(ckpt, stage="progressive").setup("fit")
    distilled = save_teacher(tmp_path / "round1.ckpt", randomized(backbone(guidance_input=True), seed=3))
    with pytest.raises(ValueError, match="distill it further with stage: progressive"):
        distillation(distilled, stage="guidance").setup("fit")
    with pytest.raises(FileNotFoundError, match="teacher checkpoint not found"):
        distillation(tmp_path / "nothing.ckpt").setup("fit")


class Payload:
    """Unpickling this runs ``touch <path>``: a stand-in for malicious code in a file posing as a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_the_teacher_checkpoint_is_read_without_running_code_and_must_hold_a_backbone(tmp_path):
    marker = tmp_path / "payload_ran"
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    with pytest.raises(ValueError, match="not a readable walt checkpoint"):
        teacher_weights(tmp_path / "evil.ckpt")
    assert not marker.exists()
    torch.save({"state_dict": {"vae.encoder.weight": torch.zeros(2)}}, tmp_path / "tokenizer.ckpt")
    with pytest.raises(ValueError, match="not a tokenizer's"):
        teacher_weights(tmp_path / "tokenizer.ckpt")
    plain = randomized(backbone(), seed=1)  # no EMA (ema_decay: null): the trained weights, with a warning
    with pytest.warns(UserWarning, match="no EMA weights"):
        weights = teacher_weights(save_teacher(tmp_path / "plain.ckpt", plain))
    assert all(torch.equal(weights[k], v) for k, v in plain.state_dict().items())


def test_a_compiled_students_teacher_gets_its_own_compiled_forward(tmp_path):
    """The teacher (a deep copy of the student, which drops the compiled forward) is compiled too, with a
    forward of its own. Compilation is lazy, so this is fast."""
    teacher = save_teacher(tmp_path / "base.ckpt", randomized(backbone(), seed=1))
    m = distillation(teacher, stage="guidance", compile=True)
    student_forward = m.backbone._compiled_call_impl
    assert student_forward is not None
    assert m.teacher_model._compiled_call_impl is not None
    assert m.teacher_model._compiled_call_impl is not student_forward


def test_the_guidance_stage_target_is_the_guided_teacher_seen_by_a_student_that_starts_as_it(tmp_path):
    ckpt = save_teacher(tmp_path / "base.ckpt", randomized(backbone(), seed=1))
    batch = next(iter(DataLoader(Latents(6, seed=0), batch_size=6)))
    loss = {}
    for w in (1.0, 3.0):  # w = 1 is the conditional model, which the fresh student is exactly
        m = distillation(ckpt, stage="guidance", guidance_range=(w, w))
        m.setup("fit")
        loss[w] = m._loss(batch, train=False, generator=torch.Generator().manual_seed(0)).item()
    assert loss[1.0] < 1e-10 and loss[3.0] > 1e-4, loss


class Latents(torch.utils.data.Dataset):
    """Smooth random latents with labels: a data set to distill on."""

    def __init__(self, num: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        coarse = torch.randn(num, LATENT[0], 1, 2, 2, generator=g)
        self.latents = (
            coarse.repeat_interleave(2, -1).repeat_interleave(2, -2).expand(-1, -1, LATENT[1], -1, -1)
        )
        self.labels = torch.randint(0, 3, (num,), generator=g)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> dict:
        return {"latent": self.latents[i].contiguous(), "label": self.labels[i]}


def test_one_progressive_round_lowers_the_students_error_against_the_two_step_target(tmp_path):
    teacher = randomized(backbone(guidance_input=True), seed=1, std=0.05)
    m = distillation(save_teacher(tmp_path / "teacher.ckpt", teacher))
    held_out = next(iter(DataLoader(Latents(16, seed=99), batch_size=16)))
    error = lambda: m._loss(held_out, train=False, generator=torch.Generator().manual_seed(0)).item()
    m.setup("fit")  # the student starts as the teacher: its one step is not the teacher's two
    before = error()
    L.Trainer(
        accelerator="cpu",
        max_steps=40,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
    ).fit(m, DataLoader(Latents(160, seed=0), batch_size=8, shuffle=True))
    assert bool(m.student_initialized)
    after = error()
    assert after < 0.25 * before, (before, after)


class Spy(torch.nn.Module):
    """Wraps the teacher and records what each call saw and returned."""

    def __init__(self, inner: WALT) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        v = self.inner(x, t, cond)
        self.calls.append((x, t, cond.self_cond, v))
        return v


def spied(m: DiffusionModule) -> Spy:
    m.setup("fit")
    spy = Spy(m.teacher_model)
    m.teacher._model[:] = [spy]
    return spy


def test_progressive_teacher_steps_chain_the_self_conditioning_estimate(tmp_path):
    """Call 1: the estimate (no self_cond); call 2, the first DDIM step: that estimate (as the student gets);
    call 3, the second step: the x0 of call 2's prediction."""
    m = distillation(save_teacher(tmp_path / "t.ckpt", randomized(backbone(guidance_input=True), seed=1)))
    m.objective.self_condition_prob = 1.0
    spy = spied(m)
    m._loss({"latent": torch.randn(3, *LATENT), "label": torch.arange(3)}, train=True)
    (_, _, first, v1), (x2, t2, second, v2), (_, t3, third, _) = spy.calls
    assert first is None
    alpha, sigma = (a.reshape(-1, 1, 1, 1, 1) for a in m.schedule.alpha_sigma(t2))
    torch.testing.assert_close(second, alpha * x2 - sigma * v1)  # the estimate from call 1, at the same x_t
    torch.testing.assert_close(third, alpha * x2 - sigma * v2)  # the x0 of the first step
    assert bool((t3 < t2).all())


def test_guidance_stage_self_conditioning_estimate_is_the_guided_teachers(tmp_path):
    m = distillation(save_teacher(tmp_path / "t.ckpt", randomized(backbone(), seed=1)), stage="guidance")
    m.objective.self_condition_prob = 1.0
    spy = spied(m)
    m._loss({"latent": torch.randn(3, *LATENT), "label": torch.arange(3)}, train=True)
    (x1, _, first, _), (_, _, second, _) = spy.calls
    assert first is None and x1.shape[0] == 6  # the estimate pass is the guided pair (conditional + null)
    assert second is not None and second.shape[0] == 6


def test_a_guidance_input_backbone_samples_in_one_pass_per_step(tmp_path):
    calls: list[tuple[int, list[float]]] = []

    def count(module, args, output) -> None:
        cond = args[2]
        calls.append((args[0].shape[0], None if cond.guidance is None else cond.guidance.tolist()))

    tokenizer = CausalVAE(**presets["tiny"])  # the pipeline's; output="latent" decodes nothing
    m = distillation(tmp_path / "not-needed-to-sample.ckpt", ema_decay=0.9, tokenizer=tokenizer)
    randomized(m.ema.module, seed=1)
    m.ema.module.register_forward_hook(count)
    kwargs = dict(labels=[0, 2, 1], guidance=2.0, steps=4, output="latent", progress=False)
    z = m.pipeline().generate(**kwargs)
    assert z.shape == (3, *LATENT) and calls == [(3, [2.0, 2.0, 2.0])] * 4
    calls.clear()
    plain = DiffusionModule(backbone(), tokenizer=tokenizer, ema_decay=0.9, num_log_samples=0)
    plain.ema.module.register_forward_hook(count)
    plain.pipeline().generate(**kwargs)
    assert calls == [(6, None)] * 4  # classifier-free guidance: conditional and null passes batched


def _fit(config: Path, *overrides: str) -> Path:
    """`walt fit` of ``config`` for 2 steps; returns the checkpoint the run saved."""
    fixed = [
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]
    cli = WaltCLI(args=[*fixed, *overrides])
    return Path(cli.trainer.checkpoint_callback.last_model_path)


def test_rounds_chain_through_walt_fit_and_walt_sample_uses_the_distilled_student(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["walt"])
    write_tiny_latents(tmp_path)
    base = cpu_sized_config(
        yaml.safe_load((ROOT / "configs/moving_digits/base.yaml").read_text()), tmp_path, "b.yaml"
    )
    distill_config = yaml.safe_load((ROOT / "configs/moving_digits/distill.yaml").read_text())
    teacher = _fit(base, "--trainer.default_root_dir", str(tmp_path / "base"))
    distill_config["model"]["init_args"]["num_log_samples"] = (
        1  # the validation videos run through sampling too
    )
    distill = cpu_sized_config(distill_config, tmp_path, "d.yaml")
    round1 = _fit(
        distill,
        "--model.init_args.teacher.init_args.checkpoint",
        str(teacher),
        "--model.init_args.objective.init_args.student_steps",
        "8",
        "--trainer.val_check_interval",
        "2",
        "--trainer.default_root_dir",
        str(tmp_path / "guided8"),
    )
    round2 = _fit(
        distill,
        "--model.init_args.teacher.init_args.checkpoint",
        str(round1),
        "--model.init_args.objective",
        "walt.diffusion.ProgressiveDistillation",
        "--model.init_args.objective.init_args.student_steps",
        "4",
        "--trainer.default_root_dir",
        str(tmp_path / "steps4"),
    )
    assert round2 == tmp_path / "steps4/checkpoints/last.ckpt"  # the stable path a cascade or export names
    keys = torch.load(round2, weights_only=True)["state_dict"]
    assert {k.split(".")[0] for k in keys} == {"backbone", "ema", "tokenizer", "student_initialized"}
    out = tmp_path / "samples"
    args = ["sample", "--model", str(round2), "--output", str(out)]  # the checkpoint describes the student
    with pytest.raises(SystemExit) as done:
        main([*args, "--num-samples", "2", "--guidance", "2", "--device", "cpu"])
    assert done.value.code == 0
    index = json.loads((out / "samples.json").read_text())
    assert [e["class"] for e in index] == [0, 1]
    assert all(
        e["steps"] == 4 and e["guidance"] == 2.0 for e in index
    )  # the student's own 4 steps by default
    assert read_video(out / "sample_000_class0.mp4").shape == (17, 32, 32, 3)


def test_the_distill_config_is_the_base_models_architecture_plus_the_guidance_input():
    base, distill = (
        yaml.safe_load((ROOT / f"configs/moving_digits/{n}.yaml").read_text())["model"]["init_args"]
        for n in ("base", "distill")
    )
    assert distill["backbone"]["init_args"] == {**base["backbone"]["init_args"], "guidance_input": True}
    assert (
        distill["tokenizer"] == base["tokenizer"]
        and distill["tokenizer_weights"] == base["tokenizer_weights"]
    )
