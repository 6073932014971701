"""The MovingDigits faithfulness classifier: trained on real training frames, it must recognize the digits of
held-out handwriting, and a clip's label must matter (wrong labels score near chance)."""

from __future__ import annotations

import torch

from walt.data import MovingDigits
from walt.metrics.digits import clip_digit_scores, digit_accuracy, train_digit_classifier


def test_digit_classifier_recognizes_unseen_handwriting():
    train = MovingDigits("train", num_samples=384, num_frames=5, resolution=32)
    test = MovingDigits("test", num_samples=160, num_frames=5, resolution=32, label="first")
    classifier = train_digit_classifier(train, steps=250, batch_size=128, width=16, progress=False)
    videos = torch.stack([test[i]["video"] for i in range(len(test))])  # (N, 3, T, H, W)
    labels = torch.tensor([test[i]["label"] for i in range(len(test))])
    scores = clip_digit_scores(classifier, videos)
    assert scores.shape == (160, 10) and scores.min() >= 0 and scores.max() <= 1
    assert digit_accuracy(scores, labels, digits_per_clip=2) > 0.85
    wrong = (labels + torch.randint(1, 10, labels.shape, generator=torch.Generator().manual_seed(0))) % 10
    shown = torch.tensor([test.digits_of(i) for i in range(len(test))])
    not_shown = (wrong.view(-1, 1) != shown).all(dim=1)  # labels naming a digit the clip does not show
    assert digit_accuracy(scores[not_shown], wrong[not_shown], digits_per_clip=2) < 0.15
