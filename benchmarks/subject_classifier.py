"""Does the personalization study's object classifier see the subject in decoded frames? (CPU)

The study (tools/personalize.py) trains a classifier of the ten digits and the horse on real frames and counts a
sample as showing the horse when the horse is among its two most likely objects. On one H200 it read the horse in
100 % of real held-out clips but in 0 % of their tokenizer reconstructions and 0 % of every model's samples,
although the fine-tuned models' samples show horses (benchmarks/moving_digits_gan/personalize.png). This script
trains the classifier as the study does, on clean frames and on degraded ones (walt.metrics.digits.degrade), and
scores both on:

- real held-out horse clips, clean and blurred (Gaussian sigma 1 and 2, what a soft decoder does);
- real test clips of digits only (false alarms) and their digit accuracy;
- the generated frames in the study's pictures: personalize.png (rows: the base model's null-label samples, the
  LoRA model's and the fully fine-tuned model's new-class samples; 4 samples x first / middle / last frame) and
  samples.png (the base model's samples of the digits 0-9: none shows a horse).

    python benchmarks/subject_classifier.py --out subject_classifier.json       # the study's recipe (GPU: a minute)
    python benchmarks/subject_classifier.py --steps 400 --batch-size 64 --out ...   # 2-core CPU: about 20 minutes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from walt.metrics.digits import clip_digit_scores, digit_accuracy, gaussian_blur, train_digit_classifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from personalize import SUBJECT, SUBJECT_LABEL, Objects, shows_subject  # noqa: E402

from walt.data import MovingDigits, MovingSubject  # noqa: E402


def picture_clips(path: Path, tile: int = 64, frames: int = 3) -> torch.Tensor:
    """A study picture (rows of samples, each ``frames`` tiles wide) -> clips (rows, per_row, 3, frames, H, W)."""
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).float() / 127.5 - 1  # (R*H, C*W, 3)
    rows, cols = image.shape[0] // tile, image.shape[1] // (tile * frames)
    x = image.reshape(rows, tile, cols, frames, tile, 3)  # (R, H, C, F, W, 3)
    return x.permute(0, 2, 5, 3, 1, 4).contiguous()  # (R, C, 3, F, H, W)


def fixed_blur(videos: torch.Tensor, sigma: float) -> torch.Tensor:
    """Grey clips (N, 3, T, H, W) through a Gaussian blur of width exactly ``sigma``."""
    n, _, t, h, w = videos.shape
    frames = videos[:, 0].reshape(n * t, 1, h, w)  # (N*T, 1, H, W)
    out = gaussian_blur(frames, torch.full((n * t,), sigma))  # (N*T, 1, H, W)
    return out.reshape(n, 1, t, h, w).expand(-1, 3, -1, -1, -1)  # (N, 3, T, H, W)


def stack(dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    items = [dataset[i] for i in range(count)]
    return torch.stack([it["video"] for it in items]), torch.tensor([int(it["label"]) for it in items])


def scores(classifier, named: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: shows_subject(classifier, videos) for name, videos in named.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--clips", type=int, default=2048, help="digit clips to train on (the study's --classifier-clips)"
    )
    p.add_argument("--steps", type=int, default=1000, help="training steps (the study's --classifier-steps)")
    p.add_argument("--batch-size", type=int, default=256, help="frames per step (the study's 256)")
    p.add_argument("--held-out", type=int, default=128, help="real horse clips and real test clips to score")
    p.add_argument("--pictures", type=Path, default=ROOT / "benchmarks" / "moving_digits_gan")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    for name in ("personalize.png", "samples.png"):
        if not (args.pictures / name).is_file():
            raise SystemExit(
                f"--pictures {args.pictures}: no {name} there; give the folder of a personalize run's pictures "
                "(<out> of tools/moving_digits.py, or benchmarks/moving_digits_gan)"
            )

    subject, _ = stack(MovingSubject(SUBJECT, args.held_out, 17, 64, seed=4), args.held_out)
    test, test_labels = stack(MovingDigits("test", args.held_out, 17, 64, label="first"), args.held_out)
    study = picture_clips(args.pictures / "personalize.png")  # (3, 4, 3, F, H, W): base, LoRA, full
    digits = picture_clips(args.pictures / "samples.png").flatten(0, 1)  # (40, 3, F, H, W)
    evaluated = {
        "real_subject_clips": subject,
        "real_subject_clips_blur_sigma1": fixed_blur(subject, 1.0),
        "real_subject_clips_blur_sigma2": fixed_blur(subject, 2.0),
        "real_test_clips_digits_only": test,
        "gpu_samples_base_null_label": study[0],
        "gpu_samples_lora_new_class": study[1],
        "gpu_samples_full_new_class": study[2],
        "gpu_samples_base_digit_classes": digits,
    }
    data = Objects(args.clips, 64)
    results = {"command": " ".join(["python", *sys.argv]), "steps": args.steps, "batch_size": args.batch_size}
    for augment in (False, True):
        tic = time.perf_counter()
        clf = train_digit_classifier(
            data,
            steps=args.steps,
            batch_size=args.batch_size,
            num_classes=SUBJECT_LABEL + 1,
            progress=False,
            augment=augment,
        )
        row = {"train_seconds": time.perf_counter() - tic, **scores(clf, evaluated)}
        row["real_test_digit_accuracy_top2"] = digit_accuracy(clip_digit_scores(clf, test), test_labels, 2)
        results["degraded_frames" if augment else "clean_frames"] = row
        print(json.dumps({"augment": augment, **row}), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
