"""The main job on built-in data, end to end on a CPU.

Today it exercises the data side of walt: it renders the procedural datasets, writes them as MP4 and GIF, reads
the files back through the same path real datasets use, and times a training epoch's worth of batches. Later
stages (tokenizer, diffusion, sampling) extend this script as they land.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from walt.data import (
    MovingDigits,
    SyntheticVideos,
    VideoDataModule,
    read_video,
    to_float_video,
    to_uint8,
    write_video,
)


def grid(videos: list[torch.Tensor], columns: int) -> torch.Tensor:
    """(3, T, H, W) videos -> one (3, T, rows*H, columns*W) video, row-major."""
    rows = [torch.cat(videos[i : i + columns], dim=-1) for i in range(0, len(videos), columns)]
    return torch.cat(rows, dim=-2)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()  # both in [-1, 1]: peak-to-peak 2
    return 10 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the videos")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    shapes = SyntheticVideos(num_samples=256, num_frames=args.frames, resolution=args.resolution)
    digits = MovingDigits("train", num_samples=256, num_frames=args.frames, resolution=args.resolution)
    for name, dataset in (("shapes", shapes), ("digits", digits)):
        items = [dataset[i] for i in range(0, 8 * 7, 7)]  # every 7th: varied classes
        video = grid([it["video"] for it in items], columns=4)  # (3, T, 2H, 4W)
        frames = to_uint8(video).numpy()  # (T, 2H, 4W, 3)
        for suffix in (".mp4", ".gif"):
            path = write_video(args.out / f"{name}{suffix}", frames, fps=8)
            back = to_float_video(read_video(path))
            print(
                f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB), read back at {psnr(back, video):.1f} dB PSNR"
            )
        print(f"  {name}: " + "; ".join(f"[{it['label']}] {it['caption']}" for it in items[:4]) + "; ...")

    data = VideoDataModule(shapes, batch_size=8, num_workers=2)
    tic = time.perf_counter()
    count = sum(batch["video"].shape[0] for batch in data.train_dataloader())
    rate = count / (time.perf_counter() - tic)
    print(
        f"data loader: {count} synthetic clips of {args.frames}x{args.resolution}x{args.resolution} "
        f"at {rate:.0f} clips/s (2 workers)"
    )
    print(
        f"demo finished in {time.perf_counter() - start:.1f} s; open {args.out}/shapes.gif to see the clips"
    )


if __name__ == "__main__":
    main()
