"""Which low-res conditioning should super-resolution use: upsample the low-res latent, or upsample the low-res
pixels and encode them? Measured with a trained tokenizer on synthetic clips (CPU, a minute).

  python benchmarks/sr_conditioning.py --tokenizer <vae.safetensors> --tokenizer-config <vae.yaml> --out sr.json

For each high-res clip x: the low-res clip is ``downsample_video(x)``; the "latent" path encodes it and
upsamples the latent (``upsample_latent``), the "pixel" path upsamples the pixels (``upsample_video``) and
encodes at high resolution. Each conditioning latent is compared with the high-res latent ``encode(x)`` it
stands for (MSE in normalized-latent units: what the SR model must add) and decoded to pixels (PSNR against x).
Reference rows: the tokenizer's own reconstruction of x, and plain pixel upsampling of the low-res clip.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from walt.conditioning import downsample_video, upsample_latent, upsample_video
from walt.data import SyntheticVideos
from walt.metrics import psnr
from walt.tokenizer import CausalVAE, presets
from walt.tokenizer.encode import load_vae_weights


def tokenizer(args: argparse.Namespace) -> CausalVAE:
    if args.tokenizer is None:  # smoke run: untrained tiny tokenizer, the figures mean nothing
        return CausalVAE(**presets["tiny"]).eval()
    config = yaml.safe_load(Path(args.tokenizer_config).read_text())
    vae = CausalVAE(**config["init_args"]).eval()
    load_vae_weights(vae, args.tokenizer)
    return vae


@torch.no_grad()
def measure(vae: CausalVAE, video: torch.Tensor, spatial: int, temporal: int) -> dict:
    target = vae.encode(video)  # (B, C, T', H', W')
    low = downsample_video(video, spatial, temporal)  # (B, 3, T_lr, H/s, W/s)
    start = time.perf_counter()
    latent_path = upsample_latent(vae.encode(low), spatial, temporal)  # (B, C, T', H', W')
    latent_s = time.perf_counter() - start
    start = time.perf_counter()
    pixel_path = vae.encode(upsample_video(low, spatial, temporal))  # (B, C, T', H', W')
    pixel_s = time.perf_counter() - start
    row = {
        "spatial_factor": spatial,
        "temporal_factor": temporal,
        "clips": video.shape[0],
        "reference_tokenizer_psnr": psnr(vae.decode(target).clamp(-1, 1), video).mean().item(),
        "reference_pixel_upsampling_psnr": psnr(upsample_video(low, spatial, temporal), video).mean().item(),
    }
    for name, cond, seconds in (("latent", latent_path, latent_s), ("pixel", pixel_path, pixel_s)):
        row[f"{name}_latent_mse"] = (cond - target).square().mean().item()
        row[f"{name}_decoded_psnr"] = psnr(vae.decode(cond).clamp(-1, 1), video).mean().item()
        row[f"{name}_encode_seconds"] = seconds
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="vae.safetensors (or a TokenizerModule checkpoint); none = smoke run")
    p.add_argument("--tokenizer-config", help="the tokenizer's class_path/init_args YAML (vae.yaml)")
    p.add_argument("--clips", type=int, default=32)
    p.add_argument("--resolution", type=int, default=64, help="high-res side; low-res is half (or a quarter)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--circles", action="store_true", help="only the demo's circles (its tokenizer's data)")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    torch.manual_seed(0)
    vae = tokenizer(args)
    kinds = dict(shapes=["circle"], motions=["left", "right"]) if args.circles else {}
    data = SyntheticVideos(args.clips, args.frames, args.resolution, seed=3, **kinds)
    video = torch.stack([data[i]["video"] for i in range(len(data))])  # (N, 3, T, H, W)
    rows = [measure(vae, video, s, t) for s, t in ((2, 1), (1, 2), (2, 2))]
    for row in rows:
        print(json.dumps(row))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
