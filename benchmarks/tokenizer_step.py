"""What one training batch of the tokenizer costs, by part: without the discriminator, with it (R1 every step), without
R1 (the steps that lazy R1 skips), without the adaptive weight; optionally in channels-last memory format.

The networks, loss and optimizers are the config's own (its ``model`` section, built as `walt fit` builds it); the
step is `TokenizerModule.training_step`'s: autoencoder step, then discriminator step, bf16 autocast on a GPU.

    python benchmarks/tokenizer_step.py --config configs/moving_digits/tokenizer_gan.yaml --batch-size 32 \
        --frames 17 --size 64 --out benchmarks/tokenizer_step/moving_digits_h200.json
    python benchmarks/tokenizer_step.py --smoke      # CPU: a few small steps, checks the path
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonargparse
import lightning as L
import torch
import yaml

from walt.lightning import TokenizerModule

VARIANTS = {  # name: (discriminator step, R1 on it, adaptive GAN weight)
    "autoencoder_only": (False, False, True),
    "with_discriminator": (True, True, True),
    "without_r1": (True, False, True),
    "without_r1_and_adaptive_weight": (True, False, False),
}


def build(config: Path) -> TokenizerModule:
    """The config's TokenizerModule with fresh weights."""
    section = yaml.safe_load(config.read_text())["model"]
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=L.LightningModule)
    module = parser.instantiate_classes(parser.parse_object({"model": section})).model
    if not isinstance(module, TokenizerModule) or module.discriminator is None:
        raise SystemExit(f"{config} is not a tokenizer config with a discriminator")
    return module


class Step:
    """One batch as `TokenizerModule.training_step` takes it, outside a Trainer."""

    def __init__(self, module: TokenizerModule, device: str) -> None:
        self.vae, self.disc, self.loss = module.vae, module.discriminator, module.loss
        self.opt_g = module.optimizer_factory(self.vae.parameters())
        self.opt_d = module.discriminator_optimizer_factory(self.disc.parameters())
        self.clip = module.gradient_clip
        self.device = device

    def __call__(self, x: torch.Tensor, gan: bool, r1: bool, adaptive: bool) -> None:
        self.loss.adaptive_weight = adaptive
        with torch.autocast(torch.device(self.device).type, torch.bfloat16, enabled=self.device != "cpu"):
            mean, logvar = self.vae.encode_moments(x)  # (B, C, 1+k, h, w)
            x_rec = self.vae.decode_raw(mean)  # (B, 3, T, H, W)
            logits_fake = self.disc.requires_grad_(False)(x_rec) if gan else None
            loss, _ = self.loss.generator_loss(
                x, x_rec, mean, logvar, logits_fake, self.vae.last_decoder_layer
            )
        self._update(self.opt_g, loss, self.vae)
        if not gan:
            return
        self.disc.requires_grad_(True)
        with torch.autocast(torch.device(self.device).type, torch.bfloat16, enabled=self.device != "cpu"):
            real = x.detach().requires_grad_(r1)
            logits_real, logits_fake = self.disc(real), self.disc(x_rec.detach())  # (B, 1, T', H', W') each
            d_loss, _ = self.loss.discriminator_loss(real, logits_real, logits_fake, penalty=r1)
        self._update(self.opt_d, d_loss, self.disc)

    def _update(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, net: torch.nn.Module) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), self.clip)
        optimizer.step()


def milliseconds(step: Step, x: torch.Tensor, variant: tuple, warmup: int, iters: int) -> float:
    gan, r1, adaptive = variant
    for _ in range(warmup):
        step(x, gan, r1, adaptive)
    synchronize(step.device)
    tic = time.perf_counter()
    for _ in range(iters):
        step(x, gan, r1, adaptive)
    synchronize(step.device)
    return (time.perf_counter() - tic) / iters * 1000


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


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
    p.add_argument("--smoke", action="store_true", help="CPU: batch 1 of 5x32x32, one timed step")
    p.add_argument("--out", type=Path, help="write the figures here (JSON)")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.batch_size, args.frames, args.size, args.warmup, args.iters = 1, 5, 32, 1, 1
    torch.backends.cudnn.benchmark = True  # as the config's trainer sets it: fixed clip size
    result = {"config": str(args.config), "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "torch": torch.__version__, "batch": [args.batch_size, 3, args.frames, args.size, args.size],
              "ms_per_batch": {}}  # fmt: skip
    for layout in ("contiguous", "channels_last_3d") if args.channels_last else ("contiguous",):
        torch.manual_seed(0)
        module = build(args.config).to(device)
        x = torch.rand(args.batch_size, 3, args.frames, args.size, args.size, device=device) * 2 - 1
        if layout == "channels_last_3d":
            for net in (module.vae, module.discriminator):  # the loss holds 2D networks (LPIPS)
                net.to(memory_format=torch.channels_last_3d)
            x = x.contiguous(memory_format=torch.channels_last_3d)
        step = Step(module, device)
        for name, variant in VARIANTS.items():
            ms = milliseconds(step, x, variant, args.warmup, args.iters)
            result["ms_per_batch"][f"{layout}/{name}"] = round(ms, 1)
            print(f"{layout:>16} {name:<32} {ms:8.1f} ms/batch", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
