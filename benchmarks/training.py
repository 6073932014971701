"""Training speed of the library's own step: ``walt fit``'s loop (Lightning Trainer, DiffusionModule with
self-conditioning, label dropout, AdamW and the EMA update) on in-memory latents, eager or compiled.

Cases:
  moving_digits  the MovingDigits base model (configs/moving_digits/base.yaml): WALT 12 x 512, batch 128 of
                 8 x 5 x 8 x 8 latents, 10 classes
  xl             W.A.L.T-XL, batch 4 of 8 x 16 x 16 x 16 latents (the grid of the transformer benchmark), 101
                 classes; with self-conditioning each step has a third forward pass (no gradient, over the whole
                 batch; 10 % of the estimates are then zeroed), so it costs more than benchmarks/transformer.py's
                 bare step
  l              W.A.L.T-L, batch 8 of 8 x 5 x 16 x 16 latents (the paper's grid)

Reports milliseconds per optimizer step (wall time over ``--steps`` steps after ``--warmup``, GPU synchronized at
both ends), and with ``--profile`` where the GPU time of a few steps goes (benchmarks/profiling.py).

With ``--devices N --strategy ddp|fsdp`` the same step runs data-parallel on N GPUs with the strategy of
configs/distributed/<strategy>.yaml (so it measures what ``walt fit`` runs), at the same per-GPU batch. The row
then holds the slowest rank's step time and the largest per-GPU peak memory; the scaling efficiency from 1 to N
GPUs is ms_per_step(1) / ms_per_step(N).

    python benchmarks/training.py --cases moving_digits xl --out training.json [--compile] [--profile]
    python benchmarks/training.py --cases xl --compile --devices 8 --strategy ddp --out xl_ddp8.json
    python benchmarks/training.py --cases xl --compile --devices 2 --strategy ddp --optimize-ddp no_optimization
    python benchmarks/training.py --smoke [--devices 2 --strategy ddp]   # tiny case on the CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiling import profile_steps, summary

from walt.lightning import DiffusionModule
from walt.transformer import WALT
from walt.transformer import presets as sizes

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "distributed"

CASES = {
    "moving_digits": dict(
        size=dict(depth=12, hidden_size=512, num_heads=8), grid=(5, 8, 8), batch=128, classes=10, lr=1e-3
    ),
    "xl": dict(size=sizes["XL"], grid=(16, 16, 16), batch=4, classes=101, lr=1e-4),
    "l": dict(size=sizes["L"], grid=(5, 16, 16), batch=8, classes=101, lr=1e-4),
    "smoke": dict(
        size=dict(depth=2, hidden_size=32, num_heads=2), grid=(2, 4, 4), batch=2, classes=3, lr=1e-3
    ),
}


class RandomLatents(Dataset):
    """Fixed random latents and labels, like a LatentShards folder already in memory."""

    def __init__(self, num: int, grid: tuple[int, int, int], classes: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.latent = torch.randn(num, 8, *grid, generator=gen)
        self.label = torch.randint(0, classes, (num,), generator=gen)

    def __len__(self) -> int:
        return len(self.latent)

    def __getitem__(self, i: int) -> dict:
        return {"latent": self.latent[i], "label": self.label[i]}


class StepTimer(L.Callback):
    """Wall time of the steps after warm-up, GPU synchronized only at the two ends; with ``profile``, then a
    profile of the same step (while the module is still on the GPU: Lightning moves it off after fit)."""

    def __init__(self, warmup: int, steps: int, profile: bool) -> None:
        self.warmup, self.steps, self.profile = warmup, steps, profile
        self.ms_per_step: float | None = None
        self.peak_gib: float | None = None
        self.profile_result: dict | None = None
        self._tic = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            _sync()
            self._tic = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            _sync()
            ms = 1000 * (time.perf_counter() - self._tic) / self.steps
            peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
            ms, peak = trainer.strategy.reduce(  # the slowest rank and the fullest GPU
                torch.tensor([ms, peak], dtype=torch.float64, device=module.device), reduce_op="max"
            ).tolist()
            self.ms_per_step, self.peak_gib = ms, peak
            if self.profile and torch.cuda.is_available():
                self.profile_result = profile_module_steps(
                    module, trainer.optimizers[0], batch, self.ms_per_step
                )
            trainer.should_stop = True


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(case: dict, compile: bool) -> DiffusionModule:
    backbone = WALT(
        in_channels=8,
        input_size=case["grid"],
        num_classes=case["classes"],
        self_conditioning=True,
        **case["size"],
    )
    optimizer = lambda params: torch.optim.AdamW(params, lr=case["lr"], betas=(0.9, 0.99), weight_decay=0.0)
    return DiffusionModule(
        backbone, optimizer=optimizer, warmup_steps=100, ema_decay=0.999, num_log_samples=0, compile=compile
    )


def strategy_from_config(name: str) -> tuple[Strategy, str | None]:
    """The Lightning strategy (and precision, if set) of configs/distributed/<name>.yaml, built as `walt fit`
    builds it."""
    trainer = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["trainer"]
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    strategy = parser.instantiate(parser.parse_object({"strategy": trainer["strategy"]})).strategy
    return strategy, trainer.get("precision")


def run(name: str, args: argparse.Namespace) -> tuple[dict, bool]:
    """The row of one case, and whether this process reports it (rank 0)."""
    case = CASES[name]
    cuda = torch.cuda.is_available() and not args.smoke
    module = build(case, args.compile)
    steps = args.warmup + args.steps + 1
    data = RandomLatents(case["batch"] * steps * args.devices, case["grid"], case["classes"])
    loader = DataLoader(data, batch_size=case["batch"], shuffle=True, drop_last=True)
    timer = StepTimer(args.warmup, args.steps, args.profile)
    strategy, precision = strategy_from_config(args.strategy) if args.strategy else ("auto", None)
    if args.ddp_comm_hook:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        strategy._ddp_comm_hook = getattr(default_hooks, f"{args.ddp_comm_hook}_compress_hook")
    if args.bucket_cap_mb is not None:
        strategy._ddp_kwargs["bucket_cap_mb"] = args.bucket_cap_mb
    if args.optimize_ddp is not None:
        # How dynamo meets DDP: by default (ddp_optimizer) it splits the compiled graph at DDP's bucket
        # boundaries so all-reduces overlap the backward; no_optimization compiles one graph and all-reduces after.
        torch._dynamo.config.optimize_ddp = args.optimize_ddp
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=args.devices,
        strategy=strategy,
        precision=precision or ("bf16-mixed" if cuda else "32-true"),
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, loader)
    row = {
        "case": name,
        "devices": args.devices,
        "strategy": args.strategy or "single device",
        "ddp_comm_hook": args.ddp_comm_hook,
        "optimize_ddp": args.optimize_ddp,
        "bucket_cap_mb": args.bucket_cap_mb,
        "compile": args.compile,
        "batch": case["batch"],
        "grid": "x".join(map(str, case["grid"])),
        "params_m": sum(p.numel() for p in module.backbone.parameters()) / 1e6,
        "ms_per_step": timer.ms_per_step,
        "peak_gib": timer.peak_gib if cuda else None,  # per GPU, the largest over ranks
        "device": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    if timer.profile_result is not None:
        row["profile"] = timer.profile_result
        print(summary(row["profile"]), flush=True)
    return row, trainer.is_global_zero


def profile_module_steps(
    module: DiffusionModule, optimizer: torch.optim.Optimizer, batch: dict, wall_ms: float
) -> dict:
    """The same step outside the Trainer's loop (loss, backward, AdamW, EMA), profiled: the kernels."""

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            loss = module._loss(batch, train=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.ema.update(module.backbone)

    for _ in range(3):
        step()
    return profile_steps(step, wall_ms)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cases", nargs="+", choices=[c for c in CASES if c != "smoke"], default=["moving_digits"]
    )
    p.add_argument("--compile", action="store_true", help="DiffusionModule(compile=True)")
    p.add_argument("--profile", action="store_true", help="add a kernel breakdown of the step (GPU)")
    p.add_argument("--devices", type=int, default=1, help="GPUs (CPU processes with --smoke)")
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="configs/distributed/<strategy>.yaml")
    p.add_argument(
        "--ddp-comm-hook",
        choices=["bf16", "fp16"],
        help="DDP: compress gradients to this dtype for the all-reduce",
    )
    p.add_argument(
        "--optimize-ddp",
        choices=["ddp_optimizer", "no_optimization"],
        help="DDP with --compile: torch._dynamo.config.optimize_ddp (default: torch's, ddp_optimizer)",
    )
    p.add_argument("--bucket-cap-mb", type=float, help="DDP: gradient bucket size (default: Lightning's, 25)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", help="write the rows as JSON here")
    args = p.parse_args()
    if args.devices > 1 and not args.strategy:
        p.error("--devices > 1 needs --strategy ddp or fsdp")
    if args.devices > 1 and len(args.cases) > 1:  # the other ranks re-run this script: one Trainer per run
        p.error("with --devices > 1 give one case per run")
    if args.devices > 1 and args.profile:
        p.error("--profile runs the step outside the Trainer, without the strategy: profile one GPU")
    if args.smoke:
        args.cases, args.warmup, args.steps = ["smoke"], 1, 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    rows = []
    for name in args.cases:
        row, report = run(name, args)
        if not report:  # other ranks: rank 0 reports the reduced figures
            continue
        rows.append(row)
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "profile"}), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
