"""Classifier-free guidance and self-conditioning around a real (tiny, randomised) WALT backbone."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from walt.conditioning import Conditioning
from walt.diffusion import (
    ZeroTerminalSNRLinearSchedule,
    classifier_free_guidance,
    concat_conditioning,
    ddim_sample,
    guided,
    null_conditioning,
    self_conditioned,
    x0_from_v,
)
from walt.transformer import WALT

B, C, T, H, W = 3, 4, 3, 4, 4


@pytest.fixture(scope="module")
def model() -> WALT:
    torch.manual_seed(0)
    net = WALT(
        in_channels=C,
        depth=2,
        hidden_size=32,
        num_heads=2,
        input_size=(T, H, W),
        windows=[(1, -1, -1), (2, 2, 2)],
        num_classes=5,
        text_dim=6,
        context_frames=True,
        self_conditioning=True,
    ).double()
    with torch.no_grad():  # a trained-looking model: every path, zero-initialised ones too, does something
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net.eval()


def _cond(self_cond: torch.Tensor | None = None) -> Conditioning:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(B, 1, T, H, W, dtype=torch.float64)
    mask[:, :, 0] = 1  # the first frame is known
    text_mask = torch.ones(B, 7, dtype=torch.bool)
    text_mask[0, 4:] = False
    return Conditioning(
        labels=torch.tensor([0, 3, 4]),
        text=torch.randn(B, 7, 6, generator=g, dtype=torch.float64),
        text_mask=text_mask,
        context=torch.randn(B, C, T, H, W, generator=g, dtype=torch.float64),
        context_mask=mask,
        self_cond=self_cond,
    )


def _inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, C, T, H, W, generator=g, dtype=torch.float64), torch.tensor(
        [0.9, 0.5, 0.1], dtype=torch.float64
    )


@torch.no_grad()
def test_scale_one_is_the_conditional_model_and_zero_the_unconditional(model):
    x, t = _inputs()
    cond = _cond()
    torch.testing.assert_close(
        classifier_free_guidance(model, cond, 1.0)(x, t), model(x, t, cond), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        classifier_free_guidance(model, cond, 0.0)(x, t),
        model(x, t, null_conditioning(cond)),
        rtol=0,
        atol=1e-12,
    )


@torch.no_grad()
def test_batched_guidance_equals_two_separate_passes(model):
    x, t = _inputs()
    cond = _cond()
    v_c, v_u = model(x, t, cond), model(x, t, null_conditioning(cond))
    torch.testing.assert_close(classifier_free_guidance(model, cond, 4.0)(x, t), v_u + 4.0 * (v_c - v_u))
    schedule = lambda t: 1.0 + 2.0 * t  # a guidance scale that varies over sampling time
    w = schedule(t).view(B, 1, 1, 1, 1)
    torch.testing.assert_close(classifier_free_guidance(model, cond, schedule)(x, t), v_u + w * (v_c - v_u))


@torch.no_grad()
def test_null_conditioning_means_no_label_no_text_no_known_frames(model):
    x, t = _inputs()
    cond = _cond()
    null = null_conditioning(cond)
    assert torch.equal(null.labels, torch.full((B,), -1)) and not null.text_mask.any()
    assert not null.context.any() and not null.context_mask.any()
    assert null.self_cond is cond.self_cond and cond.labels.tolist() == [0, 3, 4]  # the input is not modified
    # Zeroed context is exactly "no context given"; the text, whatever it holds, no longer matters.
    no_context = dataclasses.replace(null, context=None, context_mask=None)
    other_text = dataclasses.replace(null, text=torch.randn_like(cond.text))
    torch.testing.assert_close(model(x, t, null), model(x, t, no_context), rtol=0, atol=1e-12)
    torch.testing.assert_close(model(x, t, null), model(x, t, other_text), rtol=0, atol=1e-12)
    # Dropping only the labels keeps the text and the known frames.
    only_labels = null_conditioning(cond, drop=("labels",))
    assert torch.equal(only_labels.context, cond.context) and torch.equal(
        only_labels.text_mask, cond.text_mask
    )
    with pytest.raises(ValueError, match="cannot drop"):
        null_conditioning(cond, drop=("lowres",))


def test_concat_conditioning_requires_matching_fields():
    a = Conditioning(labels=torch.tensor([1]))
    assert torch.equal(concat_conditioning(a, a).labels, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="labels is set in one batch only"):
        concat_conditioning(a, Conditioning())


@torch.no_grad()
def test_self_conditioning_feeds_back_the_previous_estimate(model):
    schedule = ZeroTerminalSNRLinearSchedule()
    seen: list[torch.Tensor | None] = []
    outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recording(x_t, t, cond):
        seen.append(cond.self_cond)
        v = model(x_t, t, cond)
        outputs.append((x_t, t, v))
        return v

    noise, _ = _inputs()
    ddim_sample(self_conditioned(recording, _cond(), schedule), noise, num_steps=4, schedule=schedule)
    assert len(seen) == 4 and seen[0] is None
    for step in range(1, 4):
        x_t, t, v = outputs[step - 1]
        alpha, sigma = (s.view(B, 1, 1, 1, 1) for s in schedule.alpha_sigma(t))
        torch.testing.assert_close(seen[step], x0_from_v(x_t, v, alpha, sigma))


@torch.no_grad()
def test_guided_self_conditioned_sampling_runs_both_branches_in_one_call(model):
    calls = []

    def counting(x_t, t, cond):
        calls.append(x_t.shape[0])
        return model(x_t, t, cond)

    schedule = ZeroTerminalSNRLinearSchedule()
    noise, _ = _inputs()
    out = ddim_sample(
        self_conditioned(guided(counting, 2.0), _cond(), schedule), noise, num_steps=3, schedule=schedule
    )
    assert calls == [2 * B] * 3 and out.shape == noise.shape and torch.isfinite(out).all()


class _Counting:
    """The model, recording the batch size of every call."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        return self.model(x, t, cond)


@torch.no_grad()
def test_a_guidance_interval_guides_inside_and_runs_the_conditional_pass_alone_outside(model):
    """interval (lo, hi]: w inside, w = 1 (v_c) outside; a step with every sample outside makes one call of B."""
    x, t = _inputs()  # t = 0.9, 0.5, 0.1
    cond = _cond()
    v_c, v_u = model(x, t, cond), model(x, t, null_conditioning(cond))
    counting = _Counting(model)
    mixed = guided(counting, 3.0, interval=(0.2, 0.9))(x, t, cond)  # 0.9 and 0.5 inside, 0.1 outside
    w = torch.tensor([3.0, 3.0, 1.0], dtype=torch.float64).view(B, 1, 1, 1, 1)
    torch.testing.assert_close(mixed, v_u + w * (v_c - v_u))
    assert counting.batches == [2 * B]
    one_time = torch.full((B,), 0.1, dtype=torch.float64)
    outside = guided(counting, 3.0, interval=(0.2, 0.9))(x, one_time, cond)
    torch.testing.assert_close(outside, model(x, one_time, cond), rtol=0, atol=0)
    assert counting.batches == [2 * B, B]
    counting.batches.clear()
    unconditional = guided(counting, 0.0)(x, t, cond)  # w = 0 is v_u: the unconditional pass alone
    torch.testing.assert_close(unconditional, v_u, rtol=0, atol=1e-12)
    assert counting.batches == [B]
    # w = 0 inside the interval, w = 1 outside it: v_u for the first two samples, v_c for the third
    zero_inside = guided(counting, 0.0, interval=(0.2, 0.9))(x, t, cond)
    torch.testing.assert_close(zero_inside, torch.cat([v_u[:2], v_c[2:]]), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "interval, message",
    [
        ((0.5, 0.5), "0 <= lo < hi <= 1"),
        ((-0.1, 0.5), "0 <= lo < hi <= 1"),
        ((0.2, 1.5), "0 <= lo < hi <= 1"),
        ((0.2,), "two diffusion times"),
        (0.5, "two diffusion times"),
        ((True, 0.5), "two diffusion times"),
    ],
)
def test_a_guidance_interval_outside_the_diffusion_times_is_refused(model, interval, message):
    with pytest.raises(ValueError, match=message):
        guided(model, 2.0, interval=interval)
