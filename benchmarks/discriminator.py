"""How fast does the tokenizer's discriminator learn to tell real clips from soft reconstructions? (CPU-sized)

Real RealFootage training clips against the same clips through a 3x3 box blur (a stand-in for an early, soft
decoder), hinge loss, Adam as in configs/tokenizer/real_footage.yaml, optionally with the R1 penalty. Prints the
mean logit gap (real - blurred) every 10 steps: a discriminator that learns opens a gap; one held at zero does not.

    python benchmarks/discriminator.py --r1 10                  # walt's R1 (on the clip's mean patch logit)
    python benchmarks/discriminator.py --r1 10 --r1-on patch-sum  # the earlier R1 (gradient of the patches' sum)
    python benchmarks/discriminator.py --r1 0

At step 0 and at the end it also measures the gradient the discriminator sends a reconstruction: d(mean logit of
the blurred clips)/d(clip), the adversarial term's signal to the decoder. Its grid ratio (walt.metrics.grid_ratio,
on the gradient as if it were a clip) at 8 and 16 pixels, over the whole frame and 16 pixels in from the border,
says whether that signal has the tokenizer's 8-pixel cell edges in it:

    python benchmarks/discriminator.py --channels 32 --multipliers 2,4,4,4 --steps 30
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from walt.data import RealFootage
from walt.metrics import grid_ratio
from walt.tokenizer.discriminator import Discriminator3D
from walt.tokenizer.losses import gradient_penalty, hinge_d_loss


def box_blur(x: Tensor) -> Tensor:
    """(B, C, T, H, W) -> the same, each frame through a 3x3 box filter."""
    b, c, t, h, w = x.shape
    frames = x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)
    kernel = torch.ones(c, 1, 3, 3) / 9
    frames = F.conv2d(F.pad(frames, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)  # (B*T, C, H, W)
    return frames.reshape(b, t, c, h, w).transpose(1, 2)  # (B, C, T, H, W)


def patch_sum_penalty(real: Tensor, logits_real: Tensor) -> Tensor:
    """The earlier R1: the gradient of all patch logits' sum (P^2 times the penalty on their mean)."""
    (grad,) = torch.autograd.grad(logits_real.sum(), real, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()


def gradient_grid(disc: Discriminator3D, fake: Tensor) -> dict[str, float]:
    """Grid ratios of d(mean logit)/d(fake) at 8 and 16 pixels, whole frame and 16 pixels in ("inner")."""
    fake = fake.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(disc(fake).mean(), fake)  # (B, 3, T, H, W)
    out = {}
    for region, margin in (("whole", 0), ("inner", 16)):
        for period in (8, 16):
            out[f"{region}_{period}"] = round(grid_ratio(grad, period, margin).mean().item(), 4)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r1", type=float, default=10.0, help="R1 weight (0: none)")
    p.add_argument("--r1-on", choices=["mean", "patch-sum"], default="mean")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--frames", type=int, default=9)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--channels", type=int, default=16, help="discriminator width (the config's is 32)")
    p.add_argument("--multipliers", default="2,4,4", help="the config's are 2,4,4,4 (RealFootage)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = RealFootage("train", mode="video", num_frames=args.frames, resolution=args.resolution, seed=0)
    torch.manual_seed(0)
    multipliers = tuple(int(m) for m in args.multipliers.split(","))
    disc = Discriminator3D(channels=args.channels, multipliers=multipliers)
    probe = box_blur(torch.stack([data[len(data) - 1 - i]["video"] for i in range(args.batch_size)]))
    grids = {"step_0": gradient_grid(disc, probe)}
    print(f"gradient grid ratios at step 0: {grids['step_0']}", flush=True)
    opt = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.9))
    penalty = gradient_penalty if args.r1_on == "mean" else patch_sum_penalty
    gaps, tic = [], time.perf_counter()
    for step in range(args.steps):
        idx = [(step * args.batch_size + i) % len(data) for i in range(args.batch_size)]
        real = torch.stack([data[i]["video"] for i in idx])  # (B, 3, T, H, W)
        fake = box_blur(real)  # (B, 3, T, H, W)
        real.requires_grad_(args.r1 > 0)
        logits_real, logits_fake = disc(real), disc(fake)  # (B, 1, T', H', W') each
        loss = hinge_d_loss(logits_real, logits_fake)
        if args.r1 > 0:
            loss = loss + args.r1 * penalty(real, logits_real)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 9:
            gap = (logits_real.mean() - logits_fake.mean()).item()
            gaps.append([step + 1, round(gap, 4), round(loss.item(), 4)])
            print(f"step {step + 1}: logit gap {gap:.4f}, loss {loss.item():.4f}", flush=True)
    grids[f"step_{args.steps}"] = gradient_grid(disc, probe)
    print(f"gradient grid ratios at step {args.steps}: {grids[f'step_{args.steps}']}", flush=True)
    result = {**vars(args), "gap_loss_by_step": gaps, "gradient_grid": grids,
              "seconds": round(time.perf_counter() - tic)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
