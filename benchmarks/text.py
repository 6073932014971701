"""Cost of text conditioning: the text encoder's throughput and the backbone step with cross-attention.

1. Text encoder (MiniLM offline default, or a local T5 with --t5): captions per second encoding distinct
   captions in batches, in float32 and bfloat16, and per second when every caption is a cache hit.
2. W.A.L.T-L on the paper's 5 x 16 x 16 latent grid, one training step (forward + backward, bf16 autocast):
   class-conditional vs text-conditional (cross-attention over ``--text-len`` tokens of ``--text-dim``, T5-XXL's
   4096 by default), median step time and peak memory.

    python benchmarks/text.py --out text.json [--t5 checkpoints/t5-v1_1-xxl]
    python benchmarks/text.py --smoke --out smoke.json     # tiny sizes on CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch
import torch.nn.functional as F
from transformer import time_steps  # benchmarks/transformer.py: one timing loop for every benchmark

from walt.conditioning import Conditioning, MiniLMTextEncoder, T5TextEncoder
from walt.transformer import WALT


def captions(n: int, offset: int = 0) -> list[str]:
    colours, things = ["red", "green", "blue", "yellow", "white"], ["dog", "car", "bird", "boat", "kite"]
    return [
        f"a {colours[i % 5]} {things[(i // 5) % 5]} moving across the frame, shot {i + offset} at sunset"
        for i in range(n)
    ]


def encoder_rates(args: argparse.Namespace, device: torch.device) -> dict:
    results = {}
    for precision in ("float32", "bfloat16"):
        with tempfile.TemporaryDirectory() as cache:
            kwargs = dict(precision=precision, cache_dir=cache, batch_size=args.encode_batch)
            encoder = T5TextEncoder(args.t5, **kwargs) if args.t5 else MiniLMTextEncoder(**kwargs)
            encoder.encode(captions(args.encode_batch, offset=10**6), device)  # load and warm up
            texts = captions(args.num_captions)
            sync(device)
            tic = time.perf_counter()
            encoder.encode(texts, device)
            sync(device)
            miss = time.perf_counter() - tic
            encoder._memory.clear()  # hits from disk, as a fresh process would see them
            tic = time.perf_counter()
            encoder.encode(texts, device)
            sync(device)
            hit = time.perf_counter() - tic
            results[precision] = {
                "encoder": encoder.identity,
                "captions_per_s": len(texts) / miss,
                "cached_captions_per_s": len(texts) / hit,
            }
    return results


def step_case(text_dim: int | None, args: argparse.Namespace, device: torch.device) -> dict:
    size = (
        dict(depth=2, hidden_size=64, num_heads=4)
        if args.smoke
        else dict(depth=24, hidden_size=1024, num_heads=16)
    )
    grid = (5, 4, 4) if args.smoke else (5, 16, 16)
    model = WALT(
        in_channels=8,
        input_size=grid,
        num_classes=None if text_dim else 101,
        text_dim=text_dim,
        self_conditioning=True,
        **size,
    ).to(device)
    x = torch.randn(args.batch, 8, *grid, device=device)
    t = torch.rand(args.batch, device=device)
    if text_dim:
        mask = torch.arange(args.text_len, device=device)[None] < torch.randint(
            4, args.text_len + 1, (args.batch, 1), device=device
        )  # (B, L): captions of different lengths, right-padded
        cond = Conditioning(
            text=torch.randn(args.batch, args.text_len, text_dim, device=device), text_mask=mask
        )
    else:
        cond = Conditioning(labels=torch.randint(0, 101, (args.batch,), device=device))
    cond.self_cond = torch.zeros_like(x)
    target = torch.randn_like(x)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.mse_loss(model(x, t, cond).float(), target)
        loss.backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = time_steps(step, args.warmup, args.iters, device.type == "cuda")
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "conditioning": f"text {args.text_len} x {text_dim}" if text_dim else "class",
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "step_ms": ms,
        "peak_GiB": peak,
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="write the results as JSON to this path")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU")
    parser.add_argument("--t5", help="a local T5 folder to measure instead of MiniLM")
    parser.add_argument("--num-captions", type=int, default=4096)
    parser.add_argument("--encode-batch", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8, help="backbone batch (per GPU in the L config: 32)")
    parser.add_argument("--text-len", type=int, default=128)
    parser.add_argument("--text-dim", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if args.smoke:
        args.num_captions, args.encode_batch, args.batch, args.text_len, args.text_dim = 64, 32, 2, 16, 32
        args.warmup, args.iters = 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    results = {
        "machine": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "args": vars(args),
        "encoder": encoder_rates(args, device),
        "backbone": [step_case(None, args, device), step_case(args.text_dim, args, device)],
    }
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
