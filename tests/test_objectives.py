"""The training objectives and the conditioner without Lightning: walt.diffusion.objectives,
walt.diffusion.self_conditioning, walt.conditioning.frames and walt.conditioning.Conditioner."""

from __future__ import annotations

import copy

import torch

from walt.conditioning import Conditioner, Conditioning, context_mask, draw_known_frames
from walt.diffusion import (
    GuidanceDistillation,
    ProgressiveDistillation,
    VPrediction,
    ZeroTerminalSNRLinearSchedule,
    expand_time,
    noisy,
    velocity,
)
from walt.transformer import WALT

SCHEDULE = ZeroTerminalSNRLinearSchedule()
LATENT = (4, 2, 4, 4)


def tiny(seed: int = 0, **kwargs) -> WALT:
    """A tiny WALT whose every path (the zero-initialised ones too) does something."""
    args = dict(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=LATENT[1:], num_classes=3)
    model = WALT(**{**args, **kwargs})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


class Recorder(torch.nn.Module):
    """A real network, recording what each call saw and returned."""

    def __init__(self, inner: WALT) -> None:
        super().__init__()
        self.inner = inner
        self.self_conditioning = inner.self_conditioning
        self.calls: list[tuple[torch.Tensor, torch.Tensor, Conditioning, torch.Tensor, bool]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        v = self.inner(x, t, cond)
        self.calls.append((x, t, cond, v, torch.is_grad_enabled()))
        return v


def reference_draws(z: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's first two draws, made independently: t (B,), then the noise."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(z.shape[0], generator=g)
    return t, torch.randn(z.shape, generator=g)


def exact_v(z: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    alpha, sigma = (expand_time(a, z) for a in SCHEDULE.alpha_sigma(t))
    return velocity(z, noise, alpha, sigma)


def test_a_net_that_predicts_the_exact_v_has_zero_loss_and_sees_x_t_at_t():
    z = torch.randn(3, *LATENT)
    t_ref, noise = reference_draws(z, seed=1)
    seen = []

    def oracle(x_t, t, cond):
        seen.append((x_t, t))
        return exact_v(z, t_ref, noise)

    loss = VPrediction(SCHEDULE)(oracle, z, Conditioning(), torch.Generator().manual_seed(1))
    assert loss.item() == 0.0
    ((x_t, t),) = seen
    alpha, sigma = (expand_time(a, z) for a in SCHEDULE.alpha_sigma(t_ref))
    assert torch.equal(t, t_ref) and torch.equal(x_t, noisy(z, noise, alpha, sigma))


def test_given_context_frames_are_left_out_of_the_loss():
    z = torch.randn(2, *LATENT)
    t_ref, noise = reference_draws(z, seed=2)
    mask = context_mask(torch.tensor([1, 0]), z.shape)  # sample 0: frame 0 given; sample 1: nothing
    cond = Conditioning(context=z, context_mask=mask)
    off_given = exact_v(z, t_ref, noise) + 5.0 * mask  # wrong only where frames are given
    off_rest = exact_v(z, t_ref, noise) + 2.0 * (1 - mask)  # wrong by 2 on every generated element
    loss = VPrediction(SCHEDULE)
    assert loss(lambda x, t, c: off_given, z, cond, torch.Generator().manual_seed(2)).item() == 0.0
    assert loss(lambda x, t, c: off_rest, z, cond, torch.Generator().manual_seed(2)).item() == 4.0


def test_context_mask_marks_the_first_known_frames_of_each_sample():
    mask = context_mask(torch.tensor([0, 1, 3]), (3, 4, 3, 2, 2))
    assert mask.shape == (3, 1, 3, 2, 2)
    assert mask[:, 0, :, 0, 0].tolist() == [[0, 0, 0], [1, 0, 0], [1, 1, 1]]
    assert bool((mask == mask[..., :1, :1]).all())  # constant over space


def test_known_frame_draws_leave_a_frame_to_generate():
    known = draw_known_frames(1000, 3, 0.5, 5, generator=torch.Generator().manual_seed(0))
    assert set(known.tolist()) == {0, 1, 2}  # at most T - 1 = 2 although max_known is 5
    assert 400 < int((known == 0).sum()) < 600
    assert not draw_known_frames(8, 1, 1.0, 2).any()  # one frame: nothing can be given


def test_without_self_conditioning_the_net_is_called_once_without_an_estimate():
    net = Recorder(tiny(self_conditioning=True))
    cond = Conditioning(labels=torch.tensor([0, 1, 2]))
    VPrediction(SCHEDULE, self_condition_prob=0.0)(net, torch.randn(3, *LATENT), cond, torch.Generator())
    ((_, _, seen, _, _),) = net.calls
    assert seen.self_cond is None


def test_self_conditioning_gives_the_nets_own_x0_estimate_without_gradient():
    net = Recorder(tiny(self_conditioning=True))
    cond = Conditioning(labels=torch.tensor([0, 1, 2]))
    loss = VPrediction(SCHEDULE, self_condition_prob=1.0)(
        net, torch.randn(3, *LATENT), cond, torch.Generator().manual_seed(3)
    )
    (x1, t1, c1, v1, grad1), (x2, t2, c2, _, grad2) = net.calls
    assert c1.self_cond is None and not grad1 and grad2 and loss.requires_grad
    assert torch.equal(x1, x2) and torch.equal(t1, t2)
    alpha, sigma = (expand_time(a, x1) for a in SCHEDULE.alpha_sigma(t1))
    torch.testing.assert_close(c2.self_cond, alpha * x1 - sigma * v1)
    assert cond.self_cond is None  # the caller's conditioning is left as it was


def test_self_conditioning_keeps_the_estimate_for_a_random_fraction_of_samples():
    net = Recorder(tiny(self_conditioning=True, num_classes=None))
    VPrediction(SCHEDULE, self_condition_prob=0.5)(
        net, torch.randn(64, *LATENT), Conditioning(), torch.Generator().manual_seed(0)
    )
    estimate = net.calls[1][2].self_cond  # (64, C, T, H, W)
    zero = (estimate.flatten(1) == 0).all(1)
    assert 16 < int(zero.sum()) < 48 and not bool((estimate[~zero] == 0).all())


def test_packed_images_get_a_time_per_frame_and_videos_one_per_sample():
    z = torch.randn(2, *LATENT)
    net = Recorder(tiny(num_classes=None))
    cond = Conditioning(is_image=torch.tensor([True, False]))
    VPrediction(SCHEDULE)(net, z, cond, torch.Generator().manual_seed(4))
    ((x_t, t, _, _, _),) = net.calls
    g = torch.Generator().manual_seed(4)
    t_sample = torch.rand(2, generator=g)
    noise = torch.randn(z.shape, generator=g)
    t_frame = torch.rand(2, LATENT[1], generator=g)
    assert t.shape == (2, LATENT[1])
    assert torch.equal(t[0], t_frame[0]) and bool((t[1] == t_sample[1]).all())
    alpha, sigma = (expand_time(a, z) for a in SCHEDULE.alpha_sigma(t))  # (B, 1, T, 1, 1)
    assert torch.equal(x_t, noisy(z, noise, alpha, sigma))


def test_the_conditioner_builds_its_signals_lazily_after_the_noise():
    """A conditioning function is called with the objective's generator after t and the noise are drawn."""
    z = torch.randn(4, *LATENT)
    net = Recorder(tiny(context_frames=True))
    conditioner = Conditioner(label_dropout=1.0, frame_prediction_prob=1.0, max_context_frames=1).for_model(
        net.inner
    )
    batch = {"label": torch.tensor([0, 1, 2, 0])}
    VPrediction(SCHEDULE)(net, z, lambda g: conditioner(batch, z, True, g), torch.Generator().manual_seed(5))
    ((_, _, cond, _, _),) = net.calls
    assert cond.labels.tolist() == [-1] * 4  # all dropped to the null label
    assert cond.context_mask[:, 0, :, 0, 0].tolist() == [[1, 0]] * 4 and torch.equal(cond.context, z)
    kept = conditioner(batch, z, False, None)  # no dropout outside training
    assert kept.labels.tolist() == [0, 1, 2, 0]


def test_guidance_distillation_at_scale_one_of_a_student_equal_to_its_teacher_is_zero():
    """At w = 1 the guided teacher is the conditional one, which a guidance-input student starts as."""
    teacher = tiny(seed=1, self_conditioning=True, guidance_input=True)
    with torch.no_grad():  # as a new guidance embedding: the teacher's own function whatever w
        for p in teacher.guidance_embed.parameters():
            p.zero_()
    student = copy.deepcopy(teacher)
    objective = GuidanceDistillation(lambda: teacher, SCHEDULE, 4, (1.0, 1.0), self_condition_prob=1.0)
    cond = Conditioning(labels=torch.tensor([0, 1, 2]))
    with torch.no_grad():
        loss = objective(student, torch.randn(3, *LATENT), cond, torch.Generator().manual_seed(6))
    assert loss.item() < 1e-10


def test_progressive_target_of_an_exact_denoiser_is_its_own_v():
    """A teacher that knows x0 exactly lands on the same line in one DDIM step as in two, so a student equal to
    it matches the two-step target at every grid time."""
    x0 = torch.randn(5, *LATENT)

    def exact(x_t, t, cond):
        alpha, sigma = (expand_time(a, x_t).to(x_t.dtype) for a in SCHEDULE.alpha_sigma(t))
        return (alpha * x_t - x0) / sigma  # v = (alpha x_t - x0) / sigma

    objective = ProgressiveDistillation(lambda: exact, SCHEDULE, student_steps=4)
    loss = objective(exact, x0, Conditioning(), torch.Generator().manual_seed(7))
    assert loss.item() < 1e-8


def test_distillation_draws_grid_times_and_guidance_scales_for_the_student():
    teacher = tiny(seed=2, guidance_input=True)
    student = Recorder(tiny(seed=2, guidance_input=True))
    objective = ProgressiveDistillation(lambda: teacher, SCHEDULE, student_steps=4, guidance_range=(2.0, 3.0))
    objective(student, torch.randn(6, *LATENT), Conditioning(labels=torch.zeros(6, dtype=torch.long)))
    ((_, t, cond, _, _),) = student.calls
    assert set((t * 4).round().tolist()) <= {1.0, 2.0, 3.0, 4.0} and torch.equal(t * 4, (t * 4).round())
    assert bool(((cond.guidance >= 2.0) & (cond.guidance <= 3.0)).all())
