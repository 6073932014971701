"""Tokenizer training losses (VQGAN / MAGVIT-v2 recipe): reconstruction, perceptual, KL, adversarial with
gradient penalty and LeCam regularization, and the adaptive weight that balances GAN and reconstruction
gradients at the decoder's last layer. The model stays free of losses; `TokenizerLoss` gathers them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from walt.checks import check_int

# ---- pieces, each a pure function of its inputs ---------------------------------------------------------


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)), averaged over all latent elements."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()


def non_saturating_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def non_saturating_g_loss(logits_fake: Tensor) -> Tensor:
    return F.softplus(-logits_fake).mean()


def gradient_penalty(real: Tensor, logits_real: Tensor) -> Tensor:
    """R1 penalty E[|dD(x)/dx|^2] on real inputs; `real` must have had requires_grad set before D ran.

    D(x) is a clip's mean logit over its patches (B, ...) -> (B,), the quantity the hinge and non-saturating
    losses average. The gradient of the patches' sum instead (right for a critic with one logit per clip)
    multiplies the penalty by the square of the patch count: 128^2 for 17x128x128 clips through four
    downsamplings, which held the discriminator at zero and kept it from learning."""
    per_clip = logits_real.flatten(1).mean(1) if logits_real.dim() > 1 else logits_real  # (B,)
    (grad,) = torch.autograd.grad(per_clip.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def adaptive_gan_weight(
    rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4
) -> Tensor:
    """|grad rec_loss| / |grad gan_loss| at `last_layer` (VQGAN), so neither term drowns the other."""
    (g_rec,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_gan,) = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    # 1e-4 guards against a vanishing GAN gradient, as in VQGAN.
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class LeCam(nn.Module):
    """LeCam regularizer (Tseng et al. 2021): keeps D's outputs near moving averages of the other class.

    reg = E[relu(D(real) - ema_fake)^2] + E[relu(ema_real - D(fake))^2]; the averages are buffers, so they
    are saved in checkpoints.
    """

    def __init__(self, decay: float = 0.999) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("ema_real", torch.zeros(()))
        self.register_buffer("ema_fake", torch.zeros(()))

    @torch.no_grad()
    def update(self, logits_real: Tensor, logits_fake: Tensor) -> None:
        self.ema_real.lerp_(logits_real.float().mean(), 1.0 - self.decay)
        self.ema_fake.lerp_(logits_fake.float().mean(), 1.0 - self.decay)

    def forward(self, logits_real: Tensor, logits_fake: Tensor) -> Tensor:
        real_term = F.relu(logits_real - self.ema_fake).pow(2).mean()
        fake_term = F.relu(self.ema_real - logits_fake).pow(2).mean()
        return real_term + fake_term


def frames_as_images(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> (B*T, C, H, W), for image losses on every frame."""
    return x.transpose(1, 2).flatten(0, 1)


# ---- the combined objective ----------------------------------------------------------------------------


class TokenizerLoss(nn.Module):
    """Autoencoder and discriminator objectives of the tokenizer.

    Args:
        perceptual: a module `perceptual(x, y)` on images (N, 3, H, W) in [-1, 1], e.g. `walt.metrics.LPIPS`;
            None disables the term. It is frozen here.
        reconstruction: pixel loss, "l1" or "l2".
        perceptual_weight, kl_weight, gan_weight, gradient_penalty_weight, lecam_weight: term weights.
        perceptual_frames: frames per clip (picked at random) fed to the perceptual loss; None = all.
        gan_loss: "hinge" or "non_saturating".
        gan_start_step: training step at which the adversarial terms switch on (autoencoder warm-up).
        adaptive_weight: multiply `gan_weight` by the gradient-norm ratio at the decoder's last layer.
        gradient_penalty_every: apply R1 on every k-th discriminator step only, weighted k times (StyleGAN2's
            lazy regularization): the same penalty on average, at 1/k of its double backward's cost.
        lecam_decay: decay of LeCam's moving averages.
    """

    def __init__(
        self,
        perceptual: nn.Module | None = None,
        reconstruction: Literal["l1", "l2"] = "l1",
        perceptual_weight: float = 1.0,
        perceptual_frames: int | None = None,
        kl_weight: float = 1e-6,
        gan_loss: Literal["hinge", "non_saturating"] = "hinge",
        gan_weight: float = 0.1,
        gan_start_step: int = 0,
        adaptive_weight: bool = True,
        gradient_penalty_weight: float = 0.0,
        gradient_penalty_every: int = 1,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
    ) -> None:
        super().__init__()
        check_int("gradient_penalty_every", gradient_penalty_every, 1)
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f'reconstruction must be "l1" or "l2", got {reconstruction!r}')
        if gan_loss not in ("hinge", "non_saturating"):
            raise ValueError(f'gan_loss must be "hinge" or "non_saturating", got {gan_loss!r}')
        self.perceptual = perceptual
        if perceptual is not None:
            perceptual.requires_grad_(False).eval()
        self.pixel_loss = F.l1_loss if reconstruction == "l1" else F.mse_loss
        self.d_loss = hinge_d_loss if gan_loss == "hinge" else non_saturating_d_loss
        self.g_loss = hinge_g_loss if gan_loss == "hinge" else non_saturating_g_loss
        self.perceptual_weight = perceptual_weight
        self.perceptual_frames = perceptual_frames
        self.kl_weight = kl_weight
        self.gan_weight = gan_weight
        self.gan_start_step = gan_start_step
        self.adaptive_weight = adaptive_weight
        self.gradient_penalty_weight = gradient_penalty_weight
        self.gradient_penalty_every = gradient_penalty_every
        self.lecam_weight = lecam_weight
        self.lecam = LeCam(lecam_decay)

    def train(self, mode: bool = True) -> TokenizerLoss:
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()  # a frozen feature network keeps its inference behaviour
        return self

    def gan_active(self, step: int) -> bool:
        return self.gan_weight > 0 and step >= self.gan_start_step

    def penalty_due(self, step: int) -> bool:
        """Whether the discriminator step of batch ``step`` applies R1: the first adversarial batch and every
        ``gradient_penalty_every``-th after it."""
        if self.gradient_penalty_weight <= 0 or not self.gan_active(step):
            return False
        return (step - self.gan_start_step) % self.gradient_penalty_every == 0

    def perceptual_loss(self, x: Tensor, x_rec: Tensor) -> Tensor:
        if self.perceptual_frames is not None and self.perceptual_frames < x.shape[2]:
            idx = torch.randperm(x.shape[2], device=x.device)[: self.perceptual_frames]
            x, x_rec = x[:, :, idx], x_rec[:, :, idx]  # (B, 3, F, H, W)
        return self.perceptual(frames_as_images(x_rec), frames_as_images(x)).mean()

    def generator_loss(
        self,
        x: Tensor,
        x_rec: Tensor,
        mean: Tensor,
        logvar: Tensor | None,
        logits_fake: Tensor | None,
        last_layer: Tensor,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Autoencoder loss; `logits_fake` = D(x_rec) when the adversarial term is active, else None."""
        logs: dict[str, Tensor] = {"rec": self.pixel_loss(x_rec, x)}
        rec = logs["rec"]
        if self.perceptual is not None and self.perceptual_weight > 0:
            logs["perceptual"] = self.perceptual_loss(x, x_rec)
            rec = rec + self.perceptual_weight * logs["perceptual"]
        total = rec
        if logvar is not None and self.kl_weight > 0:
            logs["kl"] = kl_divergence(mean, logvar)
            total = total + self.kl_weight * logs["kl"]
        if logits_fake is not None:
            logs["g"] = self.g_loss(logits_fake)
            weight = self.gan_weight
            if self.adaptive_weight:
                logs["gan_weight"] = adaptive_gan_weight(rec, logs["g"], last_layer) * self.gan_weight
                weight = logs["gan_weight"]
            total = total + weight * logs["g"]
        logs["total"] = total
        return total, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(
        self, real: Tensor, logits_real: Tensor, logits_fake: Tensor, penalty: bool = True
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss; `real` is D's input for `logits_real` (with requires_grad when R1 applies).

        ``penalty``: apply R1 on this step (`penalty_due`); it then weighs ``gradient_penalty_every`` times, so
        that lazy regularization keeps the penalty's average strength."""
        logs = {"d": self.d_loss(logits_real, logits_fake)}
        total = logs["d"]
        if penalty and self.gradient_penalty_weight > 0:
            logs["gp"] = gradient_penalty(real, logits_real)
            weight = self.gradient_penalty_weight * self.gradient_penalty_every
            total = total + weight * logs["gp"]
        if self.lecam_weight > 0:
            self.lecam.update(logits_real, logits_fake)
            logs["lecam"] = self.lecam(logits_real, logits_fake)
            total = total + self.lecam_weight * logs["lecam"]
        logs["logits_real"] = logits_real.mean()
        logs["logits_fake"] = logits_fake.mean()
        return total, {k: v.detach() for k, v in logs.items()}
