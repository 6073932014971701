"""The grid that three 2x upsampling steps leave by themselves, filter by filter: random cells enlarged 8x (the
worst case: every cell independent) and photographs shrunk 8x (area average) and enlarged again, with the PSNR of
the latter against the original. This is how walt.nn.kaiser_kernels' cutoff and window were chosen.

  python benchmarks/resample_grid.py                      # CPU, seconds
  python benchmarks/resample_grid.py --out resample.json  # also the numbers as JSON
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import skimage.data
import torch
import torch.nn.functional as F
from torch import Tensor

from walt.metrics import grid_profile, profile_spread, psnr, seam_ratio
from walt.nn import kaiser_kernels, lanczos_kernels, upsample2x

PHOTOGRAPHS = ("astronaut", "coffee", "chelsea", "rocket")
MARGIN = 16  # pixels left out at each border: replicate padding there is no grid


def _sinc_step(kernels: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: upsample2x(x, kernels)


def filters() -> dict[str, Callable[[Tensor], Tensor]]:
    """One 2x step per filter: bilinear, Lanczos with 3 to 12 lobes, and Kaiser low-passes around the default."""
    steps: dict[str, Callable[[Tensor], Tensor]] = {
        "bilinear": lambda x: F.interpolate(x, scale_factor=2, mode="bilinear")
    }
    for lobes in (3, 4, 6, 8, 12):
        steps[f"lanczos{lobes}"] = _sinc_step(lanczos_kernels(lobes))
    for radius, cutoff, beta in [(4, c, 4.0) for c in (1.0, 0.9, 0.85, 0.8, 0.75)] + [
        (4, 0.85, 2.0),
        (4, 0.85, 8.0),
    ]:
        steps[f"kaiser r{radius} c{cutoff} b{beta:g}"] = _sinc_step(kaiser_kernels(radius, cutoff, beta))
    return steps


def grid_of(images: list[Tensor]) -> dict[str, float]:
    """The grid and seam ratios of the images' mean profile (each (N, 3, H, W), sizes may differ)."""
    profiles = [grid_profile(x[..., MARGIN:-MARGIN, MARGIN:-MARGIN]) for x in images]  # each (N, 8)
    profile = torch.cat(profiles).mean(dim=0)  # (8,)
    return {"grid_ratio": float(profile_spread(profile)), "seam_ratio": float(seam_ratio(profile))}


def photographs() -> list[Tensor]:
    """The photographs in [-1, 1], cropped to multiples of 64 pixels, each (1, 3, H, W)."""
    out = []
    for name in PHOTOGRAPHS:
        image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1)[None].double() / 127.5 - 1
        out.append(image[..., : image.shape[-2] // 64 * 64, : image.shape[-1] // 64 * 64])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON of every row")
    args = p.parse_args()
    cells = torch.rand(16, 3, 24, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    photos = photographs()
    rows = [{"filter": "photographs themselves", **grid_of(photos)}]
    for name, step in filters().items():
        cells8 = step(step(step(cells)))  # (16, 3, 192, 192)
        back = [step(step(step(F.avg_pool2d(x, 8)))) for x in photos]  # each (1, 3, H, W)
        inner = (slice(None),) * 2 + (slice(MARGIN, -MARGIN),) * 2
        quality = sum(psnr(b[inner], x[inner]).item() for b, x in zip(back, photos)) / len(photos)
        photo_grid = grid_of(back)
        rows.append(
            {"filter": name, "cells": grid_of([cells8]), "photographs": photo_grid, "photo_psnr": quality}
        )
    for r in rows:
        if "cells" in r:
            c, ph = r["cells"], r["photographs"]
            print(f"{r['filter']:22s} cells: grid {c['grid_ratio']:.3f} seam {c['seam_ratio']:.3f}   "
                  f"photographs: grid {ph['grid_ratio']:.3f} PSNR {r['photo_psnr']:.2f}")  # fmt: skip
        else:
            print(f"{r['filter']:22s} grid {r['grid_ratio']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
