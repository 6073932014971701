"""Sampling speed of the base model: seconds per video, DDIM steps and decoding to pixels included.

The case of the performance target: W.A.L.T-L (24 x 1024, patch 1, class-conditional, self-conditioning) on
17x128x128 videos (latent 8 x 5 x 16 x 16), 50 DDIM steps, batch 16, the "walt" tokenizer decoding the result;
with guidance the conditional and unconditional passes run as one batch of 32. Random weights (the work does not
depend on them), bf16 autocast. Each case runs once to warm up (and compile), then ``--repeats`` timed runs.

    python benchmarks/sampling.py --out sampling.json [--compile]
    python benchmarks/sampling.py --smoke              # tiny models on the CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiling import profile_steps, summary

from walt.lightning import BaseDiffusionModule
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT
from walt.transformer import presets as sizes

NUM_CLASSES = 101  # UCF-101


def build(smoke: bool, device: torch.device) -> BaseDiffusionModule:
    tokenizer = CausalVAE(**presets["tiny" if smoke else "walt"], variational=False)
    size = dict(depth=2, hidden_size=64, num_heads=2) if smoke else sizes["L"]
    backbone = WALT(
        in_channels=tokenizer.latent_channels,
        input_size=(5, 4, 4) if smoke else (5, 16, 16),
        num_classes=NUM_CLASSES,
        self_conditioning=True,
        **size,
    )
    module = BaseDiffusionModule(backbone, tokenizer, ema_decay=None)
    return module.to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_case(module, args, device, guidance: float) -> dict:
    backbone = module.sampling_backbone
    shape = (backbone.in_channels, *backbone.input_size)
    labels = torch.arange(args.batch, device=device) % NUM_CLASSES
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def once(steps: int) -> float:
        gen = torch.Generator(device=device).manual_seed(0)
        synchronize(device)
        tic = time.perf_counter()
        with autocast:
            videos = module.sample(
                args.batch, shape, labels=labels, guidance=guidance, steps=steps, generator=gen
            )
        synchronize(device)
        assert videos.shape[:2] == (args.batch, 3) and torch.isfinite(videos).all()
        return time.perf_counter() - tic

    once(args.steps)  # warm-up: cuDNN algorithm search, compilation for both batch sizes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [once(args.steps) for _ in range(args.repeats)]
    seconds = statistics.median(times)
    profiled = (
        profile_steps(lambda: once(args.steps), 1000 * seconds, iters=1)
        if args.profile and device.type == "cuda"
        else None
    )
    if profiled:
        print(f"guidance {guidance}: " + summary(profiled), flush=True)
    return {
        "profile": profiled,
        "guidance": guidance,
        "batch": args.batch,
        "steps": args.steps,
        "compile": args.compile,
        "mode": args.mode,
        "compile_decoder": args.compile_decoder,
        "seconds_per_batch": seconds,
        "seconds_per_video": seconds / args.batch,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "runs": times,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0])
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (fullgraph)")
    p.add_argument("--mode", help="torch.compile mode of the backbone, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--compile-decoder", action="store_true", help="torch.compile the tokenizer's decoder")
    p.add_argument("--profile", action="store_true", help="add a kernel breakdown of one run (GPU)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.steps, args.repeats = 2, 3, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    torch.manual_seed(0)
    module = build(args.smoke, device)
    if args.compile:
        module.backbone = torch.compile(module.backbone, fullgraph=True, mode=args.mode)
    if args.compile_decoder:  # the causal cache is Python state: graph breaks are allowed here
        module.tokenizer.decoder = torch.compile(module.tokenizer.decoder)
    rows = []
    for guidance in args.guidance:
        row = run_case(module, args, device, guidance)
        row["device"] = (
            torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
        )
        row["torch"] = torch.__version__
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
