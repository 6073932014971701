"""``walt sample``: videos from a trained model (a model folder or a ``walt fit`` checkpoint) or a cascade,
through :class:`walt.pipeline.Pipeline`, written as MP4 files, a GIF grid and samples.json (everything needed to
regenerate each file)."""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import jsonargparse
import lightning as L
import torch
import yaml

import walt
from walt.atomic import TEMP_SUFFIX, write_atomic
from walt.checks import (
    finite_float,
    guidance_interval_problem,
    int_at_least,
    nonnegative_float,
    positive_float,
)
from walt.data import VideoReadError, write_video
from walt.diffusion import SAMPLERS
from walt.lightning import DiffusionModule
from walt.pipeline import CascadePipeline, ModelFileError, Pipeline, read_checkpoint
from walt.transformer.float8 import FLOAT8_RECIPES

__all__ = ["build_module", "load_module", "load_pipeline", "read_prompts", "sample_main"]


def build_module(config: str | Path, compile: bool | None = None) -> tuple[DiffusionModule, dict]:
    """Builds the ``model`` of a training config with fresh weights (the tokenizer's are left to a checkpoint).

    ``compile`` overrides the config's ``compile`` (None keeps it).
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
    module = parser.instantiate_classes(parser.parse_object({"model": model_section})).model
    if not isinstance(module, DiffusionModule):
        raise ValueError(f"{config} describes a {type(module).__name__}, not a diffusion model")
    return module, config_dict


def load_module(
    config: str | Path, checkpoint: str | Path, device: str = "cpu", compile: bool | None = None
) -> tuple[DiffusionModule, dict]:
    """A checkpoint's training module, rebuilt from its training ``config`` (for checkpoints that predate model
    descriptions, and for training-side uses such as distillation teachers); weights only."""
    module, config_dict = build_module(config, compile)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    module.load_state_dict(read_checkpoint(checkpoint)["state_dict"])
    return module.to(device).eval(), config_dict


def load_pipeline(
    model: str | Path, config: str | Path | None = None, device: str = "cpu", weights: str = "ema"
) -> Pipeline:
    """A pipeline from a model folder or a checkpoint; ``config`` only for a checkpoint without a description."""
    if config is None:
        return Pipeline.from_pretrained(model, device=device, weights=weights)
    module, config_dict = load_module(config, model, device, compile=False)
    module.set_class_names(_data_class_names(config_dict))
    return module.pipeline()


def _data_class_names(config: dict) -> list[str]:
    """The class names of a training config's data, when the data is present here (else none)."""
    try:
        parser = jsonargparse.ArgumentParser(exit_on_error=False)
        parser.add_argument("--data", type=L.LightningDataModule)
        data = parser.instantiate_classes(parser.parse_object({"data": config["data"]})).data
        return list(getattr(data.train, "classes", ()) or ())
    except (OSError, ValueError, KeyError, TypeError, jsonargparse.ArgumentError):
        return []  # the data need not be present where one samples; names are then unknown


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
    p.add_argument("--model", help="a model folder (walt export) or a walt fit checkpoint (.ckpt)")
    p.add_argument("--checkpoint", help="the same as --model (a walt fit checkpoint)")
    p.add_argument(
        "--config",
        help="the training config, only for a checkpoint written before models described themselves",
    )
    p.add_argument(
        "--cascade", help="a cascade folder (walt export with several checkpoints) or a cascade YAML"
    )
    p.add_argument("--output", default="samples", help="folder for the MP4 files, grid.gif and samples.json")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder that holds samples")
    p.add_argument("--class", dest="classes", action="append", default=[],
                   help="class index or name; repeat for several (cycled over the samples)")  # fmt: skip
    p.add_argument("--prompt", dest="prompts", action="append", default=[],
                   help='text prompt for a text-to-video model; repeat for several ("" = unconditional)')  # fmt: skip
    p.add_argument("--prompts-file", help="text file with one prompt per line (blank lines are skipped)")
    p.add_argument(
        "--num-samples", type=int_at_least(1), help="videos to generate (default: one per prompt, else 8)"
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument(
        "--frames", type=int_at_least(1), help="pixel frames, 1 + 4k (default: the training length)"
    )
    p.add_argument("--height", type=int_at_least(1), help="pixel height (default: the training size)")
    p.add_argument("--width", type=int_at_least(1), help="pixel width (default: the training size)")
    p.add_argument(
        "--context", help="video or image whose first frames are given (frame prediction / image-to-video)"
    )
    p.add_argument(
        "--context-frames", type=int_at_least(1), default=1, help="pixel frames of --context to keep, 1 + 4j"
    )
    p.add_argument("--extend", type=int_at_least(0), default=0,
                   help="extra segments generated autoregressively, each conditioned on the previous frames")  # fmt: skip
    p.add_argument(
        "--steps",
        type=int_at_least(1),
        help="sampling steps (default: the model's own: 50, or K for a K-step student)",
    )
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS, help="ddim (default), ddpm, or dpmpp_2m")
    p.add_argument(
        "--guidance", type=finite_float, default=1.0, help="classifier-free guidance scale (1 = none)"
    )
    p.add_argument("--guidance-interval", nargs=2, type=finite_float, metavar=("LO", "HI"),
                   help="guide only at diffusion times LO < t <= HI (t = 1 is noise); the other steps run the "
                   "conditional pass alone (default: guide at every step)")  # fmt: skip
    p.add_argument(
        "--eta", type=finite_float, default=0.0, help="DDIM noise: 0 = deterministic, 1 = ancestral"
    )
    p.add_argument("--seed", type=int, default=0, help="sample i gets seed + i (its own generator)")
    p.add_argument(
        "--weights", default="ema", choices=["ema", "live"], help="a checkpoint's EMA or trained weights"
    )
    p.add_argument("--adapter", dest="adapters", action="append", default=[], type=adapter_argument,
                   help="a LoRA adapter file, optionally with its scale: PATH or PATH:SCALE; repeat for several")  # fmt: skip
    p.add_argument("--merge-adapters", action="store_true",
                   help="merge the adapters into the weights before sampling (faster; equal up to rounding)")  # fmt: skip
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser and the decoder (GPU, many samples)",
    )
    p.add_argument("--float8", choices=FLOAT8_RECIPES,
                   help="FP8 matmuls in the blocks (rowwise or tensorwise scales; GPU with FP8 tensor cores, "
                   "pip install 'walt[fp8]')")  # fmt: skip
    p.add_argument("--cache-threshold", type=nonnegative_float, default=0.0,
                   help="first-block caching: reuse the deeper blocks' residual while the first block's changes "
                   "by less than this (0 = off, exact; 0.05-0.2 trades fidelity for speed, README)")  # fmt: skip
    p.add_argument("--bf16", action="store_true", help="run the networks under bfloat16 autocast (GPU)")
    p.add_argument("--fps", type=positive_float, help="frame rate of the files (default: the model's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(list(argv))
    if args.model and args.checkpoint:
        p.error("--model and --checkpoint name the same thing: give one")
    args.model = args.model or args.checkpoint
    if (args.cascade is None) == (args.model is None):
        p.error("give --model (a model folder or checkpoint) or --cascade (a cascade folder)")
    per_stage = (
        args.steps is not None or args.guidance != 1.0 or args.cache_threshold or args.guidance_interval
    )
    if args.cascade is not None and per_stage:
        p.error(
            "with --cascade, steps, guidance, guidance_interval and cache_threshold are set per stage (the cascade "
            "YAML or cascade.json)"
        )
    problem = guidance_interval_problem(args.guidance_interval, args.guidance)
    if problem:
        p.error(problem)
    if args.eta < 0:
        p.error(f"--eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM noise), got {args.eta}")
    if args.context is not None and not Path(args.context).is_file():
        p.error(f"--context {args.context}: no such file")
    if args.float8 and args.cascade is not None:
        p.error("--float8 applies to one model (--model), not to a cascade")
    if args.float8 and not args.bf16:
        p.error("--float8 runs under bfloat16 autocast: add --bf16")
    if args.float8 and args.adapters:
        p.error(
            "--float8 quantizes the weights the adapters would sit on: merge the adapters into a model and save it "
            "(Pipeline.merge_and_unload, save_pretrained), then sample that model with --float8"
        )
    if args.adapters and args.cascade is not None:
        p.error("--adapter applies to one model (--model), not to a cascade")
    return args


def adapter_argument(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` -> (path, scale); a path that itself ends in ``:<number>`` is read as one."""
    path, sep, scale = text.rpartition(":")
    try:
        float(scale)
    except ValueError:
        return text, 1.0
    if not sep or not path:
        return text, 1.0
    return path, finite_float(scale)


def sample_main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    out = Path(args.output)
    _check_output(out, args.overwrite)  # refused before the model loads; nothing is created or removed yet
    dtype = torch.bfloat16 if args.bf16 else None
    try:
        if args.cascade is not None:
            runner = CascadePipeline.from_pretrained(args.cascade, device=args.device, dtype=dtype)
            pipe = runner.stages[0]
        else:
            pipe = load_pipeline(args.model, args.config, args.device, args.weights).to(args.device, dtype)
            for path, scale in args.adapters:
                pipe.load_adapter(path, scale)
            if args.merge_adapters:
                pipe.merge_adapters()
            if args.float8:
                pipe.quantize_float8(args.float8)
            runner = pipe.compile() if args.compile else pipe
    except (FileNotFoundError, ModelFileError, ImportError, ValueError) as err:
        raise SystemExit(f"walt sample: {err}") from None
    if args.context is not None and not pipe.backbone.context_frames:  # known now, before any other work
        raise SystemExit("walt sample: --context given but the model was not trained with context frames")
    prompts = _prompts(args, pipe)
    n = args.num_samples or (len(prompts) if prompts else 8)
    labels = _labels(args, pipe, n)
    prompts = None if prompts is None else [prompts[i % len(prompts)] for i in range(n)]
    seeds = [args.seed + i for i in range(n)]
    settings = dict(
        context=args.context,
        context_frames=args.context_frames if args.context else None,
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        extend=args.extend,
    )
    if args.cascade is None:
        settings.update(
            steps=args.steps,
            guidance=args.guidance,
            eta=args.eta,
            sampler=args.sampler,
            cache_threshold=args.cache_threshold,
            guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
        )
    try:
        videos = runner.generate(labels, prompts, seeds=seeds, batch_size=args.batch_size, **settings)
    except (ValueError, FileNotFoundError, VideoReadError) as err:  # a bad setting or context file
        raise SystemExit(f"walt sample: {err}") from None
    fps = runner.fps if args.fps is None else args.fps
    stats = _cache_stats(runner)
    if stats:
        reused = f"{stats['cached']} of {stats['full'] + stats['cached']}"
        print(f"first-block cache: {reused} passes reused", file=sys.stderr)
    record = {
        "model": str(args.model or args.cascade),
        "kind": "cascade" if args.cascade else "model",
        "weights": args.weights,
        **({"adapters": [{"name": n, **a} for n, a in pipe.adapters.items()]} if pipe.adapters else {}),
        **({"adapters_merged": True} if args.merge_adapters else {}),
        **{k: v for k, v in settings.items() if k != "context"},
        "context": args.context,
        "steps": pipe.sample_steps if args.steps is None and args.cascade is None else args.steps,
        "fps": fps,
        **({"cache_stats": stats} if stats else {}),
        **({"float8": args.float8} if args.float8 else {}),
        "walt_version": walt.__version__,
    }
    _write(_prepare_output(out, args.overwrite), videos, labels, prompts, seeds, pipe, record)
    return 0


def _cache_stats(runner: Pipeline | CascadePipeline) -> dict[str, int] | None:
    """Full and cached passes of first-block caching over every stage that used it (None: none did)."""
    stages = runner.stages if isinstance(runner, CascadePipeline) else [runner]
    totals = {key: sum(stage.cache_stats[key] for stage in stages) for key in ("full", "cached")}
    return totals if any(totals.values()) else None


def _check_output(out: Path, overwrite: bool) -> None:
    """The output folder will hold only this run's samples: an earlier run's files are refused, or (with
    --overwrite) replaced once the new samples exist, never mixed in."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"walt sample: --output {out} is a file; give a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise SystemExit(
                f"walt sample: {out} is not empty; choose a new --output or pass --overwrite to replace it"
            )
        if not _holds_only_samples(out):
            raise SystemExit(f"walt sample: {out} holds files that are not walt samples; not overwriting it")


def _prepare_output(out: Path, overwrite: bool) -> Path:
    """Creates the checked output folder when there is something to write, so a refused setting (a wrong
    class, a bad prompt) leaves no empty folder, and an earlier run's samples survive a failed new run."""
    _check_output(out, overwrite)  # again: the folder may have changed while the samples were generated
    if out.exists() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _holds_only_samples(out: Path) -> bool:
    """A finished run's folder (samples.json), or what a killed run left: its videos and temporary files."""
    if (out / "samples.json").is_file():
        return True
    written = ("sample_*.mp4", "grid.gif", f".*{TEMP_SUFFIX}")
    return all(p.is_file() and any(fnmatch.fnmatch(p.name, w) for w in written) for p in out.iterdir())


def _labels(args: argparse.Namespace, pipe: Pipeline, n: int) -> list[int] | None:
    if pipe.backbone.num_classes is None:
        if args.classes:
            raise SystemExit("walt sample: --class given but the model is not class-conditional")
        return None
    if not args.classes:
        return [i % pipe.backbone.num_classes for i in range(n)]
    try:
        chosen = [pipe.class_index(c) for c in args.classes]
    except ValueError as err:
        raise SystemExit(f"walt sample: {err}") from None
    return [chosen[i % len(chosen)] for i in range(n)]


def _prompts(args: argparse.Namespace, pipe: Pipeline) -> list[str] | None:
    prompts = read_prompts(args.prompts, args.prompts_file)
    if pipe.backbone.text_dim is None:
        if prompts:
            raise SystemExit("walt sample: --prompt given but the model is not text-conditional")
        return None
    if not prompts:
        raise SystemExit(
            "walt sample: the model is text-to-video: give --prompt (repeatable) or --prompts-file "
            '(--prompt "" samples unconditionally)'
        )
    return prompts


def _write(out: Path, videos: torch.Tensor, labels, prompts, seeds, pipe: Pipeline, record: dict) -> None:
    """One MP4 per video (N, T, H, W, 3) uint8, a GIF grid of all, and samples.json: per file, its seed, class,
    prompt and every setting it was generated with."""
    index = []
    for i, video in enumerate(videos):
        tag = f"_class{labels[i]}" if labels is not None else ""
        name = f"sample_{i:03d}{tag}.mp4"
        write_video(out / name, video.numpy(), fps=record["fps"])
        entry = {"file": name, "seed": seeds[i]}
        if labels is not None:
            entry["class"] = labels[i]
            if pipe.class_names and labels[i] >= 0:
                entry["class_name"] = pipe.class_names[labels[i]]
        if prompts is not None:
            entry["prompt"] = prompts[i]
        index.append({**entry, **record})
    write_video(out / "grid.gif", _grid(videos).numpy(), fps=record["fps"])
    write_atomic(out / "samples.json", json.dumps(index, indent=2))  # last: the folder is complete
    T, H, W = videos.shape[1:4]
    print(f"walt sample: {len(videos)} videos of {T} frames at {H}x{W} -> {out}")


def _grid(videos: torch.Tensor) -> torch.Tensor:
    """(N, T, H, W, 3) uint8 -> one (T, rows*H, cols*W, 3) video, black where the grid has no video."""
    n = videos.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = torch.cat([videos, torch.zeros((rows * cols - n, *videos.shape[1:]), dtype=videos.dtype)])
    return torch.cat([torch.cat(list(tiles[r * cols : (r + 1) * cols]), dim=2) for r in range(rows)], dim=1)
