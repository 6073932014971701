"""``walt sample``: videos from a trained base model, or from a cascade (base -> super-resolution stages),
written as MP4 files, a GIF grid and samples.json (what each file was asked for)."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import jsonargparse
import lightning as L
import numpy as np
import torch
import yaml
from PIL import Image
from tqdm.auto import tqdm

from walt.data import read_video, resize_center_crop, to_float_video, to_uint8, write_video
from walt.lightning.cascade import decode_latents, read_cascade, upsample_stage
from walt.lightning.diffusion import BaseDiffusionModule
from walt.lightning.super_resolution import SuperResolutionModule

__all__ = ["build_module", "load_module", "read_prompts", "resolve_labels", "sample_main"]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def build_module(config: str | Path, compile: bool | None = None) -> tuple[BaseDiffusionModule, dict]:
    """Builds the ``model`` of a training config with fresh weights (the tokenizer's are left to a checkpoint).

    ``compile`` overrides the config's ``compile`` (None keeps it): compiling pays off for long sampling runs
    on a GPU, not for a few videos or on a CPU.
    """
    config_dict = yaml.safe_load(Path(config).read_text())
    if not isinstance(config_dict, dict) or "model" not in config_dict:
        raise ValueError(f"{config} has no model section: pass the config the model was trained with")
    model_section = dict(config_dict["model"])
    model_section["init_args"] = dict(
        model_section.get("init_args", {}), tokenizer_weights=None
    )  # in the ckpt
    if compile is not None:
        model_section["init_args"]["compile"] = compile
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--model", type=L.LightningModule)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    module = instantiate(parser.parse_object({"model": model_section})).model
    if not isinstance(module, BaseDiffusionModule):
        raise ValueError(f"{config} describes a {type(module).__name__}, not a diffusion model")
    return module, config_dict


def load_module(
    config: str | Path, checkpoint: str | Path, device: str = "cpu", compile: bool | None = None
) -> tuple[BaseDiffusionModule, dict]:
    """Builds the ``model`` of a training config and loads a checkpoint's weights into it (weights only);
    ``compile`` as in :func:`build_module`."""
    module, config_dict = build_module(config, compile)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    module.load_state_dict(state["state_dict"])
    return module.to(device).eval(), config_dict


def class_names(config: dict) -> list[str]:
    """The training data's class names, when its dataset has them (``classes``)."""
    try:
        parser = jsonargparse.ArgumentParser(exit_on_error=False)
        parser.add_argument("--data", type=L.LightningDataModule)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        data = instantiate(parser.parse_object({"data": config["data"]})).data
        return list(getattr(data.train, "classes", ()) or ())
    except (OSError, ValueError, KeyError, TypeError, jsonargparse.ArgumentError):
        return []  # the data need not be present where one samples; names are then unknown


def resolve_labels(requested: Sequence[str], names: Sequence[str], num_classes: int) -> list[int]:
    """Class indices from indices or names ("3", "red circle moving left")."""
    labels = []
    for item in requested:
        if item.lstrip("-").isdigit():
            index = int(item)
        elif item in names:
            index = list(names).index(item)
        else:
            known = (
                f"; known classes: {', '.join(names)}"
                if names
                else " (the training data has no class names here)"
            )
            raise ValueError(f"unknown class {item!r}{known}")
        if not -1 <= index < num_classes:
            raise ValueError(f"class index {index} is outside 0..{num_classes - 1} (-1 = unconditional)")
        labels.append(index)
    return labels


def read_prompts(prompts: Sequence[str], prompts_file: str | Path | None) -> list[str]:
    """``--prompt`` values, then the non-blank lines of ``--prompts-file`` (one prompt per line)."""
    found = list(prompts)
    if prompts_file is not None:
        path = Path(prompts_file)
        if not path.is_file():
            raise SystemExit(f"walt sample: prompts file not found: {path}")
        found += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return found


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="walt sample", description=__doc__)
    p.add_argument("--config", help="the config the model was trained with")
    p.add_argument("--checkpoint", help="a BaseDiffusionModule .ckpt")
    p.add_argument(
        "--cascade",
        help="a cascade YAML (base, then super-resolution stages, each with config, checkpoint, steps, "
        "guidance, aug_level) instead of --config/--checkpoint",
    )
    p.add_argument("--output", default="samples", help="folder for the MP4 files and grid.gif")
    p.add_argument(
        "--class",
        dest="classes",
        action="append",
        default=[],
        help="class index or name; repeat for several (cycled over the samples)",
    )
    p.add_argument(
        "--prompt",
        dest="prompts",
        action="append",
        default=[],
        help='text prompt for a text-to-video model; repeat for several ("" = unconditional)',
    )
    p.add_argument("--prompts-file", help="text file with one prompt per line (blank lines are skipped)")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="videos to generate, cycling over the prompts or classes (default: one per prompt, else 8)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frames", type=int, help="pixel frames, 1 + 4k (default: the training length)")
    p.add_argument(
        "--context", help="video or image whose first frames are given (frame prediction / image-to-video)"
    )
    p.add_argument("--context-frames", type=int, default=1, help="pixel frames of --context to keep, 1 + 4j")
    p.add_argument(
        "--extend",
        type=int,
        default=0,
        help="extra segments generated autoregressively, each conditioned on the previous frames",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="DDIM steps (default: the model's sample_steps, 50 for a base model, K for a K-step distilled "
        "student; a cascade sets them per stage)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale (default 1 = none; per stage in a cascade)",
    )
    p.add_argument("--eta", type=float, default=0.0, help="0 = DDIM, 1 = ancestral")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the models (GPU, many samples); by default they run eager whatever the config says",
    )
    p.add_argument("--fps", type=float, default=8.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(list(argv))
    if (args.cascade is None) == (args.config is None or args.checkpoint is None):
        p.error("give either --config and --checkpoint (one model) or --cascade (a cascade YAML)")
    if args.cascade is not None and (args.steps is not None or args.guidance is not None):
        p.error("with --cascade, steps and guidance are set per stage in the cascade YAML")
    args.guidance = 1.0 if args.guidance is None else args.guidance
    return args


def sample_main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    if args.cascade is not None:
        return cascade_main(args)
    module, config = load_module(args.config, args.checkpoint, args.device, args.compile)
    # The model's own step count: 50 for a base model, K for a distilled student (trained only at K steps).
    args.steps = module.sample_steps if args.steps is None else args.steps
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    z, labels, prompts = generate_latents(module, config, args, generator)
    videos = decode_latents(module.tokenizer, z, module.tokenizer_chunk_size, args.batch_size, args.device)
    _write(videos, labels, prompts, args)
    return 0


def cascade_main(args: argparse.Namespace) -> int:
    """Base -> super-resolution stages -> chunked decode; one stage's model (and the previous tokenizer) in
    memory at a time."""
    cascade = read_cascade(args.cascade)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    first = cascade.stages[0]
    module, config = load_module(first.config, first.checkpoint, args.device, args.compile)
    if isinstance(module, SuperResolutionModule):
        raise SystemExit(
            f"walt sample: the first cascade stage ({first.config}) must be a base model, not SR"
        )
    settings = {"steps": first.steps or module.sample_steps, "guidance": first.guidance, "eta": first.eta}
    z, labels, prompts = generate_latents(
        module, config, argparse.Namespace(**{**vars(args), **settings}), generator
    )
    tokenizer = module.tokenizer
    del module  # freed before the next stage loads
    for i, stage in enumerate(cascade.stages[1:], start=1):
        module = load_module(stage.config, stage.checkpoint, args.device, args.compile)[0]
        if not isinstance(module, SuperResolutionModule):
            raise SystemExit(
                f"walt sample: cascade stage {i} ({stage.config}) is not a SuperResolutionModule"
            )
        z = upsample_stage(
            module, z, tokenizer, stage, labels, generator, args.batch_size, cascade.decode_chunk_size
        )
        tokenizer = module.tokenizer
        del module
        print(f"walt sample: stage {i} -> latents {tuple(z.shape[1:])}")
    videos = decode_latents(tokenizer, z, cascade.decode_chunk_size, args.batch_size, args.device)
    _write(videos, labels, prompts, args)
    return 0


def generate_latents(
    module: BaseDiffusionModule, config: dict, args: argparse.Namespace, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """The base model's latents (N, C, T, h, w) on the CPU for the command line's labels/prompts/context/
    extension, with the labels and prompts each sample was given."""
    backbone = module.sampling_backbone
    latent_t, latent_h, latent_w = backbone_latent_grid(module, args.frames)
    shape = (backbone.in_channels, latent_t, latent_h, latent_w)
    prompts = _prompts(args, module)
    if args.num_samples is None:
        args.num_samples = len(prompts) if prompts else 8
    prompts = None if prompts is None else [prompts[i % len(prompts)] for i in range(args.num_samples)]
    labels = _labels(args, module, config)
    context, known = _context(args, module, shape)
    if args.extend and not backbone.context_frames:
        raise SystemExit(
            "walt sample: --extend needs a model trained with context frames (context_frames: true)"
        )
    latents = []
    for start in tqdm(range(0, args.num_samples, args.batch_size), desc="walt sample"):
        n = min(args.batch_size, args.num_samples - start)
        given = {
            "labels": None if labels is None else labels[start : start + n],
            "prompts": None if prompts is None else prompts[start : start + n],
        }
        batch_context = None if context is None else context.expand(n, -1, -1, -1, -1)
        z = _segment(module, n, shape, given, batch_context, known, args, generator)
        for _ in range(args.extend):
            z = _extend(module, z, shape, given, args, generator)
        latents.append(z.cpu())  # (n, C, T, h, w)
    return torch.cat(latents), labels, prompts


def _write(
    videos: torch.Tensor, labels: torch.Tensor | None, prompts: list[str] | None, args: argparse.Namespace
) -> None:
    """One MP4 per video (N, 3, T, H, W), a GIF grid of all, and samples.json (file, class, prompt, seed)."""
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for i, video in enumerate(videos):
        tag = f"_class{int(labels[i])}" if labels is not None else ""
        name = f"sample_{i:03d}{tag}.mp4"
        write_video(out / name, to_uint8(video).numpy(), fps=args.fps)
        entry = {"file": name, "seed": args.seed}
        if labels is not None:
            entry["class"] = int(labels[i])
        if prompts is not None:
            entry["prompt"] = prompts[i]
        index.append(entry)
    write_video(out / "grid.gif", to_uint8(_grid(videos)).numpy(), fps=args.fps)
    (out / "samples.json").write_text(json.dumps(index, indent=2))
    print(
        f"walt sample: {len(videos)} videos of {videos.shape[2]} frames at {videos.shape[3]}x{videos.shape[4]} -> {out}"
    )


def backbone_latent_grid(module: BaseDiffusionModule, frames: int | None) -> tuple[int, int, int]:
    t, h, w = module.sampling_backbone.input_size
    if frames is not None:
        if frames < 1 or (frames - 1) % 4:
            raise SystemExit(f"walt sample: --frames must be 1 + 4k (e.g. 17), got {frames}")
        t = (frames - 1) // 4 + 1
    return t, h, w


def _labels(args: argparse.Namespace, module: BaseDiffusionModule, config: dict) -> torch.Tensor | None:
    num_classes = module.sampling_backbone.num_classes
    if num_classes is None:
        if args.classes:
            raise SystemExit("walt sample: --class given but the model is not class-conditional")
        return None
    if not args.classes:
        return torch.arange(args.num_samples, device=args.device) % num_classes
    chosen = resolve_labels(args.classes, class_names(config), num_classes)
    return torch.tensor([chosen[i % len(chosen)] for i in range(args.num_samples)], device=args.device)


def _prompts(args: argparse.Namespace, module: BaseDiffusionModule) -> list[str] | None:
    prompts = read_prompts(args.prompts, args.prompts_file)
    if module.sampling_backbone.text_dim is None:
        if prompts:
            raise SystemExit("walt sample: --prompt given but the model is not text-conditional")
        return None
    if not prompts:
        raise SystemExit(
            "walt sample: the model is text-to-video: give --prompt (repeatable) or --prompts-file "
            '(--prompt "" samples unconditionally)'
        )
    return prompts


def _context(
    args: argparse.Namespace, module: BaseDiffusionModule, shape: tuple
) -> tuple[torch.Tensor | None, int]:
    if args.context is None:
        return None, 0
    if args.context_frames < 1 or (args.context_frames - 1) % 4:
        raise SystemExit(f"walt sample: --context-frames must be 1 + 4j, got {args.context_frames}")
    path = Path(args.context)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        frames = np.array(Image.open(path).convert("RGB"))[None]  # (1, H, W, 3)
    else:
        frames = read_video(path)[: args.context_frames]  # (T, H, W, 3)
    if len(frames) < args.context_frames:
        raise SystemExit(f"walt sample: {path} has {len(frames)} frames, fewer than --context-frames")
    video = resize_center_crop(to_float_video(frames), (shape[2] * 8, shape[3] * 8))  # (3, T, H, W)
    latent = module.tokenizer.encode(video[None].to(args.device))  # (1, C, 1 + j, h, w)
    context = torch.zeros(1, *shape, device=args.device)
    context[:, :, : latent.shape[2]] = latent
    return context, latent.shape[2]


def _segment(module, n: int, shape: tuple, given: dict, context, known: int, args, generator) -> torch.Tensor:
    """One clip of latents with the command line's sampler settings; ``given``: labels and prompts."""
    return module.sample_latents(
        n,
        shape,
        **given,
        context=context,
        num_context_frames=known,
        guidance=args.guidance,
        steps=args.steps,
        eta=args.eta,
        generator=generator,
    )


def _extend(module, z: torch.Tensor, shape: tuple, given: dict, args, generator) -> torch.Tensor:
    """Generates the next segment with the last latent frames of ``z`` as its given first frames."""
    overlap = max(1, shape[1] // 2)
    context = torch.zeros(z.shape[0], *shape, device=z.device)
    context[:, :, :overlap] = z[:, :, -overlap:]
    nxt = _segment(module, z.shape[0], shape, given, context, overlap, args, generator)
    return torch.cat([z, nxt[:, :, overlap:]], dim=2)


def _grid(videos: torch.Tensor) -> torch.Tensor:
    """(N, 3, T, H, W) -> one (3, T, rows*H, cols*W) video."""
    n = videos.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = torch.full((rows * cols - n, *videos.shape[1:]), -1.0)
    tiles = torch.cat([videos, pad])  # (rows*cols, 3, T, H, W)
    return torch.cat([torch.cat(list(tiles[r * cols : (r + 1) * cols]), dim=-1) for r in range(rows)], dim=-2)
