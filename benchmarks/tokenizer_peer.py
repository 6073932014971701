"""walt's tokenizer next to a peer, diffusers' AutoencoderKLWan (Wan 2.1's causal video VAE), trained side by side
in one run on one device: the same latent shape (walt's latent channels, 4x time, 8x space), about the same
parameter count, the same RealFootage batches, loss (L1 + LPIPS), optimizer and steps. Every --eval-every steps
both are scored on RealFootage's test split (clips and photographs never trained on, and its images as 1-frame
clips): PSNR, SSIM, LPIPS (when its weights are installed), grid_ratio (block-grid artefacts at any phase of
the latent cells, seams or smooth centres: the loudest phase over the quietest, about 1.06 for real footage),
seam_ratio (the cells' edges over their insides) and chroma_error (8-bit levels), next to each model's training
throughput (clips/s, device-synchronized).

  python benchmarks/tokenizer_peer.py --steps 20000 --out outputs/tokenizer_peer     # one GPU
  python benchmarks/tokenizer_peer.py --steps 100000 --max-seconds 480 --out outputs/tokenizer_peer  # a time budget
  python benchmarks/tokenizer_peer.py --smoke --out /tmp/tokenizer_peer              # CPU, about a minute

Writes <out>/results.json (both configurations and parameter counts, one row per model, data kind and
evaluation) and <out>/side_by_side_<step>_{video,image}.png (original | walt | Wan; frames first, middle, last).

Wan's layout is kept (width multipliers 1, 2, 4, 4, two residual blocks per level, time halved at the last two
downsamplings) and only its base width is chosen, the one whose parameter count is nearest walt's. Its API:
`encode(x).latent_dist` (whose mode, the posterior mean, is the latent here, as walt's mean is) and
`decode(z).sample`; clips have 1 + 4k frames (frame 0 is encoded alone, then chunks of 4), and decode clamps its
output to [-1, 1], so saturated pixels pass no gradient back. Training is on videos only; the image rows show how
each model encodes a lone first frame.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenizer import optional_metric, peak_memory_gib, reset_peak, sync

from walt.atomic import write_atomic
from walt.config import json_ready
from walt.data import RealFootage, collate_items, to_uint8
from walt.metrics import chroma_error, grid_profile, profile_spread, psnr, seam_ratio, ssim
from walt.metrics.pixel import SSIM_WINDOW
from walt.tokenizer import CausalVAE, presets
from walt.tokenizer.layers import MODULATION_UPSAMPLING, UPSAMPLERS
from walt.tokenizer.losses import TokenizerLoss

# Wan 2.1's VAE layout (diffusers' defaults but the width): 8x space, 4x time, as walt's tokenizer.
WAN_LAYOUT = dict(dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])


class WaltAutoencoder(nn.Module):
    """walt's CausalVAE through its posterior mean: (B, 3, 1+4k, H, W) -> same shape."""

    def __init__(self, vae: CausalVAE) -> None:
        super().__init__()
        self.vae = vae

    def latent(self, x: Tensor) -> Tensor:
        return self.vae.encode_moments(x)[0]  # (B, C, 1+k, H/8, W/8)

    def forward(self, x: Tensor) -> Tensor:
        return self.vae.decode_raw(self.latent(x))  # (B, 3, 1+4k, H, W)


class WanAutoencoder(nn.Module):
    """diffusers' AutoencoderKLWan through its posterior mean: (B, 3, 1+4k, H, W) -> same shape."""

    def __init__(self, wan: nn.Module) -> None:
        super().__init__()
        self.wan = wan

    def latent(self, x: Tensor) -> Tensor:
        return self.wan.encode(x).latent_dist.mode()  # (B, C, 1+k, H/8, W/8)

    def forward(self, x: Tensor) -> Tensor:
        return self.wan.decode(self.latent(x)).sample  # (B, 3, 1+4k, H, W), clamped to [-1, 1]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def wan_config(base_dim: int, z_dim: int) -> dict:
    # latents_mean/std only scale latents in Wan's pipelines, never inside encode/decode; set to identity.
    return WAN_LAYOUT | dict(
        base_dim=base_dim, z_dim=z_dim, latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim
    )


def build_wan(config: dict) -> nn.Module:
    try:
        from diffusers import AutoencoderKLWan
    except ImportError as err:
        raise SystemExit("the peer model comes from diffusers: pip install diffusers (or walt[dev])") from err
    return AutoencoderKLWan(**config)


def matched_wan_config(target_params: int, z_dim: int) -> dict:
    """Wan's layout at the base width whose parameter count is nearest ``target_params`` (bisection on the
    count, which grows with the width; models built on the meta device, so nothing is allocated)."""

    def count(base_dim: int) -> int:
        with torch.device("meta"):
            return num_params(build_wan(wan_config(base_dim, z_dim)))

    low, high = 1, 1024
    while low < high:  # the smallest width with at least the target count
        mid = (low + high) // 2
        low, high = (mid + 1, high) if count(mid) < target_params else (low, mid)
    best = min({max(1, low - 1), low}, key=lambda d: abs(count(d) - target_params))
    return wan_config(best, z_dim)


def build_models(args: argparse.Namespace) -> dict[str, nn.Module]:
    walt_config = dict(
        presets[args.walt_preset],
        modulation_upsample=args.modulation_upsample,
        upsampler=args.upsampler,
    )
    torch.manual_seed(args.seed)
    walt = WaltAutoencoder(CausalVAE(**walt_config))
    torch.manual_seed(args.seed)
    wan = WanAutoencoder(build_wan(matched_wan_config(num_params(walt), walt.vae.latent_channels)))
    return {"walt": walt, "wan": wan}


def describe(models: dict[str, nn.Module], args: argparse.Namespace, device: torch.device) -> dict:
    probe = torch.zeros(1, 3, args.frames, args.resolution, args.resolution, device=device)
    with torch.no_grad():
        shapes = {name: list(m.latent(probe).shape[1:]) for name, m in models.items()}
    if shapes["walt"] != shapes["wan"]:
        raise SystemExit(f"the latent shapes differ: {shapes}")
    configs = {
        "walt": {"preset": args.walt_preset, **json_ready(models["walt"].vae.init_args)},
        "wan": {k: v for k, v in models["wan"].wan.config.items() if not k.startswith("_")},
    }
    return {
        name: {"params": num_params(m), "latent_shape": shapes[name], "config": configs[name]}
        for name, m in models.items()
    }


# ---- training ---------------------------------------------------------------------------------------------


def train_step(model: nn.Module, optimizer, loss: TokenizerLoss, x: Tensor, device: torch.device) -> float:
    """One optimizer step on batch ``x``; returns its device-synchronized seconds."""
    sync(device)
    start = time.perf_counter()
    with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
        x_rec = model(x).float()  # (B, 3, T, H, W)
        value = loss.pixel_loss(x_rec, x)  # TokenizerLoss's reconstruction terms; no KL, no adversary
        if loss.perceptual is not None:
            value = value + loss.perceptual_weight * loss.perceptual_loss(x, x_rec)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    sync(device)
    return time.perf_counter() - start


def training_batches(args: argparse.Namespace) -> DataLoader:
    # One pass over fresh random shots: item i is drawn from (seed, i), so no clip repeats within the run.
    data = RealFootage(
        "train", args.frames, args.resolution, num_samples=args.steps * args.batch_size, seed=args.seed
    )
    return DataLoader(
        data, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_items, drop_last=True
    )


# ---- evaluation -------------------------------------------------------------------------------------------


def test_sets(args: argparse.Namespace) -> dict[str, Tensor]:
    """The held-out clips and images, (N, 3, T, H, W) each; the smoke run takes the first few (they still span
    the sources)."""
    sets = {}
    for mode, frames in (("video", args.frames), ("image", 1)):
        data = RealFootage("test", frames, args.resolution, mode=mode)
        n = min(len(data), args.test_limit) if args.test_limit else len(data)
        sets[mode] = torch.stack([data[i]["video"] for i in range(n)])
    return sets


@torch.no_grad()
def reconstruct(model: nn.Module, clips: Tensor, args: argparse.Namespace, device: torch.device) -> Tensor:
    model.eval()
    out = []
    for batch in clips.split(args.batch_size):
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            out.append(model(batch.to(device)).float().clamp(-1, 1).cpu())  # (b, 3, T, H, W)
    model.train()
    return torch.cat(out)  # (N, 3, T, H, W)


def grid(videos: Tensor) -> dict[str, Tensor]:
    """The grid ratio and seam ratio of a test set's pooled profile (walt.metrics), the outermost latent cells
    left out where the frames allow it (padding marks a frame's border, and that is no grid)."""
    profile = grid_profile(videos, margin=8 if min(videos.shape[-2:]) > 24 else 0).mean(dim=0)  # (8,)
    return {"grid_ratio": profile_spread(profile), "seam_ratio": seam_ratio(profile)}


@torch.no_grad()
def scores(original: Tensor, rec: Tensor, lpips: nn.Module | None, device: torch.device) -> dict:
    values = {
        "psnr": psnr(rec, original).mean(),
        **grid(rec),
        "chroma_error": chroma_error(rec, original).mean(),
    }
    if min(original.shape[-2:]) >= SSIM_WINDOW:
        values["ssim"] = ssim(rec, original).mean()
    if lpips is not None:  # frame by frame, averaged over time (walt.metrics.LPIPS on videos)
        pairs = zip(rec.split(8), original.split(8))
        values["lpips"] = torch.cat([lpips(a.to(device), b.to(device)).cpu() for a, b in pairs]).mean()
    return {k: float(v) for k, v in values.items()}


def save_side_by_side(original: Tensor, recs: dict[str, Tensor], path: Path, rows: int = 6) -> None:
    """One row per test clip: its first, middle and last frames, original then each model's reconstruction."""
    from PIL import Image

    t = original.shape[2]
    lines = []
    for i in range(min(rows, len(original))):
        clips = [to_uint8(c[i]).numpy() for c in (original, *recs.values())]  # each (T, H, W, 3)
        lines.append(np.concatenate([c[f] for c in clips for f in sorted({0, t // 2, t - 1})], axis=1))
    Image.fromarray(np.concatenate(lines, axis=0)).save(path)


def load_lpips(device: torch.device) -> nn.Module | None:
    lpips_cls = optional_metric("LPIPS")
    try:
        return lpips_cls().to(device).eval().requires_grad_(False) if lpips_cls is not None else None
    except FileNotFoundError as err:  # its weights are not installed here
        print(json.dumps({"lpips": f"skipped: {err}"}), flush=True)
        return None


# ---- the run ----------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: both models get cuDNN's fastest 3D convolutions
    models = {name: m.to(device) for name, m in build_models(args).items()}
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    result |= {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    result["models"] = describe(models, args, device)
    print(json.dumps({name: m["params"] for name, m in result["models"].items()}), flush=True)
    lpips = load_lpips(device)
    train_lpips = lpips if args.perceptual_weight > 0 else None
    loss = TokenizerLoss(
        train_lpips, "l1", args.perceptual_weight, perceptual_frames=4, kl_weight=0.0, gan_weight=0.0
    )
    optimizers = {
        name: torch.optim.Adam(m.parameters(), lr=args.lr, betas=(0.9, 0.99)) for name, m in models.items()
    }
    tests = test_sets(args)
    result["reference"] = {kind: {k: float(v) for k, v in grid(x).items()} for kind, x in tests.items()}
    seconds, timed, peaks, rows = dict.fromkeys(models, 0.0), 0, dict.fromkeys(models, 0.0), []
    warmup = min(args.warmup, args.steps - 1)  # steps left out of the throughput (allocator, cuDNN search)
    batches = iter(training_batches(args))  # exactly steps batches
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        over = args.max_seconds is not None and time.perf_counter() - start >= args.max_seconds
        last = step == args.steps or over
        x = next(batches)["video"].to(device)  # (B, 3, T, H, W)
        for name, model in models.items():
            reset_peak(device)
            spent = train_step(model, optimizers[name], loss, x, device)
            seconds[name] += spent if step > warmup else 0.0
            peaks[name] = max(peaks[name], peak_memory_gib(device) or 0.0)
        timed += step > warmup
        if step % args.eval_every == 0 or last:
            for row in evaluate(models, tests, lpips, step, args, device):
                row["train_clips_per_s"] = timed * args.batch_size / seconds[row["model"]] if timed else None
                row["train_peak_gib"] = peaks[row["model"]] if device.type == "cuda" else None
                rows.append(row)
                print(json.dumps(row), flush=True)
            result["rows"] = rows
            if args.out:  # after every evaluation: a run stopped from outside keeps what it measured
                write_atomic(args.out / "results.json", json.dumps(result, indent=2))
        if last:
            break
    result["rows"] = rows
    return result


def evaluate(models, tests: dict[str, Tensor], lpips, step: int, args, device) -> list[dict]:
    rows = []
    for kind, clips in tests.items():
        recs = {name: reconstruct(m, clips, args, device) for name, m in models.items()}
        for name, rec in recs.items():
            rows.append({"step": step, "model": name, "data": kind, "num_clips": len(clips)})
            rows[-1] |= scores(clips, rec, lpips, device)
        if args.out:
            save_side_by_side(clips, recs, args.out / f"side_by_side_{step}_{kind}.png")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20000, help="optimizer steps of each model")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per step (and per evaluation batch)")
    parser.add_argument("--resolution", type=int, default=128, help="square frames, a multiple of 8")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip, 1 + 4k")
    parser.add_argument(
        "--eval-every", type=int, default=2000, help="steps between evaluations (and at the end)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="folder for results.json and the side-by-side PNGs")
    parser.add_argument("--walt-preset", default="small", choices=sorted(presets))
    parser.add_argument(
        "--modulation-upsample",
        default="kaiser",
        choices=MODULATION_UPSAMPLING,
        help="as configs/tokenizer/real_footage.yaml",
    )
    parser.add_argument(
        "--upsampler",
        default="kaiser",
        choices=UPSAMPLERS,
        help="walt's decoder upsamplers, as configs/tokenizer/real_footage.yaml",
    )
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate of both models")
    parser.add_argument("--perceptual-weight", type=float, default=0.1, help="LPIPS weight (0 = L1 only)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        help="stop after the step that ends this many seconds of the training loop (both models, evaluations "
        "included) and evaluate there; --steps stays the upper bound",
    )
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the throughput")
    parser.add_argument("--workers", type=int, default=4, help="data-loader processes")
    parser.add_argument(
        "--test-limit", type=int, default=0, help="score only the first N test clips (0 = all)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke", action="store_true", help="CPU-sized: tiny preset, 5x32x32, 2 steps, 6 test clips"
    )
    args = parser.parse_args()
    if args.smoke:
        args.walt_preset, args.frames, args.resolution, args.batch_size = "tiny", 5, 32, 1
        args.steps, args.eval_every, args.warmup, args.workers, args.test_limit = 2, 2, 1, 0, 6
        args.perceptual_weight = 0.0
    if (args.frames - 1) % 4 or args.resolution % 8:
        raise SystemExit("--frames must be 1 + 4k and --resolution a multiple of 8")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    if args.out:
        write_atomic(args.out / "results.json", json.dumps(result, indent=2))
        print(f"wrote {args.out / 'results.json'}")
    bad = [r for r in result["rows"] for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise SystemExit(f"non-finite scores: {bad}")


if __name__ == "__main__":
    main()
