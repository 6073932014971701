"""Tokenizer losses against hand-computed values and independent references."""

import math

import pytest
import torch
from torch import nn

from walt.tokenizer.losses import (
    LeCam,
    TokenizerLoss,
    adaptive_gan_weight,
    gradient_penalty,
    hinge_d_loss,
    hinge_g_loss,
    kl_divergence,
    non_saturating_d_loss,
    non_saturating_g_loss,
)


def softplus(v: float) -> float:
    return math.log1p(math.exp(v))


def test_gan_losses_golden_values():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # hinge: mean(relu(1 - [2, .5])) = .25 ; mean(relu(1 + [-2, 0])) = .5
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.75)
    assert hinge_g_loss(fake).item() == pytest.approx(1.0)
    expected_d = (softplus(-2.0) + softplus(-0.5)) / 2 + (softplus(-2.0) + softplus(0.0)) / 2
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(expected_d, rel=1e-6)
    assert non_saturating_g_loss(fake).item() == pytest.approx((softplus(2.0) + softplus(0.0)) / 2, rel=1e-6)


def test_kl_matches_torch_distributions():
    gen = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 2, 2, generator=gen), torch.randn(2, 4, 3, 2, 2, generator=gen)
    posterior = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    prior = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(posterior, prior).mean()
    torch.testing.assert_close(kl_divergence(mean, logvar), expected)


def test_gradient_penalty_of_a_linear_critic_is_its_squared_weight_norm():
    w = torch.randn(3, 5, 4, 4)
    real = torch.randn(2, 3, 5, 4, 4, requires_grad=True)
    logits = (real * w).flatten(1).sum(1)  # dD/dx = w for every sample
    torch.testing.assert_close(gradient_penalty(real, logits), w.pow(2).sum())


def test_gradient_penalty_of_a_patch_critic_is_that_of_its_mean_logit():
    """A patch map whose P logits are P linear critics: the penalty is that of their mean, the quantity the
    losses average, so it does not grow with the number of patches (it grew as P^2 when the patches' sum
    was differentiated)."""
    w = torch.randn(6, 3, 5, 4, 4)  # six patches
    real = torch.randn(2, 3, 5, 4, 4, requires_grad=True)
    logits = torch.einsum("pcthw,bcthw->bp", w, real).view(2, 1, 1, 2, 3)  # (B, 1, T', H', W')
    torch.testing.assert_close(gradient_penalty(real, logits), w.mean(0).pow(2).sum())
    same = torch.einsum("cthw,bcthw->b", w[0], real)[:, None, None, None, None].expand(2, 1, 1, 2, 3)
    torch.testing.assert_close(gradient_penalty(real, same), w[0].pow(2).sum())  # P copies = one critic


def test_lecam_golden_value():
    lecam = LeCam(decay=0.5)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -1.0])
    lecam.update(real, fake)  # ema_real = 0.5 * 0 + 0.5 * 2 = 1 ; ema_fake = -0.5
    assert lecam.ema_real.item() == pytest.approx(1.0) and lecam.ema_fake.item() == pytest.approx(-0.5)
    # mean(relu([1, 3] + .5)^2) = (2.25 + 12.25) / 2 ; mean(relu(1 - [-1, -1])^2) = 4
    assert lecam(real, fake).item() == pytest.approx(7.25 + 4.0)


def test_adaptive_weight_is_the_gradient_norm_ratio():
    w = torch.randn(6, requires_grad=True)
    a, b = torch.randn(6), torch.randn(6)
    weight = adaptive_gan_weight((w * a).sum(), (w * b).sum(), w)
    assert weight.item() == pytest.approx((a.norm() / (b.norm() + 1e-4)).item(), rel=1e-6)
    assert not weight.requires_grad


def test_generator_loss_combines_terms():
    gen = torch.Generator().manual_seed(0)
    x, x_rec = torch.rand(2, 3, 5, 8, 8, generator=gen), torch.rand(2, 3, 5, 8, 8, generator=gen)
    mean, logvar = torch.randn(2, 4, 2, 1, 1, generator=gen), torch.randn(2, 4, 2, 1, 1, generator=gen)
    logits = torch.randn(2, 1, 2, 2, 2, generator=gen)
    loss = TokenizerLoss(
        perceptual=nn.MSELoss(), perceptual_weight=0.5, kl_weight=0.01, gan_weight=0.1, adaptive_weight=False
    )
    total, logs = loss.generator_loss(x, x_rec, mean, logvar, logits, last_layer=torch.zeros(1))
    expected = (
        (x - x_rec).abs().mean()
        + 0.5 * (x - x_rec).pow(2).mean()
        + 0.01 * kl_divergence(mean, logvar)
        + 0.1 * -logits.mean()
    )
    torch.testing.assert_close(total, expected)
    assert set(logs) == {"rec", "perceptual", "kl", "g", "total"}


def test_adaptive_weight_balances_at_the_decoder_layer():
    layer = nn.Conv3d(2, 3, 1)
    h = torch.randn(1, 2, 3, 4, 4)
    x, x_rec = torch.randn(1, 3, 3, 4, 4), layer(h)
    logits = (x_rec * 3.0).mean(dim=1, keepdim=True)
    loss = TokenizerLoss(gan_weight=0.5, kl_weight=0.0)
    _, logs = loss.generator_loss(x, x_rec, torch.zeros(1), None, logits, layer.weight)
    g_rec = torch.autograd.grad((x_rec - x).abs().mean(), layer.weight, retain_graph=True)[0]
    g_gan = torch.autograd.grad(-logits.mean(), layer.weight)[0]
    assert logs["gan_weight"].item() == pytest.approx(
        0.5 * (g_rec.norm() / (g_gan.norm() + 1e-4)).item(), 1e-5
    )


def test_discriminator_loss_combines_terms_and_gan_start():
    loss = TokenizerLoss(gradient_penalty_weight=2.0, lecam_weight=0.1, lecam_decay=0.0, gan_start_step=10)
    assert not loss.gan_active(9) and loss.gan_active(10)
    w = torch.randn(3, 1, 4, 4)
    real = torch.randn(2, 3, 1, 4, 4, requires_grad=True)
    logits_real = (real * w).flatten(1).sum(1)
    logits_fake = torch.tensor([-0.3, 0.4])
    total, logs = loss.discriminator_loss(real, logits_real, logits_fake)
    # lecam_decay 0: the averages are this batch's means
    lecam = (logits_real - logits_fake.mean()).relu().pow(2).mean() + (
        logits_real.mean() - logits_fake
    ).relu().pow(2).mean()
    expected = hinge_d_loss(logits_real, logits_fake) + 2.0 * w.pow(2).sum() + 0.1 * lecam
    torch.testing.assert_close(total, expected)
    assert {"d", "gp", "lecam"} <= set(logs)


def test_lazy_gradient_penalty_applies_every_kth_step_at_k_times_the_weight():
    loss = TokenizerLoss(gradient_penalty_weight=2.0, gradient_penalty_every=4, gan_start_step=10)
    assert [s for s in range(8, 20) if loss.penalty_due(s)] == [10, 14, 18]
    assert all(TokenizerLoss(gradient_penalty_weight=2.0).penalty_due(s) for s in range(3))
    assert not TokenizerLoss(gradient_penalty_every=4).penalty_due(0)  # no penalty weight, no penalty
    w = torch.randn(3, 1, 4, 4)
    real = torch.randn(2, 3, 1, 4, 4, requires_grad=True)
    logits_real = (real * w).flatten(1).sum(1)
    logits_fake = torch.tensor([-0.3, 0.4])
    d = hinge_d_loss(logits_real, logits_fake)
    total, logs = loss.discriminator_loss(real, logits_real, logits_fake, penalty=True)
    torch.testing.assert_close(total, d + 4 * 2.0 * w.pow(2).sum())  # 4 steps' penalty on one step
    total, logs = loss.discriminator_loss(real, logits_real.detach(), logits_fake, penalty=False)
    torch.testing.assert_close(total, d.detach())
    assert "gp" not in logs
    with pytest.raises(ValueError, match="gradient_penalty_every"):
        TokenizerLoss(gradient_penalty_every=0)


def test_bad_loss_choice_is_rejected():
    with pytest.raises(ValueError, match="reconstruction"):
        TokenizerLoss(reconstruction="l3")
    with pytest.raises(ValueError, match="gan_loss"):
        TokenizerLoss(gan_loss="wgan")
