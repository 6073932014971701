"""The MovingDigits faithfulness classifier: trained on real training frames, it must recognize the digits of
held-out handwriting, and a clip's label must matter (wrong labels score near chance)."""

from __future__ import annotations

import torch

from walt.data import MovingDigits, MovingSubject
from walt.metrics.digits import clip_digit_scores, degrade, digit_accuracy, train_digit_classifier


def test_digit_classifier_recognizes_unseen_handwriting():
    train = MovingDigits("train", num_samples=384, num_frames=5, resolution=32)
    test = MovingDigits("test", num_samples=160, num_frames=5, resolution=32, label="first")
    classifier = train_digit_classifier(train, steps=150, batch_size=128, width=16, progress=False)
    videos = torch.stack([test[i]["video"] for i in range(len(test))])  # (N, 3, T, H, W)
    labels = torch.tensor([test[i]["label"] for i in range(len(test))])
    scores = clip_digit_scores(classifier, videos)
    assert scores.shape == (160, 10) and scores.min() >= 0 and scores.max() <= 1
    assert digit_accuracy(scores, labels, digits_per_clip=2) > 0.85
    wrong = (labels + torch.randint(1, 10, labels.shape, generator=torch.Generator().manual_seed(0))) % 10
    shown = torch.tensor([test.digits_of(i) for i in range(len(test))])
    not_shown = (wrong.view(-1, 1) != shown).all(dim=1)  # labels naming a digit the clip does not show
    assert digit_accuracy(scores[not_shown], wrong[not_shown], digits_per_clip=2) < 0.15


def test_degrade_without_degradation_is_the_identity_and_keeps_black_black():
    gen = torch.Generator().manual_seed(0)
    frames = torch.rand(6, 1, 16, 16, generator=gen) * 2 - 1  # (N, 1, H, W)
    same = degrade(frames, gen, max_sigma=0.0, min_gain=1.0, max_noise=0.0)
    assert torch.allclose(same, frames, atol=1e-6)
    black = torch.full((4, 1, 16, 16), -1.0)
    assert torch.allclose(degrade(black, gen, max_noise=0.0), black, atol=1e-6)  # blur, dimming: black stays
    flat = torch.full((4, 1, 16, 16), 0.5)
    assert torch.allclose(
        degrade(flat, gen, min_gain=1.0, max_noise=0.0), flat, atol=1e-6
    )  # kernels sum to 1


def test_degrade_draws_each_frame_its_own_blur():
    dot = torch.full((64, 1, 15, 15), -1.0)
    dot[:, :, 7, 7] = 1.0
    out = degrade(dot, torch.Generator().manual_seed(0), max_sigma=2.0, min_gain=1.0, max_noise=0.0)
    peak = out[:, 0, 7, 7]  # (N,): a wider blur leaves a lower peak
    assert peak.max() - peak.min() > 1.0  # from nearly untouched to widely spread
    assert torch.allclose(out.sum(dim=(1, 2, 3)) + 15 * 15, dot.sum(dim=(1, 2, 3)) + 15 * 15, rtol=1e-4)


def test_a_classifier_of_degraded_frames_still_finds_a_crisp_object_when_it_is_blurred():
    """The personalization study's failure: its subject is drawn crisper than the digits, and a classifier of
    clean frames keyed on that; trained on degraded frames it must find the subject in blurred clips too, with
    the digits still read and no false alarms on digit clips."""
    from torch.utils.data import ConcatDataset

    digits = MovingDigits("train", num_samples=256, num_frames=5, resolution=32, seed=2)
    subject = MovingSubject("horse", 64, 5, 32, seed=3)

    class Objects(ConcatDataset):
        def digits_of(self, i: int) -> list[int]:
            return digits.digits_of(i) if i < len(digits) else subject.digits_of(i - len(digits))

    classifier = train_digit_classifier(
        Objects([digits, subject]), steps=200, batch_size=64, width=16, progress=False, num_classes=11,
        augment=True,
    )  # fmt: skip
    held_out = torch.stack([MovingSubject("horse", 32, 5, 32, seed=4)[i]["video"] for i in range(32)])
    blurred = degrade(
        held_out.transpose(1, 2).reshape(-1, 3, 32, 32)[:, :1],
        torch.Generator().manual_seed(1),
        1.5,
        1.0,
        0.0,
    )  # (N*T, 1, H, W)
    blurred = blurred.reshape(32, 5, 1, 32, 32).transpose(1, 2).expand(-1, 3, -1, -1, -1)  # (N, 3, T, H, W)
    test = MovingDigits("test", num_samples=64, num_frames=5, resolution=32, label="first")
    videos = torch.stack([test[i]["video"] for i in range(64)])
    labels = torch.tensor([test[i]["label"] for i in range(64)])
    shows = lambda v: (
        (clip_digit_scores(classifier, v).topk(2, dim=1).indices == 10).any(dim=1).float().mean()
    )
    assert shows(held_out) > 0.9 and shows(blurred) > 0.8
    assert shows(videos) < 0.1
    assert digit_accuracy(clip_digit_scores(classifier, videos)[:, :10], labels, 2) > 0.7
