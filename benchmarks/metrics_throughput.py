"""Throughput of the metric networks, and their agreement with the reference logits on this device.

    python benchmarks/metrics_throughput.py                 # full configuration (GPU)
    python benchmarks/metrics_throughput.py --smoke         # tiny configuration, runs on CPU in seconds

Reports, as JSON: I3D clips/s (16-frame 128x128 uint8 clips, resize to 224 included), Inception images/s
(128x128, resize to 299 included), LPIPS forward+backward pairs/s (128x128, as the tokenizer's loss), the time
the 2 x 2048 clips of ``fvd2048_16f`` would take, and the largest relative error of the I3D logits against
tests/fixtures/i3d_reference.npz (the original Flax network) on this device, which must stay below 1e-4.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from walt.metrics import I3D, LPIPS, InceptionV3

FIXTURE = Path(__file__).parents[1] / "tests" / "fixtures" / "i3d_reference.npz"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn, items: int, iters: int, device: torch.device) -> float:
    fn()  # warm-up: kernel selection, allocator
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return items * iters / (time.perf_counter() - start)


def i3d_reference_error(i3d: I3D) -> float:
    with np.load(FIXTURE) as ref:
        shape = tuple(int(s) for s in ref["random_clips_shape"])
        clips = np.random.default_rng(int(ref["seed"])).integers(0, 256, size=shape, dtype=np.uint8)
        logits = i3d.features(clips).double().cpu().numpy()
        return float(np.abs(logits - ref["logits_random"]).max() / np.abs(ref["logits_random"]).max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny configuration on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.device, args.batch_size, args.iters = "cpu", 1, 1
    device = torch.device(args.device)
    b, rng = args.batch_size, np.random.default_rng(0)

    i3d = I3D().to(device)
    clips = torch.from_numpy(rng.integers(0, 256, size=(b, 16, 128, 128, 3), dtype=np.uint8)).to(device)
    i3d_rate = _rate(lambda: i3d.features(clips), b, args.iters, device)

    inception = InceptionV3().to(device)
    images = torch.from_numpy(rng.integers(0, 256, size=(b, 128, 128, 3), dtype=np.uint8)).to(device)
    inception_rate = _rate(lambda: inception.features(images), b, args.iters, device)

    lpips = LPIPS().to(device)
    x = torch.rand(b, 3, 128, 128, device=device).mul(2).sub(1).requires_grad_(True)
    y = torch.rand(b, 3, 128, 128, device=device).mul(2).sub(1)
    lpips_rate = _rate(lambda: lpips(x, y).sum().backward(), b, args.iters, device)

    result = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
        "batch_size": b,
        "i3d_clips_per_s": round(i3d_rate, 2),
        "fvd2048_16f_feature_seconds": round(4096 / i3d_rate, 1),
        "inception_images_per_s": round(inception_rate, 2),
        "fid50k_feature_seconds": round(100_000 / inception_rate, 1),
        "lpips_fwd_bwd_pairs_per_s": round(lpips_rate, 2),
        "i3d_max_relative_error_vs_flax": i3d_reference_error(i3d),
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if result["i3d_max_relative_error_vs_flax"] >= 1e-4:
        raise SystemExit("I3D logits disagree with the Flax reference on this device (>= 1e-4 relative)")


if __name__ == "__main__":
    main()
