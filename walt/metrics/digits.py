"""Class faithfulness on MovingDigits: a small CNN that tells which digits a clip shows.

FVD says whether generated clips look like the data; it does not say whether a class-conditional model drew the
digit it was asked for. This classifier is trained on real frames only (never on generated ones) to detect each
digit's presence in a frame (10 independent sigmoids, since a frame shows up to two digits, possibly
overlapping). A clip's score for a digit is the mean over its frames, and the clip shows the ``k`` digits with the
highest scores (``k`` = digits per clip).

With ``augment=True`` the training frames are degraded at random (blur, dimming, noise) so that the classifier
reads shapes rather than the crispness of the rendering: an object drawn crisper than the digits (MovingSubject's
silhouette) is otherwise recognized in real frames and missed in every decoded one, since a tokenizer's output is
always softer than its input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from walt.data.synthetic import MovingDigits

__all__ = [
    "DigitClassifier",
    "clip_digit_scores",
    "degrade",
    "digit_accuracy",
    "gaussian_blur",
    "train_digit_classifier",
]


class DigitClassifier(nn.Module):
    """Frames ``(N, 1, H, W)`` in [-1, 1] -> presence logits ``(N, num_classes)``; any H, W >= 16. Ten classes
    are the digits; more (``walt.data.MovingSubject``'s subject, label 10) are other objects."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 1
        for out in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        # Max over positions: a digit is present if it is present anywhere, wherever it bounced to.
        self.head = nn.Linear(channels, num_classes)

    def forward(self, frames: Tensor) -> Tensor:
        h = self.features(frames)  # (N, 4w, H/8, W/8)
        h = h.amax(dim=(2, 3))  # (N, 4w)
        return self.head(h)  # (N, num_classes)


def _frames_and_targets(
    dataset: MovingDigits, indices: list[int], num_classes: int = 10
) -> tuple[Tensor, Tensor]:
    """All frames of the clips ``indices`` as (N*T, 1, H, W) with multi-hot targets (N*T, num_classes)."""
    frames, targets = [], []
    for i in indices:
        video = dataset[i]["video"]  # (3, T, H, W), grey
        frames.append(video[0].unsqueeze(1))  # (T, 1, H, W)
        hot = torch.zeros(num_classes)
        hot[dataset.digits_of(i)] = 1.0
        targets.append(hot.expand(video.shape[1], num_classes))  # (T, num_classes)
    return torch.cat(frames), torch.cat(targets)


def gaussian_blur(frames: Tensor, sigma: Tensor, radius: int | None = None) -> Tensor:
    """Frames ``(N, 1, H, W)``, frame i blurred by a Gaussian of width ``sigma[i]`` pixels (0: unchanged), cut at
    ``radius`` (default: three of the widest sigma); edges replicated."""
    n = frames.shape[0]
    radius = max(1, int(3 * float(sigma.max()) + 0.5)) if radius is None else radius
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)  # (K,)
    kernel = torch.exp(-0.5 * (offsets / sigma.float().clamp_min(1e-3).view(n, 1)) ** 2)  # (n, K)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(frames)  # (n, K)
    x = frames.transpose(0, 1)  # (1, n, H, W): one group per frame, each with its own kernel
    rows = F.pad(x, (radius, radius, 0, 0), mode="replicate")  # (1, n, H, W + 2r)
    x = F.conv2d(rows, kernel.view(n, 1, 1, -1), groups=n)  # (1, n, H, W)
    cols = F.pad(x, (0, 0, radius, radius), mode="replicate")  # (1, n, H + 2r, W)
    x = F.conv2d(cols, kernel.view(n, 1, -1, 1), groups=n)  # (1, n, H, W)
    return x.transpose(0, 1)  # (n, 1, H, W)


def degrade(
    frames: Tensor,
    generator: torch.Generator,
    max_sigma: float = 2.0,
    min_gain: float = 0.6,
    max_noise: float = 0.05,
) -> Tensor:
    """Frames ``(N, 1, H, W)`` in [-1, 1], each blurred by a Gaussian of a random width in [0, ``max_sigma``] pixels,
    its brightness above black scaled by a random gain in [``min_gain``, 1], and Gaussian noise of a random
    strength in [0, ``max_noise``] added; what decoding does to a frame, roughly, drawn at random per frame."""
    n = frames.shape[0]
    draw = lambda low, high: low + (high - low) * torch.rand(n, generator=generator)
    sigma, gain, noise = draw(0.0, max_sigma), draw(min_gain, 1.0), draw(0.0, max_noise)
    x = gaussian_blur(frames, sigma, radius=max(1, int(3 * max_sigma + 0.5)))  # (n, 1, H, W)
    x = (x + 1) * gain.to(x).view(n, 1, 1, 1) - 1  # (n, 1, H, W): black stays black
    x = x + noise.to(x).view(n, 1, 1, 1) * torch.randn(x.shape, generator=generator).to(x)  # (n, 1, H, W)
    return x.clamp(-1, 1)


def train_digit_classifier(
    dataset: MovingDigits,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    width: int = 32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = True,
    num_classes: int = 10,
    augment: bool = False,
) -> DigitClassifier:
    """Trains a :class:`DigitClassifier` on the frames of every clip of ``dataset`` (a real, training split;
    anything with ``digits_of(i)``, the classes clip ``i`` shows); with ``augment``, on frames :func:`degrade`
    draws from them."""
    torch.manual_seed(seed)
    frames, targets = _frames_and_targets(dataset, list(range(len(dataset))), num_classes)
    frames, targets = frames.to(device), targets.to(device)
    model = DigitClassifier(width, num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    model.train()
    for _ in tqdm(range(steps), desc="digit classifier", disable=not progress):
        idx = torch.randint(len(frames), (batch_size,), generator=gen).to(device)
        batch = degrade(frames[idx], gen) if augment else frames[idx]  # (B, 1, H, W)
        loss = F.binary_cross_entropy_with_logits(model(batch), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def clip_digit_scores(classifier: DigitClassifier, videos: Tensor, batch_size: int = 64) -> Tensor:
    """Videos ``(N, 3, T, H, W)`` in [-1, 1] -> per-class presence probability averaged over frames
    ``(N, num_classes)``."""
    device = next(classifier.parameters()).device
    scores = []
    for chunk in videos.split(batch_size):
        n, _, t, h, w = chunk.shape
        grey = chunk.to(device).float().mean(dim=1)  # (n, T, H, W): generated clips may be slightly coloured
        logits = classifier(grey.reshape(n * t, 1, h, w))  # (n*T, K)
        scores.append(logits.sigmoid().reshape(n, t, -1).mean(dim=1).cpu())  # (n, K)
    return torch.cat(scores)


def digit_accuracy(scores: Tensor, labels: Tensor, digits_per_clip: int) -> float:
    """Share of clips whose label digit is among the ``digits_per_clip`` best-scoring digits.

    With one digit per clip this is plain top-1 accuracy; with two and first-digit labels, a model that ignores
    its label scores about 2/10 (the conditioned digit appears by chance as one of two random digits).
    """
    top = scores.topk(digits_per_clip, dim=1).indices  # (N, k)
    return (top == labels.view(-1, 1)).any(dim=1).float().mean().item()
