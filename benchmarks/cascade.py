"""Time and peak memory of W.A.L.T's cascade, stage by stage, for one 17-frame video at the paper's sizes.

  python benchmarks/cascade.py --out cascade.json            # one CUDA GPU, bf16 autocast, 50 DDIM steps/stage
  python benchmarks/cascade.py --tiny --out tiny.json        # tiny models on the CPU: checks the script runs

Stages (random weights: the work per step does not depend on them), run through the same code as
``walt sample --cascade`` (``BaseDiffusionModule.sample_latents``, ``walt.lightning.cascade.upsample_stage``,
``decode_latents``):
  base  W.A.L.T-L (24 x 1024, patch 1)  17x128x224  (latent 5x16x28)
  sr1   40 x 1408, patch 2              17x256x448  (latent 5x32x56): decode the base latent, upsample the pixels,
                                                     encode, then sample
  sr2   24 x 1024, patch 2              17x512x896  (latent 5x64x112): the same at the next size
  decode  the 17x512x896 video, one latent frame at a time through the tokenizer's causal cache
Each stage runs once with 1 step (warm-up), then timed with ``--steps``. Peak memory is
``torch.cuda.max_memory_allocated`` during the stage, with all three models resident (one shared tokenizer).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from walt.lightning import BaseDiffusionModule, SuperResolutionModule
from walt.lightning.cascade import CascadeStage, decode_latents, upsample_stage
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


def build(args: argparse.Namespace, device: torch.device) -> tuple[list, CausalVAE]:
    tokenizer = CausalVAE(**presets["tiny" if args.tiny else "walt"]).to(device).eval()
    modules = []
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
        ).to(device)
        if name == "base":
            module = BaseDiffusionModule(backbone, tokenizer, ema_decay=None)
        else:
            module = SuperResolutionModule(backbone, tokenizer, ema_decay=None, tokenizer_chunk_size=1)
        params = sum(p.numel() for p in backbone.parameters())
        modules.append((name, module.to(device).eval(), size, params))
    return modules, tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_stage(fn, device: torch.device) -> tuple[object, float, float | None]:
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return out, seconds, peak


@torch.no_grad()
def cascade(modules: list, tokenizer: CausalVAE, steps: int, device: torch.device) -> list[dict]:
    """One pass through the cascade at ``steps`` DDIM steps per stage; a row per stage."""
    generator = torch.Generator(device=device).manual_seed(0)
    stage = CascadeStage(config="", checkpoint="", steps=steps)
    name, base, size, params = modules[0]
    z, seconds, peak = run_stage(
        lambda: base.sample_latents(1, (tokenizer.latent_channels, *size), steps=steps, generator=generator),
        device,
    )
    rows = [dict(stage=name, params=params, latent=list(z.shape[1:]), seconds=seconds, peak_gib=peak)]
    for name, module, _, params in modules[1:]:
        z, seconds, peak = run_stage(
            lambda m=module, z=z: upsample_stage(m, z, tokenizer, stage, None, generator, 1, 1), device
        )
        rows.append(dict(stage=name, params=params, latent=list(z.shape[1:]), seconds=seconds, peak_gib=peak))
    video, seconds, peak = run_stage(lambda: decode_latents(tokenizer, z, 1, 1, device), device)
    rows.append(
        dict(stage="decode", params=None, video=list(video.shape[1:]), seconds=seconds, peak_gib=peak)
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per stage")
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU check)")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    torch.manual_seed(0)
    with torch.device(device):  # builds the 1B-parameter stages on the GPU directly
        modules, tokenizer = build(args, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        cascade(modules, tokenizer, 1, device)  # warm-up: kernels, allocator
        rows = cascade(modules, tokenizer, args.steps, device)
    peaks = [r["peak_gib"] for r in rows if r["peak_gib"] is not None]
    total = dict(
        stage="cascade",
        seconds=sum(r["seconds"] for r in rows),
        peak_gib=max(peaks) if peaks else None,
        steps_per_stage=args.steps,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        dtype="bf16 autocast" if device.type == "cuda" else "float32",
    )
    rows.append(total)
    for row in rows:
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
