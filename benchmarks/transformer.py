"""Training-step speed of the W.A.L.T backbone: window vs full vs factorized attention at matched size.

Measures one optimization step (forward + backward, optionally + AdamW) in bf16 autocast: median step time
over timed iterations (CUDA events, after warm-up), achieved TFLOP/s (FLOPs counted once with
torch.utils.flop_counter.FlopCounterMode on the eager model) and peak allocated memory.

Cases: XL at batch 4 on a 16 x 16 x 16 latent token grid (the grid of the Latte-XL/2 anchor) and L on the
paper's 5 x 16 x 16 grid, each with the three attention patterns:
  window      spatial (1 x H x W) alternating with spatiotemporal (5 x 8 x 8, fitted to the grid)
  full        every layer attends over all T x H x W tokens
  factorized  spatial (1 x H x W) alternating with temporal-only (T x 1 x 1)

    python benchmarks/transformer.py --out results.json [--compile] [--optimizer]
    python benchmarks/transformer.py --compile --optimizer --models XL --attention window --latte
        # and the Latte-XL/2 anchor (benchmarks/latte.py), timed first and last in the same run
    python benchmarks/transformer.py --compile --optimizer --models XL --attention window --latte --fused-norm both
        # walt's blocks with the unfused and the fused (Triton) modulated LayerNorms, in the same run
    python benchmarks/transformer.py --smoke            # tiny configuration on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from latte import LatteXL2
from profiling import profile_steps, summary

from walt.conditioning import Conditioning
from walt.nn import fit_window
from walt.nn.fused_norm import fused_norm_problem
from walt.transformer import WALT, WALT_WINDOWS
from walt.transformer.float8 import FLOAT8_LAYERS, FLOAT8_RECIPES, check_float8_device, convert_to_float8

H100_BF16_DENSE_TFLOPS = 798.0  # measured bf16 matmul ceiling of the reference H100 (DESIGN.md §4)
LATENT_CHANNELS = 8
NUM_CLASSES = 101  # UCF-101, the paper's class-conditional benchmark
LATTE = "Latte-XL/2"

SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}

ATTENTION = {
    "window": WALT_WINDOWS,
    "full": ((-1, -1, -1),),
    "factorized": ((1, -1, -1), (-1, 1, 1)),
}


@dataclass
class Case:
    preset: str
    batch: int
    grid: tuple[int, int, int]  # latent (T, H, W); patch size 1, so also the token grid
    attention: str
    fused_norm: bool = False


@dataclass
class Result:
    preset: str
    attention: str
    fused_norm: bool
    windows: str
    batch: int
    grid: str
    params_m: float
    gflop_per_step: float
    attention_flop_share: float
    step_ms: float
    tflops: float
    fraction_of_peak: float
    peak_mem_gib: float | None
    profile: dict | None = None


def build_model(case: Case, model_kwargs: dict, device: torch.device) -> torch.nn.Module:
    if case.preset == LATTE:  # the anchor: 2x2 patches of a 4-channel latent, the same token grid
        depth = model_kwargs.get("depth", 28)
        return LatteXL2(frames=case.grid[0], size=2 * case.grid[1], depth=depth).to(device).train()
    model = WALT.from_preset(
        case.preset,
        **model_kwargs,
        in_channels=LATENT_CHANNELS,
        input_size=case.grid,
        windows=ATTENTION[case.attention],
        num_classes=NUM_CLASSES,
        self_conditioning=True,
    )
    return model.fuse_norms(case.fused_norm).to(device).train()


def make_batch(case: Case, device: torch.device) -> tuple[tuple, torch.Tensor]:
    """(the model's inputs, the regression target)."""
    t = torch.rand(case.batch, device=device)
    labels = torch.randint(0, NUM_CLASSES, (case.batch,), device=device)
    if case.preset == LATTE:
        grid = (case.grid[0], 2 * case.grid[1], 2 * case.grid[2])
        x = torch.randn(case.batch, 4, *grid, device=device)
        return (x, t, labels), torch.randn(case.batch, 8, *grid, device=device)  # noise and variance
    x = torch.randn(case.batch, LATENT_CHANNELS, *case.grid, device=device)
    cond = Conditioning(labels=labels, self_cond=torch.zeros_like(x))
    return (x, t, cond), torch.randn_like(x)


def make_step(model, optimizer, batch, autocast_device: str):
    inputs, target = batch

    def step() -> None:
        with torch.autocast(autocast_device, dtype=torch.bfloat16):
            loss = F.mse_loss(model(*inputs).float(), target)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        model.zero_grad(set_to_none=True)

    return step


def count_flops(step) -> tuple[float, float]:
    """(total FLOPs of one step, share spent in attention kernels)."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    counts = counter.get_flop_counts().get("Global", {})
    total = sum(counts.values())
    attention = sum(v for op, v in counts.items() if "attention" in str(op))
    return float(total), attention / max(total, 1)


def time_steps(step, warmup: int, iters: int, cuda: bool) -> float:
    """Median step time in milliseconds."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            times.append(1000 * (time.perf_counter() - begin))
    return statistics.median(times)


def run_case(case: Case, args: argparse.Namespace, model_kwargs: dict, device: torch.device) -> Result:
    cuda = device.type == "cuda"
    model = build_model(case, model_kwargs, device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda) if args.optimizer else None
    batch = make_batch(case, device)
    # Model FLOPs: the recomputation that activation checkpointing adds is not useful work.
    model.gradient_checkpointing = False
    flops, attention_share = count_flops(make_step(model, None, batch, device.type))
    model.gradient_checkpointing = args.checkpointing
    # After counting: model FLOPs are the bf16 model's, the same math in FP8. The anchor stays as it was
    # measured, in bf16: --float8 is a lever of walt's blocks.
    if args.float8 and case.preset != LATTE:
        convert_to_float8(model, args.float8, args.float8_layers)
    runnable = torch.compile(model, fullgraph=True, mode=args.mode) if args.compile else model
    step = make_step(runnable, optimizer, batch, device.type)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel([SDPA_BACKENDS[args.sdpa]]) if args.sdpa else contextlib.nullcontext():
        ms = time_steps(step, args.warmup, args.iters, cuda)
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        profiled = profile_steps(step, ms) if args.profile and cuda else None
    if profiled:
        print(summary(profiled), flush=True)
    tflops = flops / (ms / 1000) / 1e12
    fitted = [fit_window(case.grid, w) for w in ATTENTION[case.attention]]
    del model, runnable, optimizer, step
    if cuda:
        torch.cuda.empty_cache()
    return Result(
        preset=case.preset,
        attention=case.attention,
        fused_norm=case.fused_norm,
        windows=" / ".join("x".join(map(str, w)) for w in fitted),
        batch=case.batch,
        grid="x".join(map(str, case.grid)),
        params_m=params / 1e6,
        gflop_per_step=flops / 1e9,
        attention_flop_share=attention_share,
        step_ms=ms,
        tflops=tflops,
        fraction_of_peak=tflops / H100_BF16_DENSE_TFLOPS,
        peak_mem_gib=peak,
        profile=profiled,
    )


def markdown(results: list[Result]) -> str:
    lines = [
        "| model | attention | windows (fitted) | norms | batch | grid | params | GFLOP/step | attn FLOP"
        " | step ms | TFLOP/s | of 798 | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peak = f"{r.peak_mem_gib:.1f}" if r.peak_mem_gib is not None else "-"
        norms = "-" if r.preset == LATTE else "fused" if r.fused_norm else "unfused"
        lines.append(
            f"| {r.preset} | {r.attention} | {r.windows} | {norms} | {r.batch} | {r.grid} | {r.params_m:.1f}M"
            f" | {r.gflop_per_step:,.0f} | {100 * r.attention_flop_share:.0f}% | {r.step_ms:.1f}"
            f" | {r.tflops:.0f} | {100 * r.fraction_of_peak:.0f}% | {peak} |"
        )
    return "\n".join(lines)


def cases(args: argparse.Namespace) -> list[Case]:
    fused = {"off": [False], "on": [True], "both": [False, True]}[args.fused_norm]
    if args.smoke:
        return [Case("S", 1, (4, 16, 16), a, f) for a in args.attention for f in fused] + (
            [Case(LATTE, 1, (4, 8, 8), "factorized")] if args.latte else []
        )
    setups = {"XL": (args.batch_xl, (16, 16, 16)), "L": (args.batch_l, (5, 16, 16))}
    walt = [Case(name, *setups[name], a, f) for name in args.models for a in args.attention for f in fused]
    if not args.latte:
        return walt
    # first and last: the GPU's clocks drift over a run, so the anchor brackets the cases it is compared with
    latte = Case(LATTE, args.batch_xl, (16, 16, 16), "factorized")
    return [latte, *walt, latte]


def write_json(path: str, args: argparse.Namespace, device: torch.device, results: list[Result]) -> None:
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "compile": args.compile,
        "compile_mode": args.mode,
        "optimizer": args.optimizer,
        "checkpointing": args.checkpointing,
        "fused_norm": args.fused_norm,
        "float8": args.float8,
        "float8_layers": list(args.float8_layers) if args.float8 else None,
        "dtype": "bf16 autocast, fp32 parameters"
        + (f", FP8 {args.float8} matmuls in the blocks" if args.float8 else ""),
    }
    with open(path, "w") as f:
        json.dump(
            {"meta": meta, "results": [asdict(r) for r in results], "table": markdown(results)}, f, indent=2
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="write results as JSON to this path (rewritten after each case)")
    parser.add_argument("--smoke", action="store_true", help="tiny 2-layer model on CPU (checks the script)")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the model")
    parser.add_argument(
        "--mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: default)"
    )
    parser.add_argument("--optimizer", action="store_true", help="include a fused AdamW step in each step")
    parser.add_argument(
        "--float8", choices=FLOAT8_RECIPES, help="FP8 matmuls in the blocks' linears (torchao; FP8 GPUs only)"
    )
    parser.add_argument(
        "--float8-layers",
        nargs="+",
        choices=FLOAT8_LAYERS,
        default=list(FLOAT8_LAYERS),
        help="which of each block's linears --float8 converts (default all four)",
    )
    parser.add_argument(
        "--fused-norm",
        choices=["off", "on", "both"],
        default="off",
        help="walt's blocks with the Triton modulated-LayerNorm kernels (walt.nn.fused_norm); "
        "both: each walt case unfused, then fused",
    )
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    parser.add_argument("--profile", action="store_true", help="add a kernel breakdown of the step (GPU)")
    parser.add_argument(
        "--sdpa", choices=list(SDPA_BACKENDS), help="restrict SDPA to one kernel (fails where it cannot run)"
    )
    parser.add_argument("--models", nargs="+", choices=["XL", "L"], default=["XL", "L"])
    parser.add_argument("--attention", nargs="+", choices=list(ATTENTION), default=list(ATTENTION))
    parser.add_argument(
        "--latte",
        action="store_true",
        help="time the Latte-XL/2 anchor (benchmarks/latte.py) first and last, at the XL batch and token grid",
    )
    parser.add_argument("--batch-xl", type=int, default=4)
    parser.add_argument("--batch-l", type=int, default=8, help="per-GPU batch of the L cases")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()

    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device; use --smoke for the CPU check")
    if args.float8:
        try:
            check_float8_device(device)
        except ValueError as err:
            parser.error(str(err))
    if args.fused_norm != "off":
        problem = fused_norm_problem(device)
        if problem:
            parser.error(problem)
    model_kwargs = {"gradient_checkpointing": args.checkpointing}
    if args.smoke:
        model_kwargs["depth"] = 2
        args.warmup, args.iters = 1, 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)

    results = []
    for case in cases(args):
        results.append(run_case(case, args, model_kwargs, device))
        print(markdown(results[-1:]).splitlines()[-1], flush=True)
        if args.out:
            write_json(args.out, args, device, results)
    print(markdown(results))


if __name__ == "__main__":
    main()
