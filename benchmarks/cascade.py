"""Time and peak memory of W.A.L.T's cascade, stage by stage, for one 17-frame video at the paper's sizes.

  python benchmarks/cascade.py --out cascade.json            # one CUDA GPU, bf16 autocast, 50 DDIM steps/stage
  python benchmarks/cascade.py --tiny --out tiny.json        # tiny models on the CPU: checks the script runs

Stages (random weights: the work per step does not depend on them), run through the same code as
``walt sample --cascade``: a ``walt.pipeline.CascadePipeline`` of ``Pipeline`` stages, the SR stages with
``SuperResolution`` settings (x2 in space, the pixel path, augmentation level 0.1):
  base  W.A.L.T-L (24 x 1024, patch 1)  17x128x224  (latent 5x16x28): sample, then decode the video
  sr1   40 x 1408, patch 2              17x256x448  (latent 5x32x56): upsample the base video's pixels, encode,
                                                     sample, decode
  sr2   24 x 1024, patch 2              17x512x896  (latent 5x64x112): the same at the next size
Every stage decodes its own latents (the pipeline hands videos from stage to stage), one latent frame at a time
through the tokenizer's causal cache (``tokenizer_chunk_size=1``); each row gives that decode's share too
(``decode_seconds``, ``decode_peak_gib``). The cascade runs once with 1 step per stage (warm-up), then timed with
``--steps``. Peak memory is ``torch.cuda.max_memory_allocated`` during the stage, with all three models resident
(one shared tokenizer).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from walt.pipeline import CascadePipeline, Pipeline, SuperResolution
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT

GIB = 2**30

# (name, depth, width, heads, patch, latent (T, H, W)); latents are 8x smaller than pixels, 4x in time.
PAPER = [
    ("base", 24, 1024, 16, 1, (5, 16, 28)),
    ("sr1", 40, 1408, 16, 2, (5, 32, 56)),
    ("sr2", 24, 1024, 16, 2, (5, 64, 112)),
]
TINY = [
    ("base", 2, 32, 2, 1, (5, 2, 4)),
    ("sr1", 2, 32, 2, 2, (5, 4, 8)),
    ("sr2", 2, 32, 2, 2, (5, 8, 16)),
]


def build(args: argparse.Namespace, device: torch.device) -> list[tuple[str, Pipeline, int]]:
    """(name, pipeline, backbone parameters) per stage, all sharing one tokenizer."""
    tokenizer = CausalVAE(**presets["tiny" if args.tiny else "walt"]).to(device).eval().requires_grad_(False)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    stages = []
    for name, depth, width, heads, patch, size in TINY if args.tiny else PAPER:
        backbone = WALT(
            in_channels=tokenizer.latent_channels,
            depth=depth,
            hidden_size=width,
            num_heads=heads,
            patch_size=patch,
            input_size=size,
            lowres=name != "base",
            self_conditioning=True,
        )
        sr = None if name == "base" else SuperResolution(spatial_factor=2, temporal_factor=1, aug_level=0.1)
        pipe = Pipeline(
            backbone.eval().requires_grad_(False), tokenizer, tokenizer_chunk_size=1, super_resolution=sr
        )
        params = sum(p.numel() for p in backbone.parameters())
        stages.append((name, pipe.to(device, dtype), params))
    return stages


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def instrument(stages: list, rows: list[dict], device: torch.device) -> None:
    """Wraps each stage's ``generate`` and ``decode`` (on the instance, which ``CascadePipeline.generate`` calls)
    so that every call of a stage adds its row to ``rows``."""
    for name, pipe, params in stages:
        _instrument(name, pipe, params, rows, device)


def _instrument(name: str, pipe: Pipeline, params: int, rows: list[dict], device: torch.device) -> None:
    generate, decode = pipe.generate, pipe.decode
    seen: dict = {}

    def timed_decode(z: torch.Tensor) -> torch.Tensor:
        sync(device)
        seen.update(latent=list(z.shape[1:]), before_decode=peak(device))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        video = decode(z)
        sync(device)
        seen.update(decode_seconds=time.perf_counter() - start, decode_peak=peak(device))
        return video

    def timed_generate(*args, **kwargs) -> torch.Tensor:
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        videos = generate(*args, **kwargs)
        sync(device)
        seconds = time.perf_counter() - start
        peaks = [p for p in (seen["before_decode"], seen["decode_peak"], peak(device)) if p is not None]
        rows.append(
            dict(
                stage=name,
                params=params,
                latent=seen["latent"],
                video=list(videos.shape[1:]),
                seconds=seconds,
                peak_gib=max(peaks) if peaks else None,
                decode_seconds=seen["decode_seconds"],
                decode_peak_gib=seen["decode_peak"],
            )
        )
        return videos

    pipe.decode, pipe.generate = timed_decode, timed_generate


def cascade(runner: CascadePipeline, rows: list[dict], steps: int, device: torch.device) -> list[dict]:
    """One pass of ``runner.generate`` at ``steps`` DDIM steps per stage; a row per stage (from the instrumented
    stages), then one for the whole pass."""
    rows.clear()
    for settings in runner.stage_settings:
        settings["steps"] = steps
    sync(device)
    start = time.perf_counter()
    video = runner.generate(seeds=[0], batch_size=1, output="float", progress=False)
    sync(device)
    seconds = time.perf_counter() - start
    assert torch.isfinite(video).all()
    peaks = [r["peak_gib"] for r in rows if r["peak_gib"] is not None]
    total = dict(
        stage="cascade", video=list(video.shape[1:]), seconds=seconds, peak_gib=max(peaks, default=None)
    )
    return [*rows, total]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per stage")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU check)")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(0)
    with torch.device(device):  # builds the 1B-parameter stages on the GPU directly
        stages = build(args, device)
    rows: list[dict] = []
    instrument(stages, rows, device)
    runner = CascadePipeline([pipe for _, pipe, _ in stages], [{} for _ in stages])
    cascade(runner, rows, 1, device)  # warm-up: kernels, allocator
    rows = cascade(runner, rows, args.steps, device)
    rows[-1].update(
        steps_per_stage=args.steps,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        dtype="bf16 autocast" if device.type == "cuda" else "float32",
    )
    for row in rows:
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
