"""The 8-pixel grid early in tokenizer training: how the decoder's upsamplers start, and the loss.

Trains one CausalVAE per variant on RealFootage crops (the training split) with plain Adam steps and measures
the grid ratio (walt.metrics.pooled_grid_ratio: the mean neighbour difference at the loudest of the 8 phases of
the latent cells over that at the quietest, the profile averaged over the clips and the outermost cells left out;
about 1.06 for the footage) and PSNR of the held-out test clips every --eval-every steps. Variants:

  upsampler      nearest: walt's depth-to-space layers as they start (a convolution, then nearest-neighbour
                 upsampling: ICNR); bilinear: the same layers started as bilinear upsampling; resize: no
                 depth-to-space but nearest-neighbour upsampling followed by a convolution; resize-bilinear,
                 resize-lanczos and resize-kaiser: the same with bilinear, Lanczos or Kaiser low-pass upsampling
                 (the decoder's modulation is resized as --modulation-upsample says, bilinear by default;
                 walt's upsampler="lanczos" as trained pairs resize-lanczos with --modulation-upsample lanczos,
                 and "kaiser" likewise)
  loss           l1, l1+lpips (L1 plus 0.1 x LPIPS on 4 frames per clip, configs/tokenizer/real_footage.yaml),
                 l1+lpips-shiftN (LPIPS on windows N pixels smaller, at a random offset per image), or l1+gradW
                 (L1 plus W x the L1 distance of horizontal and vertical neighbour differences)
  --ema D        also measure an EMA of the weights (decay D) at every evaluation

Every variant sees the same crops in the same order from the same initial encoder.

  python benchmarks/tokenizer_grid.py --out grid.json                        # CPU: 16 channels, 9x64x64
  python benchmarks/tokenizer_grid.py --channels 48 --frames 17 --size 128 --batch-size 8 --steps 1000 \
      --device cuda --out grid.json                                          # the "small" preset on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from walt.data import RealFootage
from walt.lightning.ema import EMA
from walt.metrics import grid_phase, grid_profile, pooled_grid_ratio, profile_spread, psnr
from walt.tokenizer import CausalVAE
from walt.tokenizer.layers import MODULATION_UPSAMPLING, DepthToSpaceUpsample, ResizeUpsample
from walt.tokenizer.losses import TokenizerLoss, frames_as_images


@torch.no_grad()
def init_as_bilinear(up: DepthToSpaceUpsample) -> None:
    """An experiment: the depth-to-space layer starts as bilinear upsampling of its input (sub-pixel (p, q) of
    channel c reads channel c of the current frame with the bilinear weights of its phase) instead of walt's
    ICNR start (a convolution, then nearest-neighbour upsampling)."""
    conv = up.conv.conv
    channels = conv.in_channels
    phases = torch.tensor([[0.25, 0.75, 0.0], [0.0, 0.75, 0.25]])  # (p, kernel tap)
    kernel = phases[:, None, :, None] * phases[None, :, None, :]  # (p, q, kh, kw)
    weight = torch.zeros_like(conv.weight).view(channels, up.factor_t, 2, 2, channels, *conv.kernel_size)
    for c in range(channels):  # the causal kernel's last temporal tap is the current frame
        weight[c, :, :, :, c, -1] = kernel
    conv.weight.copy_(weight.view_as(conv.weight))
    conv.bias.zero_()


# walt's upsampler="resize" is resize-bilinear here, and upsampler="lanczos" / "kaiser" are resize-lanczos / -kaiser
RESIZE_VARIANTS = {
    "resize": "nearest",
    "resize-bilinear": "bilinear",
    "resize-lanczos": "lanczos",
    "resize-kaiser": "kaiser",
}


def build(args: argparse.Namespace, upsampler: str) -> CausalVAE:
    torch.manual_seed(args.seed)  # the same encoder and decoder weights, but for the upsamplers
    vae = CausalVAE(
        latent_channels=8, channels=args.channels, multipliers=(1, 2, 2, 4), num_res_blocks=1,
        temporal_downsample=(True, True, False), num_groups=8, variational=False,
        modulation_upsample=args.modulation_upsample,
    )  # fmt: skip
    ups = vae.decoder.upsamples
    for i, up in enumerate(ups):
        if upsampler == "bilinear":
            init_as_bilinear(up)
        elif upsampler in RESIZE_VARIANTS:
            ups[i] = ResizeUpsample(up.conv.conv.in_channels, up.factor_t == 2, RESIZE_VARIANTS[upsampler])
        elif upsampler != "nearest":
            raise SystemExit(
                f"unknown upsampler {upsampler!r}: nearest, bilinear or {', '.join(RESIZE_VARIANTS)}"
            )
    return vae.to(args.device)


class ShiftedPerceptual(TokenizerLoss):
    """An experiment: LPIPS on windows ``shift`` pixels smaller than the frames, at a random offset per image, so
    VGG's pooling grid (2, 4, 8, 16 pixels) does not line up with the latent cells in every step."""

    def __init__(self, shift: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.shift = shift

    def perceptual_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        idx = torch.randperm(x.shape[2], device=x.device)[: self.perceptual_frames]
        real, fake = (frames_as_images(v[:, :, idx]) for v in (x, x_rec))  # (B*F, 3, H, W) each
        h, w = real.shape[-2] - self.shift, real.shape[-1] - self.shift
        offsets = torch.randint(0, self.shift + 1, (len(real), 2)).tolist()
        crop = lambda v: torch.stack([img[:, i : i + h, j : j + w] for img, (i, j) in zip(v, offsets)])
        return self.perceptual(crop(fake), crop(real)).mean()  # on (B*F, 3, h, w)


def gradient_difference(x_rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An experiment: mean |d rec - d x| over horizontal and vertical neighbour differences. A step between two
    latent cells that the clip does not have is penalized directly, even where each side's pixel error is small."""
    return sum((x_rec.diff(dim=d) - x.diff(dim=d)).abs().mean() for d in (-1, -2)) / 2  # on (B, C, T, H, W)


def loss_fn(name: str, device: str):
    """Loss "l1", or "l1+lpips": walt's TokenizerLoss with L1 plus 0.1 x LPIPS on 4 frames per clip, as
    configs/tokenizer/real_footage.yaml; "l1+lpips-shiftN": the same with LPIPS on shifted windows;
    "l1+gradW": L1 plus W x `gradient_difference`."""
    if name == "l1":
        return TokenizerLoss(perceptual=None).pixel_loss
    if name.startswith("l1+grad"):
        weight, pixel = float(name.removeprefix("l1+grad") or 1), TokenizerLoss(perceptual=None).pixel_loss
        return lambda x_rec, x: pixel(x_rec, x) + weight * gradient_difference(x_rec, x)
    from walt.metrics import LPIPS

    base, _, shift = name.partition("-shift")
    if base != "l1+lpips":
        raise SystemExit(f"unknown loss {name!r}: l1, l1+gradW, l1+lpips or l1+lpips-shiftN")
    kwargs = dict(perceptual=LPIPS(), perceptual_weight=0.1, perceptual_frames=4)
    loss = (ShiftedPerceptual(int(shift), **kwargs) if shift else TokenizerLoss(**kwargs)).to(device)
    return lambda x_rec, x: (
        loss.pixel_loss(x_rec, x) + loss.perceptual_weight * loss.perceptual_loss(x, x_rec)
    )


@torch.no_grad()
def evaluate(vae: CausalVAE, held: torch.Tensor, device: str) -> dict[str, float]:
    vae.eval()
    rec = torch.cat([vae.decode(vae.encode(c.to(device))).clamp(-1, 1).cpu() for c in held.split(8)])
    vae.train()
    # The profile over the 8 phases of the latent cell says where a grid sits: phase 7 is the cells' edges,
    # phase 3 their middles (a seam of the first depth-to-space step, or the quiet centre of a bilinear
    # enlargement), odd phases against even ones a 2-pixel pattern.
    profile = grid_profile(rec, margin=8).mean(dim=0)  # (8,): the outermost cell's padding marks left out
    return {
        "grid_ratio": profile_spread(profile).item(),
        "grid_phase": int(grid_phase(profile)),
        "grid_profile": [round(v, 4) for v in profile.tolist()],
        "psnr": psnr(rec, held).mean().item(),
    }


def run(args: argparse.Namespace, upsampler: str, loss_name: str, held: torch.Tensor) -> dict:
    vae = build(args, upsampler)
    ema = EMA(vae, args.ema) if args.ema else None
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr, betas=tuple(args.betas))
    loss = loss_fn(loss_name, args.device)
    data = RealFootage("train", args.frames, args.size, num_samples=args.steps * args.batch_size, seed=0)
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=args.workers)
    curve = [{"step": 0, **evaluate(vae, held, args.device)}]
    tic = time.perf_counter()
    for step, batch in enumerate(itertools.islice(loader, args.steps), start=1):
        x = batch["video"].to(args.device)  # (B, 3, T, H, W)
        value = loss(vae.decode(vae.encode(x)), x)  # (reconstruction, clip)
        opt.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if ema is not None:
            ema.update(vae)
        if step % args.eval_every == 0:
            curve.append({"step": step, "loss": value.item(), **evaluate(vae, held, args.device)})
            if ema is not None:  # the same run's average: does it damp what the trained weights draw?
                curve[-1].update({f"ema_{k}": v for k, v in evaluate(ema.module, held, args.device).items()})
            print(f"{upsampler:8s} {loss_name:8s} {curve[-1]}", flush=True)
    return {"upsampler": upsampler, "loss": loss_name, "seconds": time.perf_counter() - tic, "curve": curve}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="JSON of every curve")
    p.add_argument("--upsamplers", default="nearest,bilinear")
    p.add_argument(
        "--modulation-upsample",
        default="bilinear",
        choices=MODULATION_UPSAMPLING,
        help="resizing of every variant",
    )
    p.add_argument("--losses", default="l1,l1+lpips")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--held-out", type=int, default=24, help="test-split shots to measure on")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--betas", type=float, nargs=2, default=[0.5, 0.9], help="Adam's betas")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ema", type=float, default=None, help="also measure an EMA of the weights at this decay")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    test = RealFootage("test", args.frames, args.size, num_samples=args.held_out)
    held = torch.stack([test[i]["video"] for i in range(len(test))])  # (N, 3, T, H, W)
    runs = [
        run(args, init, loss, held) for loss in args.losses.split(",") for init in args.upsamplers.split(",")
    ]
    original = pooled_grid_ratio(held, margin=8).item()
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "grid_ratio_original": original, "runs": runs}, indent=1))  # fmt: skip
    print(f"held-out clips themselves: grid ratio {original:.3f}")
    for r in runs:
        cells = " ".join(f"{c['step']}:{c['grid_ratio']:.3f}/{c['psnr']:.1f}" for c in r["curve"])
        print(f"{r['upsampler']:8s} {r['loss']:8s} {r['seconds']:.0f} s  step:grid/PSNR {cells}")


if __name__ == "__main__":
    main()
