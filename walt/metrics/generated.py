"""`walt evaluate PROTOCOL --model M --real R`: generate with a trained model and score the samples under a
protocol, in one command.

- Streaming: every batch is generated, turned into the protocol's clips (or frames, or images) and features,
  and dropped; nothing is written to disk but the features of finished batches (and ``save_samples`` MP4s).
- Sharded: the same fixed batches as the folder path (``walt.metrics.evaluate``): batch ``i`` on process
  ``i % world_size``, folded in batch order on process 0. Sample ``k`` has its own seed ``seed + k`` (its own
  generator), label and context clip, whatever batch or process computes it, so the statistics and the number
  are bit-identical on 1 or N processes.
- Resumable: with a ``work_dir``, each finished batch's features are saved there (atomically) with the run's
  identity; a run started again with the same settings loads them instead of generating again, and gives the
  same number. A work dir holding another run's features is refused.

Labels (class-conditional models): ``"data"`` gives sample ``k`` the class of the ``k``-th real clip of the
protocol's seeded selection (cycling when there are more samples than real clips), so the samples follow the
real split's class frequencies; ``"uniform"`` gives sample ``k`` class ``k mod num_classes``.

Frame prediction (``fvd_k600_pred``): sample ``k`` continues the first ``context_frames`` frames of the
``k``-th real clip of a seeded order; the whole clip (context included, as decoded) is scored.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from walt.atomic import write_atomic
from walt.checkpoint import weights_sha256
from walt.data import to_uint8, write_video
from walt.metrics.evaluate import (
    _broadcast_from_first,
    _dist_info,
    _fold_sharded,
    _side_stats,
    count_warnings,
    real_stats_count,
    result_record,
    select_units,
)
from walt.metrics.protocols import Protocol, get_protocol

if TYPE_CHECKING:
    from walt.pipeline import CascadePipeline, Pipeline

__all__ = ["GenerationSettings", "evaluate_model", "load_generator", "model_identity", "sample_labels"]

LABEL_POLICIES = ("data", "uniform")


@dataclass(frozen=True)
class GenerationSettings:
    """How the samples are generated; all of it goes into the result and the work dir's identity."""

    steps: int | None = None  # None: the model's own
    guidance: float = 1.0
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0  # sample k has seed ``seed + k``
    labels: str = "data"  # "data" or "uniform"
    cache_threshold: float = 0.0  # first-block caching (Pipeline.generate); 0 = off
    guidance_interval: tuple[float, float] | None = None  # guide only at lo < t <= hi (Pipeline.generate)


def load_generator(model: str | os.PathLike, device: str | torch.device = "cpu", dtype=None):
    """A :class:`Pipeline` (model folder or ``walt fit`` checkpoint) or a :class:`CascadePipeline` (cascade
    folder or cascade YAML) on ``device``."""
    from walt.pipeline import CascadePipeline, Pipeline
    from walt.pipeline.files import CASCADE_FILE

    path = Path(model)
    if path.suffix in (".yaml", ".yml") or (path / CASCADE_FILE).is_file():
        return CascadePipeline.from_pretrained(path, device=device, dtype=dtype)
    return Pipeline.from_pretrained(path, device=device, dtype=dtype)


def model_identity(generator) -> str:
    """sha256 of every stage's backbone and tokenizer weights (each part's :func:`walt.checkpoint.weights_sha256`):
    the same for a checkpoint and the folder `walt export` makes of it, different for any other weights."""
    parts = [
        weights_sha256(part.state_dict())
        for stage in getattr(generator, "stages", [generator])
        for part in (stage.backbone, stage.tokenizer)
    ]
    return hashlib.sha256(" ".join(parts).encode()).hexdigest()


def evaluate_model(
    protocol: str | Protocol,
    model: str | os.PathLike | Pipeline | CascadePipeline,
    real: str | os.PathLike | Dataset,
    *,
    settings: GenerationSettings = GenerationSettings(),
    num_real: int | None = None,
    num_fake: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    weights_path: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    save_samples: int = 0,
    samples_dir: str | os.PathLike | None = None,
    on_batch: Callable[[list[int], np.ndarray], None] | None = None,
    progress: bool = True,
) -> dict:
    """Generates ``num_fake`` samples with ``model`` (a path as :func:`load_generator` takes, or a pipeline
    already loaded; default count: the protocol's) and returns the protocol's
    metric against ``real`` (a walt dataset, a folder of videos/images, or a statistics ``.npz``), as the
    JSON-ready record of :func:`walt.metrics.evaluate.evaluate_folders` plus the model, the generation settings
    and the wall time (``seconds``; ``seconds_generating``: this process's time inside the model, decoding
    included; on a GPU ``peak_gpu_memory_gib``, this process's peak allocation). ``on_batch(sample_indices, videos)`` sees each batch this process generates (uint8
    ``(b, T, H, W, 3)``), e.g. to score the samples another way. Every process under ``torchrun`` calls it
    and gets the same result."""
    start = time.perf_counter()
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    protocol = get_protocol(protocol)
    if protocol.reconstruction:
        raise ValueError(
            f"{protocol.name} scores a tokenizer: use walt.metrics.reconstruction.evaluate_tokenizer"
        )
    _check_arguments(settings, batch_size, save_samples, num_fake)
    real = real if isinstance(real, Dataset) else Path(real)
    generator = model if hasattr(model, "generate") else load_generator(model, device, dtype)
    if hasattr(generator, "stages") and settings.cache_threshold:
        raise ValueError(
            "a cascade sets cache_threshold per stage (its stage settings), not for all: leave --cache-threshold at 0"
        )
    if hasattr(generator, "stages") and settings.guidance_interval is not None:
        raise ValueError(
            "a cascade sets guidance_interval per stage (its stage settings), not for all: leave out "
            "--guidance-interval"
        )
    check = getattr(generator, "check_guidance_interval", None)
    if check is not None:  # before the real side's features: a refused setting costs nothing
        check(settings.guidance_interval, settings.guidance)
    num = protocol.num_fake if num_fake is None else num_fake
    count = -(-num // protocol.samples_per_file)  # videos to generate
    plan = _plan(protocol, generator, real, count, settings)
    count_warnings(protocol, real_stats_count(protocol, real, num_real), num)
    network = protocol.network(weights_path=weights_path).to(device)
    cache = None if cache_dir is None else Path(cache_dir)
    real_stats, real_info = _side_stats(
        protocol, real, num_real, settings.seed, network, batch_size, cache, progress, side="real"
    )
    identity = {
        "protocol": protocol.name,
        "model": model_identity(generator),
        "real": real_info["source"],
        "generation": _identity_settings(settings),
        "num_fake": num,
        "batch_size": batch_size,
    }
    store = None if work_dir is None else FeatureStore(Path(work_dir), identity)
    consumers = [on_batch] if on_batch is not None else []
    samples = None if not save_samples else SampleWriter(Path(samples_dir), save_samples, generator.fps)
    if samples is not None:
        consumers.append(samples.add)
    timer = _Timer(device)
    load = lambda units: _generate(protocol, generator, plan, units, settings, batch_size, consumers, timer)
    fake_stats = _fold_sharded(
        protocol,
        list(range(count)),
        load,
        num,
        network,
        batch_size,
        progress,
        f"{protocol.name} generated",
        batched=True,
        store=store,
    )
    result = None
    if _dist_info()[0] == 0:
        where = "a pipeline in memory" if hasattr(model, "generate") else str(model)
        fake_info = {"source": where, "kind": "model", "count": num}
        result = result_record(
            protocol, real_stats, fake_stats, real_info, fake_info, settings.seed, batch_size, weights_path
        )
        result["model"] = {"path": where, "weights_sha256": identity["model"]}
        result["generation"] = {**asdict(settings), **plan.describe()}
        result["world_size"] = _dist_info()[1]
        result["seconds"] = time.perf_counter() - start
        result["seconds_generating"] = timer.seconds
        if (
            torch.device(device).type == "cuda"
        ):  # this process's peak, the model and the feature network together
            result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if samples is not None:
            result["samples_dir"] = str(samples.finish())
        if store is not None:
            store.remove()
    return _broadcast_from_first(result)


def _identity_settings(settings: GenerationSettings) -> dict:
    """The settings as the work dir's identity. A setting added later is left out while it has its default,
    so that a run started before it existed still resumes."""
    fields = asdict(settings)
    if fields["guidance_interval"] is None:
        del fields["guidance_interval"]
    return fields


def _check_arguments(settings: GenerationSettings, batch_size: int, save_samples: int, num_fake) -> None:
    if settings.labels not in LABEL_POLICIES:
        raise ValueError(f"labels must be one of {', '.join(LABEL_POLICIES)}, got {settings.labels!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if save_samples < 0:
        raise ValueError(f"save_samples must be >= 0, got {save_samples}")
    if num_fake is not None and num_fake < 2:
        raise ValueError(f"num_fake must be >= 2 (a covariance needs two samples), got {num_fake}")


# ---- what each sample is given: seed, label, context -----------------------------------------------------


@dataclass
class _Plan:
    seeds: list[int]
    labels: list[int] | None
    context_units: list[int] | None  # the real clip each sample continues (frame prediction)
    context_source: Dataset | None
    context_frames: int
    num_frames: int  # frames generated per sample (the model's 1 + 4k, at least the protocol's clip)
    label_note: str

    def describe(self) -> dict:
        out = {
            "seeds": f"sample k has seed {self.seeds[0] if self.seeds else 0} + k",
            "num_frames": self.num_frames,
        }
        out["labels"] = self.label_note
        if self.context_units is not None:
            out["context_frames"] = self.context_frames
            out["context"] = "sample k continues real clip k of a seeded order"
        return out


def _plan(protocol: Protocol, generator, real, count: int, settings: GenerationSettings) -> _Plan:
    base = getattr(generator, "stages", [generator])[0]
    backbone = base.backbone
    if backbone.text_dim is not None:
        raise ValueError(
            f"{protocol.name} scores class-conditional or unconditional models; this model is text-conditional "
            "(prompts are not part of the protocol)"
        )
    seeds = [settings.seed + k for k in range(count)]
    labels = sample_labels(protocol, backbone.num_classes, real, count, settings)
    note = "none (unconditional)"
    if labels is not None:
        note = settings.labels
    context_units = None
    if protocol.context_frames:
        if not backbone.context_frames:
            raise ValueError(
                f"{protocol.name} gives the model the first {protocol.context_frames} frames of each real clip; "
                "this model was not trained with context frames (context_frames=True)"
            )
        real_dataset = _needs_dataset(real, protocol, "the context clips")
        context_units = select_units(
            len(real_dataset), count, settings.seed + 1, "the real data", "--num-fake"
        )
    num_frames = _frames_to_generate(protocol, base)
    dataset = real if isinstance(real, Dataset) else None
    return _Plan(seeds, labels, context_units, dataset, protocol.context_frames, num_frames, note)


def sample_labels(
    protocol: Protocol, num_classes: int | None, real, count: int, settings: GenerationSettings
) -> list[int] | None:
    """The class of each of ``count`` samples under ``settings.labels`` (None for an unconditional model)."""
    if num_classes is None:
        return None
    if settings.labels == "uniform":
        return [k % num_classes for k in range(count)]
    dataset = _needs_dataset(real, protocol, "the class frequencies (or pass --labels uniform)")
    if not hasattr(dataset, "label_of") or getattr(dataset, "num_classes", 0) != num_classes:
        raise ValueError(
            f"--labels data takes the classes of the real clips, but the real data ({type(dataset).__name__}) "
            f"has {getattr(dataset, 'num_classes', 0)} classes and the model {num_classes}; pass --labels uniform "
            "or real data of the model's classes"
        )
    order = select_units(len(dataset), min(count, len(dataset)), settings.seed, "the real data", "--num-fake")
    return [int(dataset.label_of(order[k % len(order)])) for k in range(count)]


def _needs_dataset(real, protocol: Protocol, what: str) -> Dataset:
    if not isinstance(real, Dataset):
        raise ValueError(
            f"{protocol.name} takes {what} from the real data: give --real as a dataset YAML "
            "(class_path/init_args, e.g. configs/eval/ucf101_real.yaml), not a folder or statistics"
        )
    return real


def _frames_to_generate(protocol: Protocol, base) -> int:
    """The model's own clip length (1 + 4(T' - 1) for T' latent frames), lengthened to the protocol's clip."""
    trained = 1 + 4 * (base.backbone.input_size[0] - 1)
    needed = getattr(protocol.reader, "num_frames", 1)
    frames = max(trained, needed)
    return 1 + 4 * -(-(frames - 1) // 4)  # the causal tokenizer's 1 + 4k


# ---- generation, a batch of samples at a time ------------------------------------------------------------


class _Timer:
    """Wall time spent inside the model, the device's queue drained at both ends."""

    def __init__(self, device) -> None:
        self.device, self.seconds = torch.device(device), 0.0

    def __call__(self, function, **kwargs):
        self._sync()
        tic = time.perf_counter()
        out = function(**kwargs)
        self._sync()
        self.seconds += time.perf_counter() - tic
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _generate(
    protocol, generator, plan: _Plan, units: list[int], settings, batch_size, consumers, timer
) -> list:
    kwargs = dict(
        labels=None if plan.labels is None else [plan.labels[k] for k in units],
        seeds=[plan.seeds[k] for k in units],
        batch_size=batch_size,
        output="uint8",
        progress=False,
        steps=settings.steps,
        guidance=settings.guidance,
        sampler=settings.sampler,
        eta=settings.eta,
        cache_threshold=settings.cache_threshold,
        guidance_interval=settings.guidance_interval,
    )
    if not hasattr(generator, "stages"):
        kwargs["num_frames"] = plan.num_frames
    if plan.context_units is not None:
        clips = [plan.context_source[plan.context_units[k]]["video"] for k in units]  # (3, T, H, W) each
        kwargs["context"] = torch.stack(clips)[:, :, : plan.context_frames]
        kwargs["context_frames"] = plan.context_frames
    if hasattr(generator, "stages"):  # per-stage settings come from the cascade itself
        for key in ("steps", "guidance", "sampler", "eta", "cache_threshold", "guidance_interval"):
            kwargs.pop(key)
    videos = timer(generator.generate, **kwargs).numpy()  # (b, T, H, W, 3) uint8
    for consume in consumers:
        consume(units, videos)
    return [protocol.reader.from_frames(v) for v in videos]


class SampleWriter:
    """Keeps the first ``limit`` samples (by index) as MP4 files, and a GIF grid of them at the end."""

    def __init__(self, folder: Path, limit: int, fps: float) -> None:
        self.folder, self.limit, self.fps = folder, limit, fps
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, units: list[int], videos: np.ndarray) -> None:
        for k, video in zip(units, videos):
            if k < self.limit:
                write_video(self.folder / f"sample_{k:06d}.mp4", video, fps=self.fps)

    def finish(self) -> Path:
        from walt.data import read_video

        files = sorted(self.folder.glob("sample_*.mp4"))[:16]
        if files:
            clips = [torch.from_numpy(read_video(f)) for f in files]  # (T, H, W, 3) each
            length = min(len(c) for c in clips)
            columns = min(4, len(clips))
            rows = [clips[i : i + columns] for i in range(0, len(clips), columns)]
            rows[-1] = rows[-1] + [torch.zeros_like(clips[0])] * (columns - len(rows[-1]))
            grid = torch.cat([torch.cat([c[:length] for c in row], dim=2) for row in rows], dim=1)
            write_video(
                self.folder / "grid.gif",
                to_uint8(grid).numpy() if grid.dtype != torch.uint8 else grid.numpy(),
                fps=self.fps,
            )
        return self.folder


# ---- resumable: the features of finished batches -----------------------------------------------------------


class FeatureStore:
    """The features of finished batches in ``folder`` (``batch-000012.npy``), tied to one run's identity
    (``identity.json``): a run started again with the same identity reuses them."""

    def __init__(self, folder: Path, identity: dict) -> None:
        self.folder = folder
        text = json.dumps(identity, sort_keys=True, indent=1)
        marker = folder / "identity.json"
        rank, _ = _dist_info()
        if rank == 0:
            if marker.is_file() and marker.read_text() != text:
                raise ValueError(
                    f"{folder} holds the features of another evaluation (different model, data or settings); "
                    "delete it or give another --work-dir"
                )
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(marker, text)
        _broadcast_from_first(None)  # the others wait until the folder is checked

    def get(self, index: int) -> np.ndarray | None:
        path = self._path(index)
        return np.load(path, allow_pickle=False) if path.is_file() else None

    def put(self, index: int, features: np.ndarray) -> None:
        buffer = io.BytesIO()
        np.save(buffer, features, allow_pickle=False)
        write_atomic(self._path(index), buffer.getvalue())

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"batch-{index:06d}.npy"
