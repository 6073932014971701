"""What one training batch of the tokenizer costs, by part: without the discriminator, with it (R1 every step), without
R1 (the steps that lazy R1 skips), without the adaptive weight; optionally in channels-last memory format.

The networks, loss and optimizers are the config's own (its ``model`` section, built as `walt fit` builds it), and
each batch is `TokenizerModule.training_step` under a Lightning Trainer (bf16-mixed on a GPU), on one batch kept on
the device, so that the data loader costs nothing. The variants switch the loss's terms between runs.

    python benchmarks/tokenizer_step.py --config configs/moving_digits/tokenizer_gan.yaml --batch-size 32 \
        --frames 17 --size 64 --out benchmarks/tokenizer_step/moving_digits_h200.json
    python benchmarks/tokenizer_step.py --config configs/tokenizer/real_footage.yaml --batch-size 8 --size 128 \
        --upsampler resize --no-perceptual --warmup 3 --iters 10   # the decoder's upsamplers side by side
    python benchmarks/tokenizer_step.py --smoke      # CPU: a few small steps, checks the path
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import jsonargparse
import lightning as L
import torch
import yaml

from walt.lightning import TokenizerModule
from walt.tokenizer.layers import MODULATION_UPSAMPLING, UPSAMPLERS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tokenizer import sync  # benchmarks/tokenizer.py

VARIANTS = {  # name: (discriminator step, R1 on it, adaptive GAN weight)
    "autoencoder_only": (False, False, True),
    "with_discriminator": (True, True, True),
    "without_r1": (True, False, True),
    "without_r1_and_adaptive_weight": (True, False, False),
}


def build(
    config: Path,
    upsampler: str | None = None,
    perceptual: bool = True,
    modulation_upsample: str | None = None,
) -> TokenizerModule:
    """The config's TokenizerModule with fresh weights; ``upsampler`` and ``modulation_upsample`` replace its
    autoencoder's, and ``perceptual=False`` drops LPIPS (loss and validation metric) for a machine without its
    weights."""
    section = yaml.safe_load(config.read_text())["model"]
    args = section["init_args"]
    for key, value in (("upsampler", upsampler), ("modulation_upsample", modulation_upsample)):
        if value is not None:
            args["vae"].setdefault("init_args", {})[key] = value
    if not perceptual:
        args["loss"]["init_args"].update(perceptual=None, perceptual_weight=0.0)
        args.pop("val_metrics", None)
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=L.LightningModule)
    module = parser.instantiate_classes(parser.parse_object({"model": section})).model
    if not isinstance(module, TokenizerModule) or module.discriminator is None:
        raise SystemExit(f"{config} is not a tokenizer config with a discriminator")
    return module


class SameBatch(torch.utils.data.Dataset):
    """``length`` times one batch, already on its device: the data loader costs nothing."""

    def __init__(self, video: torch.Tensor, length: int) -> None:
        self.video, self.length = video, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return {"video": self.video}


class BatchTimer(L.Callback):
    """Wall time of each training batch, the GPU's work included."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        sync(module.device)
        self.tic = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        sync(module.device)
        self.seconds.append(time.perf_counter() - self.tic)


def milliseconds(
    module: TokenizerModule, video: torch.Tensor, variant: tuple, r1_weight: float, args: argparse.Namespace
) -> float:
    """Mean ms per batch of `TokenizerModule.training_step` under a Lightning Trainer, after ``args.warmup``
    batches, with the loss switched to ``variant`` (R1 at ``r1_weight`` where it is on)."""
    gan, r1, adaptive = variant
    loss = module.loss
    loss.gan_start_step = 0 if gan else 10**9
    loss.gradient_penalty_weight = r1_weight if r1 else 0.0
    loss.gradient_penalty_every = 1
    loss.adaptive_weight = adaptive
    timer = BatchTimer()
    gpu = video.device.type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu", devices=1, precision="bf16-mixed" if gpu else "32-true",
        benchmark=True, max_epochs=1, limit_val_batches=0, callbacks=[timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    batches = args.warmup + args.iters
    loader = torch.utils.data.DataLoader(SameBatch(video, batches), batch_size=None)
    trainer.fit(module, loader)
    return sum(timer.seconds[args.warmup :]) / args.iters * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=Path("configs/moving_digits/tokenizer_gan.yaml"))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument(
        "--channels-last", action="store_true", help="also time channels_last_3d networks and input"
    )
    p.add_argument("--upsampler", choices=UPSAMPLERS, help="replace the config's upsampler")
    p.add_argument(
        "--modulation-upsample",
        choices=MODULATION_UPSAMPLING,
        help="replace the config's modulation resizing",
    )
    p.add_argument("--no-perceptual", action="store_true", help="drop LPIPS (no weights on this machine)")
    p.add_argument("--smoke", action="store_true", help="CPU: batch 1 of 5x32x32, one timed step")
    p.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one Trainer per variant: no banners
    if args.smoke:
        args.batch_size, args.frames, args.size, args.warmup, args.iters = 1, 5, 32, 1, 1
    result = {"config": str(args.config), "upsampler": args.upsampler,
              "modulation_upsample": args.modulation_upsample, "perceptual": not args.no_perceptual,
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "batch": [args.batch_size, 3, args.frames, args.size, args.size],
              "ms_per_batch": {}}  # fmt: skip
    for layout in ("contiguous", "channels_last_3d") if args.channels_last else ("contiguous",):
        torch.manual_seed(0)
        module = build(args.config, args.upsampler, not args.no_perceptual, args.modulation_upsample)
        r1_weight = module.loss.gradient_penalty_weight or 10.0  # the config's, 10 if it has none
        video = torch.rand(args.batch_size, 3, args.frames, args.size, args.size, device=device) * 2 - 1
        if layout == "channels_last_3d":
            for net in (module.vae, module.discriminator):  # the loss holds 2D networks (LPIPS)
                net.to(memory_format=torch.channels_last_3d)
            video = video.contiguous(memory_format=torch.channels_last_3d)
        for name, variant in VARIANTS.items():
            ms = milliseconds(module, video, variant, r1_weight, args)
            result["ms_per_batch"][f"{layout}/{name}"] = round(ms, 1)
            print(f"{layout:>16} {name:<32} {ms:8.1f} ms/batch", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
