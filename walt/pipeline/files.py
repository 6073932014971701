"""Model files: a model folder (``walt export``, :meth:`Pipeline.save_pretrained`) and ``walt fit`` checkpoints.

A model folder holds only data, never code or pickles:

    model.json              what the model is (format, kind, each part's class and constructor arguments, the
                            schedule, class names, text encoder identity, sampling defaults, training record)
    backbone.safetensors    the denoiser's weights (a checkpoint's EMA weights unless asked otherwise)
    tokenizer.safetensors   the autoencoder's weights, with its latent normalization
    README.md               the model card

A cascade folder holds ``cascade.json`` (the stages' folder names and sampler settings) and one model folder per
stage. A ``walt fit`` checkpoint carries the same description under ``walt_model`` (written by the diffusion
modules), so it loads without the YAML it was trained from; it is read with ``torch.load(weights_only=True)``,
which refuses any pickled object that is not a tensor or a plain container.

Both kinds of file carry the sha256 of their weights, written with them (:mod:`walt.checkpoint`): loading
refuses a file whose weights changed since, or hold NaN or infinite values, naming the file.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
import yaml

import walt
from walt.checkpoint import CheckpointError, module_weights, read_checkpoint, read_weights, write_weights
from walt.pipeline.card import model_card
from walt.pipeline.parts import ModelFileError, build_part, describe_part
from walt.pipeline.pipeline import CascadePipeline, Pipeline, SuperResolution

__all__ = [
    "FORMAT",
    "describe_pipeline",
    "load_cascade",
    "load_model",
    "load_tokenizer",
    "pipeline_from_description",
    "read_checkpoint",
    "save_cascade",
    "save_model",
]

FORMAT = "walt-model"
CASCADE_FORMAT = "walt-cascade"
FORMAT_VERSION = 1
MODEL_FILE, CASCADE_FILE = "model.json", "cascade.json"


# ---- descriptions ------------------------------------------------------------------------------------------


def describe_pipeline(pipeline: Pipeline) -> dict[str, Any]:
    """The JSON description of a pipeline's model (everything but the weights)."""
    sr = pipeline.super_resolution
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "walt_version": walt.__version__,
        "kind": "super_resolution" if sr is not None else "base",
        "backbone": describe_part("backbone", pipeline.backbone),
        "tokenizer": describe_part("tokenizer", pipeline.tokenizer),
        "schedule": describe_part("schedule", pipeline.schedule),
        "text_encoder": None
        if pipeline.text_encoder is None
        else describe_part("text_encoder", pipeline.text_encoder),
        "class_names": list(pipeline.class_names) or None,
        "sampling": {
            "steps": pipeline.sample_steps,
            "fps": pipeline.fps,
            "tokenizer_chunk_size": pipeline.tokenizer_chunk_size,
        },
        "super_resolution": None if sr is None else vars(sr).copy(),
        **{k: v for k, v in pipeline.info.items() if k in ("weights", "training", "metrics")},
    }


def pipeline_from_description(
    description: dict[str, Any],
    backbone_state: dict[str, torch.Tensor],
    tokenizer_state: dict[str, torch.Tensor],
    text_encoder=None,
    source: str = "the model",
) -> Pipeline:
    """Builds the parts a description names and loads their weights (every key must match)."""
    _check_format(description, FORMAT, source)
    backbone = build_part("backbone", description["backbone"]).eval().requires_grad_(False)
    tokenizer = build_part("tokenizer", description["tokenizer"]).eval().requires_grad_(False)
    _load_state(backbone, backbone_state, "backbone", source)
    _load_state(tokenizer, tokenizer_state, "tokenizer", source)
    schedule = build_part("schedule", description["schedule"]) if description.get("schedule") else None
    recorded = description.get("text_encoder")
    if text_encoder is None and recorded is not None:
        text_encoder = build_part("text_encoder", recorded)
        if recorded.get("identity") and text_encoder.identity != recorded["identity"]:
            import warnings

            warnings.warn(
                f"{source} was trained with the text encoder {recorded['identity']}, but the one found here is "
                f"{text_encoder.identity}: prompts may be understood differently",
                stacklevel=2,
            )
    sampling = description.get("sampling") or {}
    sr = description.get("super_resolution")
    return Pipeline(
        backbone,
        tokenizer,
        schedule,
        text_encoder,
        description.get("class_names") or None,
        sample_steps=int(sampling.get("steps", 50)),
        tokenizer_chunk_size=sampling.get("tokenizer_chunk_size"),
        fps=float(sampling.get("fps", 8.0)),
        super_resolution=None if sr is None else SuperResolution(**sr),
        info={k: description[k] for k in ("weights", "training", "metrics") if k in description},
    )


# ---- model folders -----------------------------------------------------------------------------------------


def save_model(pipeline: Pipeline, path: str | Path, card: str | None = None) -> Path:
    """Writes a model folder (see the module docstring) atomically: into a temporary sibling, then renamed."""
    path = Path(path)
    description = describe_pipeline(pipeline)
    with _atomic_folder(path) as tmp:
        _save_tensors(pipeline.backbone.state_dict(), tmp / "backbone.safetensors", {"role": "backbone"})
        _save_tensors(pipeline.tokenizer.state_dict(), tmp / "tokenizer.safetensors", {"role": "tokenizer"})
        (tmp / MODEL_FILE).write_text(json.dumps(description, indent=2) + "\n")
        (tmp / "README.md").write_text(card if card is not None else model_card(description))
    return path


def load_model(path: str | Path, weights: str = "ema", text_encoder=None) -> Pipeline:
    """A :class:`Pipeline` from a model folder or a ``walt fit`` checkpoint."""
    path = Path(path)
    if path.is_dir():
        if (path / CASCADE_FILE).is_file():
            raise ModelFileError(f"{path} is a cascade: load it with CascadePipeline.from_pretrained")
        description = _read_json(path / MODEL_FILE, path)
        return pipeline_from_description(
            description,
            _load_tensors(path / "backbone.safetensors", path),
            _load_tensors(path / "tokenizer.safetensors", path),
            text_encoder,
            str(path),
        )
    if path.is_file():
        return pipeline_from_checkpoint(path, weights, text_encoder)
    raise FileNotFoundError(f"no model at {path}: give a model folder (walt export) or a walt fit checkpoint")


def pipeline_from_checkpoint(path: Path, weights: str = "ema", text_encoder=None) -> Pipeline:
    checkpoint = _checked(read_checkpoint, path)
    description = checkpoint.get("walt_model")
    if not isinstance(description, dict):
        raise ModelFileError(
            f"{path} holds no model description (written by an older walt, or not by a diffusion module): "
            "sample it with `walt sample --config <its training config> --checkpoint ...`"
        )
    if weights not in ("ema", "live"):
        raise ValueError(f"weights must be 'ema' or 'live', got {weights!r}")
    state = checkpoint["state_dict"]
    if isinstance(checkpoint.get("walt_lora"), dict):  # a LoRA run: its base model with the adapter loaded
        return _lora_checkpoint(checkpoint, description, path, text_encoder)
    backbone, which = _checked(module_weights, state, "backbone.", weights == "ema", path)
    description = {**description, "weights": which}
    return pipeline_from_description(
        description,
        backbone,
        _strip(state, "tokenizer."),
        text_encoder,
        str(path),
    )


def _lora_checkpoint(checkpoint: dict, description: dict, path: Path, text_encoder=None) -> Pipeline:
    """The base model of a LoRA run's checkpoint (``walt_lora``: the adapter's description), with its adapter
    loaded under the name "default" (unmerged, scale 1); the base weights are checked against the identity the
    adapter records."""
    from walt.lora import split_training_state

    adapter = checkpoint["walt_lora"]
    base_state, tensors = split_training_state(_strip(checkpoint["state_dict"], "backbone."), adapter)
    names = description.get("class_names") or []
    base = {
        **description,
        "backbone": adapter["base"]["backbone"],
        "class_names": names[: len(names) - len(adapter["new_classes"])] or None,
        "weights": "live",  # a LoRA run keeps no EMA
    }
    pipe = pipeline_from_description(
        base, base_state, _strip(checkpoint["state_dict"], "tokenizer."), text_encoder, str(path)
    )
    pipe._adapter_set().add(tensors, adapter, 1.0, "default", str(path))
    return pipe


def load_tokenizer(path: str | Path, weights: str = "ema"):
    """The tokenizer (a :class:`CausalVAE` with its latent normalization) of: a model folder or diffusion
    checkpoint (its tokenizer), a tokenizer ``walt fit`` checkpoint (which describes its autoencoder), or what
    `walt encode` writes (a folder holding ``vae.yaml`` and ``vae.safetensors``, or that ``vae.safetensors``)."""
    path = Path(path)
    if path.suffix == ".safetensors" or (path.is_dir() and (path / "vae.yaml").is_file()):
        folder = path.parent if path.suffix == ".safetensors" else path
        weights_file = path if path.suffix == ".safetensors" else folder / "vae.safetensors"
        spec = folder / "vae.yaml"
        if not spec.is_file():
            raise ModelFileError(f"{spec} is missing: `walt encode` writes it beside vae.safetensors")
        vae = _checked(build_part, "tokenizer", yaml.safe_load(spec.read_text()))
        _load_state(vae, _load_tensors(weights_file, folder), "tokenizer", str(weights_file))
        return vae.eval()
    if path.is_file():
        checkpoint = _checked(read_checkpoint, path)
        if isinstance(checkpoint.get("walt_tokenizer"), dict):
            vae = _checked(build_part, "tokenizer", checkpoint["walt_tokenizer"])
            state, _ = _checked(module_weights, checkpoint["state_dict"], "vae.", weights == "ema", path)
            _load_state(vae, state, "tokenizer", str(path))
            return vae.eval()
    return load_model(path, weights).tokenizer


# ---- cascades ----------------------------------------------------------------------------------------------


def save_cascade(cascade: CascadePipeline, path: str | Path) -> Path:
    path = Path(path)
    with _atomic_folder(path) as tmp:
        names = [f"stage{i}" for i in range(len(cascade.stages))]
        for name, stage in zip(names, cascade.stages):
            save_model(stage, tmp / name)
        spec = {
            "format": CASCADE_FORMAT,
            "format_version": FORMAT_VERSION,
            "walt_version": walt.__version__,
            "stages": [{"path": n, "settings": s} for n, s in zip(names, cascade.stage_settings)],
        }
        (tmp / CASCADE_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        (tmp / "README.md").write_text(_cascade_card(cascade, names))
    return path


STAGE_SETTINGS = ("steps", "guidance", "eta", "sampler", "aug_level", "cache_threshold", "guidance_interval")


def load_cascade(path: str | Path) -> CascadePipeline:
    """A cascade folder (``cascade.json`` + stage folders), or a cascade YAML listing each stage's model (a
    folder or a checkpoint) and sampler settings::

        stages:
          - {model: outputs/base/checkpoints/last.ckpt, steps: 50, guidance: 1.0}
          - {model: outputs/sr1/checkpoints/last.ckpt, steps: 50, aug_level: 0.1}
    """
    path = Path(path)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _cascade_from_yaml(path)
    spec = _read_json(path / CASCADE_FILE, path)
    _check_format(spec, CASCADE_FORMAT, str(path))
    stages, settings = [], []
    for entry in spec.get("stages", []):
        folder = (path / entry["path"]).resolve()
        if path.resolve() not in folder.parents:
            raise ModelFileError(f"{path}: stage folder {entry['path']!r} lies outside the cascade folder")
        stages.append(load_model(folder))
        settings.append(entry.get("settings") or {})
    return CascadePipeline(stages, settings)


def _cascade_from_yaml(path: Path) -> CascadePipeline:
    import yaml

    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise ModelFileError(
            f"{path}: expected a mapping with a non-empty 'stages' list (base first, then SR)"
        )
    if set(spec) - {"stages"}:
        raise ModelFileError(f"{path}: unknown keys {sorted(set(spec) - {'stages'})}; allowed: stages")
    stages, settings = [], []
    for i, entry in enumerate(spec["stages"]):
        if not isinstance(entry, dict) or "model" not in entry:
            raise ModelFileError(f"{path}: stage {i} needs 'model' (a model folder or a walt fit checkpoint)")
        unknown = set(entry) - {"model", *STAGE_SETTINGS}
        if unknown:
            raise ModelFileError(
                f"{path}: stage {i} has unknown keys {sorted(unknown)}; allowed: model, {', '.join(STAGE_SETTINGS)}"
            )
        if i == 0 and "aug_level" in entry:
            raise ModelFileError(
                f"{path}: stage 0 is the base model; aug_level belongs to super-resolution stages"
            )
        stages.append(load_model(entry["model"]))  # relative to the working directory, as in training configs
        settings.append({k: v for k, v in entry.items() if k != "model"})
    try:
        return CascadePipeline(stages, settings)
    except ValueError as err:
        raise ModelFileError(f"{path}: {err}") from None


def _cascade_card(cascade: CascadePipeline, names: list[str]) -> str:
    rows = "\n".join(
        f"| {i} | `{n}/` | {'super-resolution' if s.super_resolution else 'base'} | {json.dumps(cfg)} |"
        for i, (n, s, cfg) in enumerate(zip(names, cascade.stages, cascade.stage_settings))
    )
    return (
        "# walt cascade\n\nA base model and its super-resolution stages, each a walt model folder.\n\n"
        "| stage | folder | kind | settings |\n|---|---|---|---|\n"
        f"{rows}\n\n```python\nfrom walt.pipeline import CascadePipeline\n\n"
        'cascade = CascadePipeline.from_pretrained("path/to/this/folder", device="cuda")\n'
        "videos = cascade.generate(seeds=[0, 1])  # uint8 (N, T, H, W, 3)\n```\n"
    )


# ---- helpers -----------------------------------------------------------------------------------------------


class _atomic_folder:
    """Context manager: a temporary folder beside ``path``, renamed to ``path`` when the block succeeds (an
    existing folder at ``path`` is replaced only then), removed when it fails."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Not mkdtemp, which makes the folder 0700: the model folder gets the umask's mode, as mkdir gives it.
        self.tmp = self.path.parent / f".{self.path.name}.{secrets.token_hex(4)}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.path.exists():
            if not self.path.is_dir() or not (
                (self.path / MODEL_FILE).exists()
                or (self.path / CASCADE_FILE).exists()
                or not any(self.path.iterdir())
            ):
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise FileExistsError(
                    f"{self.path} exists and is not a walt model folder: choose another output"
                )
            old = self.path.with_name(f".{self.path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
            os.replace(self.tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.path)


def _save_tensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    write_weights(state, path, {"format": FORMAT, **metadata})


def _load_tensors(path: Path, source: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelFileError(f"{source} has no {path.name}: not a complete walt model folder")
    return _checked(read_weights, path)


def _read_json(path: Path, source: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFileError(
            f"{source} is not a walt model folder (no {path.name}); give a folder written by `walt export` or a "
            "walt fit checkpoint"
        )
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} does not hold a JSON object")
    return data


def _check_format(data: dict[str, Any], expected: str, source: str) -> None:
    if data.get("format") != expected:
        raise ModelFileError(f"{source}: format {data.get('format')!r}, expected {expected!r}")
    if int(data.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFileError(
            f"{source} was written by a newer walt (format version {data['format_version']}); upgrade walt"
        )


def _checked(function, *args):
    try:
        return function(*args)
    except CheckpointError as err:
        raise ModelFileError(str(err)) from None


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], role: str, source: str) -> None:
    if not state:
        raise ModelFileError(f"{source} holds no {role} weights")
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise ModelFileError(f"{source}: the {role} weights do not fit its description: {err}") from None
