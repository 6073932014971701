"""``walt export``: a trained model as a folder to share and load anywhere (safetensors, JSON, model card).

    walt export --checkpoint outputs/base/checkpoints/last.ckpt --output models/base
    walt export --checkpoint base.ckpt --checkpoint sr1.ckpt --checkpoint sr2.ckpt --output models/cascade \\
        --stage-settings '{"steps": 50}' '{"aug_level": 0.1}' '{"aug_level": 0.1}'

One checkpoint gives a model folder; several give a cascade folder (the first a base model, the rest
super-resolution stages). EMA weights are exported unless ``--no-ema``. ``--metrics result.json`` adds a
``walt evaluate`` result to the model card and model.json. A LoRA run's checkpoint exports its adapter
(``--output adapter.safetensors``) or, with ``--merge-adapters``, its base model with the adapter merged.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from walt.pipeline.files import load_model
from walt.pipeline.parts import ModelFileError
from walt.pipeline.pipeline import CascadePipeline

__all__ = ["export_main"]


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="walt export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a walt fit checkpoint (or model folder); repeat for a cascade, base first")  # fmt: skip
    p.add_argument(
        "--output", required=True, help="the folder to write (replaced only if it is a walt model folder)"
    )
    p.add_argument("--no-ema", action="store_true", help="export the trained weights, not their EMA")
    p.add_argument("--stage-settings", nargs="*", default=None,
                   help="per stage, a JSON object of sampler settings (steps, guidance, eta, sampler, aug_level, cache_threshold, guidance_interval)")  # fmt: skip
    p.add_argument("--metrics", type=Path, help="a walt evaluate result (JSON) to record in the model card")
    p.add_argument("--merge-adapters", action="store_true",
                   help="a LoRA run's checkpoint: write its base and adapter merged, as one model folder")  # fmt: skip
    return p.parse_args(list(argv))


def export_main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    weights = "live" if args.no_ema else "ema"
    try:
        stages = [load_model(path, weights=weights) for path in args.checkpoint]
        if args.metrics is not None:
            result = json.loads(args.metrics.read_text())
            name = result.get("protocol", args.metrics.stem)
            stages[-1].info.setdefault("metrics", {})[name] = result.get("value", result)
        if len(stages) == 1 and stages[0].adapters:  # a LoRA run's checkpoint: its adapter, or merged
            if str(args.output).endswith(".safetensors"):
                out = stages[0].save_adapter(args.output)
                print(f"walt export: the adapter of {args.checkpoint[0]} -> {out}")
                return 0
            if not args.merge_adapters:
                raise ValueError(
                    f"{args.checkpoint[0]} is a LoRA run's checkpoint: give --output <file>.safetensors to write "
                    "its adapter, or --merge-adapters to write its base with the adapter merged as a model folder"
                )
            stages[0].merge_and_unload()
        if len(stages) == 1:
            if args.stage_settings:
                raise ValueError("--stage-settings is for cascades (several --checkpoint)")
            out = stages[0].save_pretrained(args.output)
        else:
            settings = [json.loads(s) for s in args.stage_settings] if args.stage_settings else None
            out = CascadePipeline(stages, settings).save_pretrained(args.output)
    except (FileNotFoundError, FileExistsError, ModelFileError, ValueError, json.JSONDecodeError) as err:
        print(f"walt export: {err}")
        return 1
    kinds = ", ".join("super-resolution" if s.super_resolution else "base" for s in stages)
    print(f"walt export: {kinds} ({weights} weights) -> {out}")
    return 0
