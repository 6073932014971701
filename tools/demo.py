"""The main job on built-in data, end to end on a CPU: data -> tokenizer -> latents -> base model -> samples.

1. renders the procedural datasets and checks the video I/O round trip (MP4 and GIF);
2. trains the quickstart tokenizer (``configs/tokenizer/quickstart.yaml``);
3. encodes the demo's synthetic circles (8 classes: 4 colours x left/right) to latent shards;
4. trains the quickstart base model on them (``configs/base/quickstart.yaml``);
5. samples two videos per class and reads each back to measure whether it shows its class's colour and motion;
6. with ``--text``: trains the text-to-video quickstart (``configs/text/quickstart.yaml``, MiniLM tokens of the
   captions) on the same latents, samples two videos per prompt and measures the same way;
7. with ``--cascade``: trains the tiny x2 super-resolution stage (``configs/sr/tiny.yaml``) with the same
   tokenizer, runs the two-stage cascade (17x32x32 -> 17x64x64) and measures whether the high-res videos,
   downsampled, stay close to the base stage's videos they were made from (``<out>/cascade.json``);
8. with ``--text-cascade`` (after ``--text``): trains the tiny text-conditional x2 SR stage
   (``configs/sr/tiny_text.yaml``), runs the text-to-video cascade (``configs/cascade/text_quickstart.yaml``:
   the prompt reaches both stages) and measures how its 64x64 videos follow their prompts, and whether the SR
   stage reads the prompt itself (``<out>/text_cascade.json``).

Every stage is the same ``walt`` command a user runs; outputs go to ``--out`` (default ``demo_out/``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from walt.data import (
    MovingDigits,
    SyntheticVideos,
    read_video,
    to_float_video,
    to_uint8,
    write_video,
)
from walt.data.synthetic import read_colour_and_motion
from walt.metrics import psnr

DEMO_COLOURS = ["red", "green", "blue", "yellow"]


def grid(videos: list[torch.Tensor], columns: int) -> torch.Tensor:
    """(3, T, H, W) videos -> one (3, T, rows*H, columns*W) video, row-major."""
    rows = [torch.cat(videos[i : i + columns], dim=-1) for i in range(0, len(videos), columns)]
    return torch.cat(rows, dim=-2)


def walt(*args: str) -> None:
    """Runs one `walt` command as a user would, failing the demo if it fails."""
    print("$ walt " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "walt", *args], check=True)


def newest_checkpoint(root: Path) -> Path:
    """The checkpoint of the `walt fit` run whose ``default_root_dir`` is ``root``: its stable
    ``<root>/checkpoints/last.ckpt``, else (a run of an older walt, under ``lightning_logs/version_N/``) the
    newest ``.ckpt`` in any ``checkpoints`` folder below ``root``."""
    last = root / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    found = sorted(root.glob("**/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no checkpoint was written under {root}")
    return found[-1]


def data_stage(out: Path) -> None:
    shapes = SyntheticVideos(num_samples=256, num_frames=17, resolution=64)
    digits = MovingDigits("train", num_samples=256, num_frames=17, resolution=64)
    for name, dataset in (("shapes", shapes), ("digits", digits)):
        items = [dataset[i] for i in range(0, 8 * 7, 7)]  # every 7th: varied classes
        video = grid([it["video"] for it in items], columns=4)  # (3, T, 2H, 4W)
        for suffix in (".mp4", ".gif"):
            path = write_video(out / f"{name}{suffix}", to_uint8(video).numpy(), fps=8)
            back = to_float_video(read_video(path))
            print(f"wrote {path}, read back at {psnr(back[None], video[None]).item():.1f} dB PSNR")


def demo_classes() -> list[str]:
    """The class names of configs/data/synthetic_demo.yaml, in label order ("red circle moving left", ...)."""
    return SyntheticVideos(
        num_samples=1, shapes=["circle"], colors=DEMO_COLOURS, motions=["left", "right"]
    ).classes


def check_samples(folder: Path) -> dict[str, int]:
    """How many samples show their class's colour, motion, and both (classes of configs/data/synthetic_demo.yaml)."""
    classes = demo_classes()
    asked = {}
    for path in sorted(folder.glob("sample_*_class*.mp4")):
        asked[path] = classes[int(path.stem.rsplit("class", 1)[1])]  # "red circle moving left"
    return count_following(asked)


def check_prompt_samples(folder: Path) -> dict[str, int]:
    """The same for a text model's samples, from the prompts in ``samples.json`` ("a red circle moving left")."""
    index = json.loads((folder / "samples.json").read_text())
    return count_following({folder / e["file"]: e["prompt"].removeprefix("a ") for e in index})


def count_following(asked: dict[Path, str]) -> dict[str, int]:
    """Reads each video back and counts how many show the asked "<colour> circle moving <motion>"."""
    videos = [to_float_video(read_video(path)) for path in asked]
    return count_following_videos(videos, list(asked.values()), [path.name for path in asked])


def count_following_videos(
    videos: list[torch.Tensor] | torch.Tensor, asked: list[str], names: list[str] | None = None
) -> dict[str, int]:
    """How many of the float videos (3, T, H, W) show their asked "<colour> circle moving <motion>"."""
    counts = {"colour": 0, "motion": 0, "both": 0, "samples": 0}
    for i, (video, wanted) in enumerate(zip(videos, asked)):
        colour, _, _, motion = wanted.split()
        seen = read_colour_and_motion(video, DEMO_COLOURS)
        counts["colour"] += seen[0] == colour
        counts["motion"] += seen[1] == motion
        counts["both"] += seen == (colour, motion)
        counts["samples"] += 1
        name = names[i] if names else f"video {i}"
        print(f"  {name}: asked '{wanted}', shows a {seen[0]} shape moving {seen[1]}")
    return counts


def report(counts: dict[str, int], what: str) -> None:
    n = counts["samples"]
    print(
        f"of {n} samples, {counts['colour']} show their {what}'s colour (chance {n // 4}), {counts['motion']} its "
        f"motion (chance {n // 2}), {counts['both']} both (chance {n // 8})"
    )


def fit_on_latents(config: str, out: Path, name: str, *extra: str) -> None:
    """`walt fit` of a diffusion config on the latents and tokenizer the demo encoded, into ``out/name``."""
    walt(
        "fit",
        "--config",
        config,
        "--trainer.default_root_dir",
        str(out / name),
        "--model.init_args.tokenizer_weights",
        str(out / "latents" / "vae.safetensors"),
        "--data.init_args.train.init_args.root",
        str(out / "latents"),
        "--data.init_args.val.init_args.root",
        str(out / "latents"),
        "--trainer.enable_progress_bar",
        "false",
        *extra,
    )


def text_stage(out: Path) -> dict[str, int]:
    """Text-to-video on the demo's latents: MiniLM caption tokens through cross-attention, guidance 3."""
    fit_on_latents(
        "configs/text/quickstart.yaml",
        out,
        "text",
        "--model.init_args.conditioner.text_encoder.init_args.cache_dir",
        str(out / "text_cache"),
    )
    prompts = out / "prompts.txt"
    prompts.write_text("".join(f"a {c} circle moving {m}\n" for c in DEMO_COLOURS for m in ("left", "right")))
    samples = out / "text_samples"
    walt(
        "sample",
        "--model",
        str(newest_checkpoint(out / "text")),  # the checkpoint describes the model: no --config
        "--output",
        str(samples),
        "--overwrite",  # a rerun of the demo replaces its earlier samples
        "--prompts-file",
        str(prompts),
        "--num-samples",
        "16",
        "--steps",
        "25",
        "--guidance",
        "3",
        "--device",
        "cpu",
        "--seed",
        "0",
    )
    return check_prompt_samples(samples)


def cascade_stage(out: Path, base_ckpt: Path) -> dict:
    """Trains the tiny SR stage on the demo's tokenizer, then measures the cascade (:func:`measure_cascade`)."""
    walt(
        "fit",
        "--config",
        "configs/sr/tiny.yaml",
        "--trainer.default_root_dir",
        str(out / "sr"),
        "--model.init_args.tokenizer_weights",
        str(out / "latents" / "vae.safetensors"),
        "--trainer.enable_progress_bar",
        "false",
    )
    return measure_cascade(out, base_ckpt, newest_checkpoint(out / "sr"))


def measure_cascade(out: Path, base_ckpt: Path, sr_ckpt: Path, num_samples: int = 16) -> dict:
    """The two-stage cascade's faithfulness to its base stage, in ``<out>/cascade.json`` (and ``cascade.gif``).

    For sample i (class i mod 8, seed i): PSNR between the 64x64 cascade output, area-downsampled to 32x32 (the
    filter the SR stage was trained to invert), and the 32x32 base video it was made from. Two references:
    the floor, the tokenizer's own round trip at 64x64 of the upsampled base video, downsampled again (a perfect
    SR stage cannot do better than the tokenizer that decodes it); and a mismatch, each downsampled output
    against the base video of the next sample (another class). "Nearest" counts the outputs whose closest base
    video, of all of them, is their own."""
    from walt.conditioning import downsample_video, lowres_latent
    from walt.pipeline import CascadePipeline, Pipeline

    base = Pipeline.from_pretrained(base_ckpt)
    sr = Pipeline.from_pretrained(sr_ckpt)
    settings = [{"steps": 25, "guidance": 2.0}, {"steps": 25, "aug_level": 0.1}]
    labels, seeds = [i % 8 for i in range(num_samples)], list(range(num_samples))
    high = CascadePipeline([base, sr], settings).generate(labels=labels, seeds=seeds, output="float")
    # The cascade's first stage, run on its own: the same labels, seeds and settings give the same videos.
    low = base.generate(labels=labels, seeds=seeds, output="float", **settings[0])  # (N, 3, 17, 32, 32)
    down = downsample_video(high, 2, 1)  # (N, 3, 17, 32, 32)
    with torch.no_grad():
        z = lowres_latent(sr.tokenizer, low, 2, 1, "pixel", sr.tokenizer_chunk_size)  # (N, C, 5, 8, 8)
    floor = downsample_video(sr.decode(z), 2, 1)
    mse = (down[:, None] - low[None]).pow(2).mean((2, 3, 4, 5))  # (N, N): output i against base video j
    result = {
        "samples": num_samples,
        "stages": [{"model": str(p), **s} for p, s in zip((base_ckpt, sr_ckpt), settings)],
        "psnr_db": psnr(down, low).mean().item(),
        "floor_psnr_db": psnr(floor, low).mean().item(),
        "mismatch_psnr_db": psnr(down, low.roll(1, 0)).mean().item(),
        "nearest_is_own": int((mse.argmin(1) == torch.arange(num_samples)).sum()),
        "high_res_following": count_following_videos(high, [demo_classes()[c] for c in labels]),
    }
    (out / "cascade.json").write_text(json.dumps(result, indent=1))
    write_video(out / "cascade.gif", to_uint8(grid(list(high), columns=4)).numpy(), fps=8)
    return result


def text_cascade_stage(out: Path, text_ckpt: Path) -> dict:
    """Trains the tiny text SR stage on the demo's tokenizer, then measures the text-to-video cascade
    (:func:`measure_text_cascade`)."""
    walt(
        "fit",
        "--config",
        "configs/sr/tiny_text.yaml",
        "--trainer.default_root_dir",
        str(out / "sr_text"),
        "--model.init_args.tokenizer_weights",
        str(out / "latents" / "vae.safetensors"),
        "--model.init_args.conditioner.text_encoder.init_args.cache_dir",
        str(out / "text_cache"),
        "--trainer.enable_progress_bar",
        "false",
    )
    return measure_text_cascade(out, text_ckpt, newest_checkpoint(out / "sr_text"))


def measure_text_cascade(out: Path, base_ckpt: Path, sr_ckpt: Path, num_samples: int = 16) -> dict:
    """How the two-stage text cascade follows its prompts, in ``<out>/text_cascade.json`` (and a GIF).

    Sample i: prompt i mod 8 ("a <colour> circle moving <left/right>"), seed i, guidance 3 in both stages. The
    64x64 outputs are read back for colour and motion. The quickstart tokenizer, trained on 32x32 clips, shifts
    some colours at 64x64 by itself, so colour is also scored against what it shows for a real clip of the
    prompt (a 64x64 clip encoded and decoded): "as the tokenizer renders it". The SR stage's own use of the
    prompt: the same low-res videos (the base stage's) upsampled with each prompt's colour swapped for the next
    one's, at augmentation level 0.5 (the most its training saw); "swapped_follow" counts the outputs that then
    show the swapped prompt's colour (as rendered), "swapped_keep" those still showing the original one."""
    from walt.pipeline import CascadePipeline, Pipeline

    base, sr = Pipeline.from_pretrained(base_ckpt), Pipeline.from_pretrained(sr_ckpt)
    settings = [{"steps": 25, "guidance": 3.0}, {"steps": 25, "guidance": 3.0, "aug_level": 0.1}]
    asked = [(c, m) for c in DEMO_COLOURS for m in ("left", "right")]
    asked = [asked[i % len(asked)] for i in range(num_samples)]
    prompts = [f"a {c} circle moving {m}" for c, m in asked]
    seeds = list(range(num_samples))
    high = CascadePipeline([base, sr], settings).generate(prompts=prompts, seeds=seeds, output="float")
    low = base.generate(
        prompts=prompts, seeds=seeds, output="float", **settings[0]
    )  # the cascade's first stage
    rendered = {}
    for colour in DEMO_COLOURS:  # what the tokenizer shows for a real 64x64 clip of each colour
        clip = SyntheticVideos(
            num_samples=1, resolution=64, shapes=["circle"], colors=[colour], motions=["left"]
        )
        with torch.no_grad():
            roundtrip = sr.decode(sr.tokenizer.encode(clip[0]["video"][None]))[0]
        rendered[colour] = read_colour_and_motion(roundtrip, DEMO_COLOURS)[0]
    swapped = [DEMO_COLOURS[(DEMO_COLOURS.index(c) + 1) % 4] for c, _ in asked]
    other = sr.generate(
        prompts=[f"a {c} circle moving {m}" for c, (_, m) in zip(swapped, asked)], lowres=low, seeds=seeds,
        output="float", steps=25, guidance=3.0, aug_level=0.5,
    )  # fmt: skip
    seen_high = [read_colour_and_motion(v, DEMO_COLOURS) for v in high]
    seen_low = [read_colour_and_motion(v, DEMO_COLOURS) for v in low]
    seen_other = [read_colour_and_motion(v, DEMO_COLOURS)[0] for v in other]
    result = {
        "samples": num_samples,
        "stages": [{"model": str(p), **s} for p, s in zip((base_ckpt, sr_ckpt), settings)],
        "tokenizer_renders_at_64": rendered,
        "base_32x32": {
            "colour": sum(s[0] == c for s, (c, _) in zip(seen_low, asked)),
            "motion": sum(s[1] == m for s, (_, m) in zip(seen_low, asked)),
        },
        "cascade_64x64": {
            "colour": sum(s[0] == c for s, (c, _) in zip(seen_high, asked)),
            "colour_as_rendered": sum(s[0] == rendered[c] for s, (c, _) in zip(seen_high, asked)),
            "motion": sum(s[1] == m for s, (_, m) in zip(seen_high, asked)),
            "both_as_rendered": sum(s == (rendered[c], m) for s, (c, m) in zip(seen_high, asked)),
        },
        "swapped_follow": sum(s == rendered[c] for s, c in zip(seen_other, swapped)),
        "swapped_keep": sum(s == rendered[c] for s, (c, _) in zip(seen_other, asked)),
    }
    (out / "text_cascade.json").write_text(json.dumps(result, indent=1))
    write_video(out / "text_cascade.gif", to_uint8(grid(list(high), columns=4)).numpy(), fps=8)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", type=Path, default=Path("demo_out"), help="folder for everything the demo writes"
    )
    parser.add_argument(
        "--text", action="store_true", help="also train and sample the text-to-video quickstart"
    )
    parser.add_argument(
        "--cascade",
        action="store_true",
        help="also train the tiny x2 super-resolution stage and measure the two-stage cascade",
    )
    parser.add_argument(
        "--text-cascade",
        action="store_true",
        help="also train the text quickstart and the tiny text SR stage, and measure the text-to-video cascade",
    )
    args = parser.parse_args()
    args.text = args.text or args.text_cascade
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    times = {}

    data_stage(out)
    times["data"] = time.perf_counter() - start

    tic = time.perf_counter()
    walt(
        "fit",
        "--config",
        "configs/tokenizer/quickstart.yaml",
        "--trainer.default_root_dir",
        str(out / "tokenizer"),
        "--trainer.enable_progress_bar",
        "false",
    )
    tokenizer_ckpt = newest_checkpoint(out / "tokenizer")
    times["tokenizer"] = time.perf_counter() - tic

    tic = time.perf_counter()
    walt(
        "encode",
        "--config",
        "configs/tokenizer/quickstart.yaml",
        "--checkpoint",
        str(tokenizer_ckpt),
        "--output",
        str(out / "latents"),
        "--overwrite",  # a rerun of the demo replaces its earlier latents
        "--data",
        "configs/data/synthetic_demo.yaml",
        "--batch-size",
        "64",
        "--device",
        "cpu",
    )
    times["encode"] = time.perf_counter() - tic

    tic = time.perf_counter()
    fit_on_latents("configs/base/quickstart.yaml", out, "base")
    base_ckpt = newest_checkpoint(out / "base")
    times["base model"] = time.perf_counter() - tic

    tic = time.perf_counter()
    samples = out / "samples"
    walt(
        "sample",
        "--model",
        str(base_ckpt),  # the checkpoint describes the model: no --config
        "--output",
        str(samples),
        "--overwrite",  # a rerun of the demo replaces its earlier samples
        "--num-samples",
        "16",
        "--steps",
        "50",
        "--device",
        "cpu",
        "--seed",
        "0",
        # The base model trains with label dropout 0.1 so that guidance can sharpen class-following; at
        # scale 2, 15 of 16 samples show their class's colour and motion against 12 without guidance.
        "--guidance",
        "2",
    )
    times["sampling"] = time.perf_counter() - tic

    counts = check_samples(samples)
    text_counts = None
    if args.text:
        tic = time.perf_counter()
        text_counts = text_stage(out)
        times["text-to-video"] = time.perf_counter() - tic
    cascade = None
    if args.cascade:
        tic = time.perf_counter()
        cascade = cascade_stage(out, base_ckpt)
        times["cascade"] = time.perf_counter() - tic
    text_cascade = None
    if args.text_cascade:
        tic = time.perf_counter()
        text_cascade = text_cascade_stage(out, newest_checkpoint(out / "text"))
        times["text cascade"] = time.perf_counter() - tic
    total = time.perf_counter() - start
    print("\ntimes: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total:.0f} s")
    report(counts, "class")
    print(f"open {samples}/grid.gif to watch them (row-major, class = sample index mod 8)")
    if text_counts is not None:
        report(text_counts, "prompt")
        print(f"open {out / 'text_samples'}/grid.gif (row-major, prompt = sample index mod 8)")
    if cascade is not None:
        report(cascade["high_res_following"], "class (64x64 cascade output)")
        print(
            f"cascade output downsampled vs its base video: {cascade['psnr_db']:.1f} dB PSNR (tokenizer floor "
            f"{cascade['floor_psnr_db']:.1f} dB, another sample's base video {cascade['mismatch_psnr_db']:.1f} dB); "
            f"{cascade['nearest_is_own']} of {cascade['samples']} closest to their own base video; "
            f"{out / 'cascade.gif'}"
        )
    if text_cascade is not None:
        print(
            f"text cascade ({out / 'text_cascade.json'}, {out / 'text_cascade.gif'}): {json.dumps(text_cascade)}"
        )


if __name__ == "__main__":
    main()
