"""`walt encode`: turn a video dataset into latent shards with a trained tokenizer.

Diffusion training then reads latents instead of decoding and encoding videos at every step. The command also
measures the per-channel mean/std of the raw latents (the latent normalization W.A.L.T applies before the
transformer), stores them in the tokenizer's buffers, and writes shards of normalized latents.

Output folder:
  shard-00000.safetensors ...  "latents" (N, C, 1+k, h, w), "labels" (N,) when the data has labels;
                               metadata "captions" (JSON list) when it has captions
  vae.safetensors, vae.yaml    tokenizer weights including the statistics (and their sha256, checked when they
                               are loaded), and its class_path/init_args
  index.json                   shard names and sizes, latent shape, the statistics, the source config, the
                               files skipped as unreadable; written last, so a folder without it is incomplete

Every file appears whole or not at all (:mod:`walt.atomic`). A folder that holds an earlier run's outputs is
refused unless ``--overwrite``, which removes them first: shards of two runs are never mixed.

A file that cannot be read is skipped, not replaced by its neighbour as in training (that would give the
neighbour's clip the skipped file's place, and in class-sorted data its label): the shards hold exactly the
readable files, each with its own label, and the skipped ones are listed at the end and in index.json.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from walt.atomic import TEMP_SUFFIX, atomic_path, write_atomic
from walt.checkpoint import write_weights
from walt.checks import int_at_least
from walt.tokenizer.vae import CausalVAE
from walt.tokenizer.weights import load_vae_weights  # also imported from here by older code

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SHARD_PATTERN = "shard-*.safetensors"
OUTPUT_FILES = ("index.json", "vae.safetensors", "vae.yaml")  # with the shards: what a run writes


# ---- statistics and shards --------------------------------------------------------------------------------


@torch.no_grad()
def latent_statistics(
    vae: CausalVAE, batches: Iterable[dict], max_samples: int | None = None, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of raw posterior means over every latent position (float64 accumulation).

    Raises ValueError when there is no data, or when a channel's statistics could not normalize it (a
    non-finite value, or a std of 0, by which every latent would be divided: NaN or infinite latents)."""
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 (or None for all), got {max_samples}")
    device = vae.latent_shift.device
    total = torch.zeros(vae.latent_channels, dtype=torch.float64, device=device)
    total_sq, count, samples = torch.zeros_like(total), 0, 0
    for batch in batches:
        video = batch["video"].to(device)  # (B, 3, T, H, W)
        if max_samples is not None:
            video = video[: max_samples - samples]
        z = vae.encode_moments(video, chunk_size)[0].double()  # (B, C, 1+k, h, w)
        total += z.sum(dim=(0, 2, 3, 4))
        total_sq += z.pow(2).sum(dim=(0, 2, 3, 4))
        count += z[:, 0].numel()
        samples += video.shape[0]
        if max_samples is not None and samples >= max_samples:
            break
    if count == 0:
        raise ValueError("no data to compute latent statistics from: the dataset is empty")
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(0).sqrt()
    bad = [
        c for c in range(len(mean)) if not (torch.isfinite(mean[c]) and torch.isfinite(std[c]) and std[c] > 0)
    ]
    if bad:
        raise ValueError(
            f"the latent statistics of channel(s) {bad} cannot normalize them (mean {mean[bad].tolist()}, std "
            f"{std[bad].tolist()}, from {samples} clips): the tokenizer gives non-finite or constant latents "
            "on this data; check its checkpoint"
        )
    return mean.float(), std.float()


def _write_shard(path: Path, latents: list[Tensor], labels: list[Tensor], captions: list[str]) -> int:
    tensors = {"latents": torch.cat(latents).contiguous()}
    if labels:
        tensors["labels"] = torch.cat(labels).long().contiguous()
    metadata = {"captions": json.dumps(captions)} if captions else None
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return tensors["latents"].shape[0]


@torch.no_grad()
def encode_to_shards(
    vae: CausalVAE,
    batches: Iterable[dict],
    out_dir: str | Path,
    shard_size: int = 1024,
    chunk_size: int | None = None,
    store_dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """Encodes every batch to normalized latents and writes shards of `shard_size` clips; returns the index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = vae.latent_shift.device
    shards: list[dict] = []
    latents: list[Tensor] = []
    labels: list[Tensor] = []
    captions: list[str] = []

    def flush() -> None:
        name = f"shard-{len(shards):05d}.safetensors"
        shards.append({"file": name, "num_samples": _write_shard(out_dir / name, latents, labels, captions)})
        latents.clear(), labels.clear(), captions.clear()

    for batch in batches:
        z = vae.encode(batch["video"].to(device), chunk_size).to("cpu", store_dtype)  # (B, C, 1+k, h, w)
        offset = 0
        while offset < z.shape[0]:  # a batch may straddle shard boundaries
            part = slice(
                offset, offset + min(shard_size - sum(t.shape[0] for t in latents), z.shape[0] - offset)
            )
            latents.append(z[part])
            if "label" in batch:
                labels.append(torch.as_tensor(batch["label"])[part])
            if "caption" in batch:
                captions.extend(batch["caption"][part])
            if sum(t.shape[0] for t in latents) == shard_size:
                flush()
            offset = part.stop
    if latents:
        flush()
    return shards


# ---- loading the tokenizer and the data from a training config --------------------------------------------


def _instantiate(section: dict, base: type) -> object:
    """Builds `class_path`/`init_args` (nested ones too) exactly as the training CLI does."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(base, "obj")
    return parser.instantiate_classes(parser.parse_object({"obj": section})).obj


def load_config(path: str | Path) -> dict:
    with open(path) as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is not a YAML mapping with model/data sections")
    return config


def vae_section(config: dict, path: str | Path) -> dict:
    """The `class_path`/`init_args` of the tokenizer inside a `walt fit` config."""
    try:
        return config["model"]["init_args"]["vae"]
    except (KeyError, TypeError):
        raise ValueError(
            f"{path} has no model.init_args.vae section; pass the config the tokenizer was trained with "
            "(e.g. configs/tokenizer/ucf101_128.yaml)"
        ) from None


def _dataset(data: L.LightningDataModule, split: str) -> Dataset:
    dataset = getattr(data, split, None)
    if dataset is None:
        present = [name for name in ("train", "val", "test") if getattr(data, name, None) is not None]
        raise ValueError(
            f"the data config has no {split!r} dataset; choose --split among those it has: "
            f"{', '.join(present) or 'none'} (or give --data a YAML whose data section has a {split!r} dataset)"
        )
    return dataset


# ---- the files as they are: unreadable ones skipped, not replaced ------------------------------------------


class _ExactItems(Dataset):
    """``dataset[i]`` for exactly file ``i``: where the dataset would hand over the next file in place of an
    unreadable one (:class:`walt.data.ClipDataset`), this gives ``{"skipped": path, "reason": message}``.
    Datasets without files (procedural ones) are passed through."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        from walt.data.base import UNREADABLE, ClipDataset

        if not isinstance(self.dataset, ClipDataset):
            return self.dataset[index]
        sample = self.dataset.samples[index]
        try:
            return self.dataset.load(sample, self.dataset.item_rng(index))  # the clip dataset[index] gives
        except UNREADABLE as err:
            return {"skipped": str(sample.path), "reason": str(err)}


def _collate_readable(items: list[dict]) -> dict:
    """A batch of the readable items (``collate_items``; none: no ``video``), with ``skipped``: path -> reason."""
    from walt.data import collate_items

    readable = [item for item in items if "skipped" not in item]
    batch = collate_items(readable) if readable else {}
    batch["skipped"] = {item["skipped"]: item["reason"] for item in items if "skipped" in item}
    return batch


def _readable(batches: Iterable[dict], skipped: dict[str, str], bar: tqdm | None = None) -> Iterator[dict]:
    """The batches that hold clips; the files skipped on the way are added to ``skipped`` (path -> reason), once
    each however often they are read. ``bar`` counts every item read, clip or skipped file."""
    for batch in batches:
        skipped_here = batch.pop("skipped", {})
        skipped.update(skipped_here)
        if bar is not None:  # the statistics may use part of a batch: the count stops at the total
            read = len(skipped_here) + (len(batch["video"]) if "video" in batch else 0)
            bar.update(min(read, bar.total - bar.n))
        if "video" in batch:
            yield batch


def _bar(total: int, what: str) -> tqdm:
    """A progress bar of clips on stderr: encoding a dataset takes minutes to hours, and a log should show it."""
    return tqdm(total=total, desc=f"walt encode: {what}", unit="clip", mininterval=5.0, file=sys.stderr)


def _num_files(dataset: Dataset) -> int:
    samples = getattr(dataset, "samples", None)
    return len({str(s.path) for s in samples}) if samples is not None else len(dataset)


def _skip_summary(skipped: dict[str, str], num_files: int, shown: int = 10) -> str:
    """``skipped 2 of 120 files (unreadable): a.avi, b.avi`` (the first ``shown`` names)."""
    names = [Path(p).name for p in sorted(skipped)]
    more = f" and {len(names) - shown} more (all in index.json)" if len(names) > shown else ""
    return f"skipped {len(names)} of {num_files} files (unreadable): {', '.join(names[:shown])}{more}"


# ---- the output folder -------------------------------------------------------------------------------------


def _earlier_outputs(out: Path) -> list[Path]:
    """What a `walt encode` run left in ``out``: shards, index, tokenizer, and temporary files of a killed run
    (other files are not this command's, and are left alone)."""
    return sorted(p for p in out.iterdir() if _is_output(p.name)) if out.is_dir() else []


def _is_output(name: str) -> bool:
    if name.startswith(".") and name.endswith(TEMP_SUFFIX):
        name = name[1:].rsplit(".", 2)[0]  # .<name>.<random>.tmp (walt.atomic) -> <name>
    return name in OUTPUT_FILES or fnmatch.fnmatch(name, SHARD_PATTERN)


def _check_output(out: Path, overwrite: bool) -> list[Path]:
    """The earlier outputs to remove before writing; refused without ``overwrite``."""
    found = _earlier_outputs(out)
    if found and not overwrite:
        shards = sum(fnmatch.fnmatch(p.name, SHARD_PATTERN) for p in found)
        state = "" if (out / "index.json").is_file() else ", no index.json: an interrupted run"
        raise FileExistsError(
            f"{out} holds the outputs of an earlier walt encode ({shards} shard(s){state}); choose a new --output "
            "or pass --overwrite to replace them"
        )
    return found


# ---- the command -------------------------------------------------------------------------------------------


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="walt encode",
        description="Encode a dataset to latent shards (safetensors) and compute the latent normalization.",
    )
    parser.add_argument(
        "--config", required=True, help="the tokenizer's `walt fit` config (model.init_args.vae)"
    )
    parser.add_argument("--checkpoint", required=True, help="TokenizerModule .ckpt, or vae.safetensors")
    parser.add_argument("--output", required=True, help="folder for shards, index.json and the tokenizer")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of an earlier run in --output"
    )
    parser.add_argument("--data", help="YAML whose `data:` section replaces the one in --config")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"])
    parser.add_argument("--batch-size", type=int_at_least(1), default=8)
    parser.add_argument(
        "--num-workers",
        type=int_at_least(0),
        default=min(4, os.cpu_count() or 1),  # more workers than cores only compete for them
        help="data-loading processes (default: 4, or the number of CPU cores if fewer)",
    )
    parser.add_argument("--shard-size", type=int_at_least(1), default=1024, help="clips per shard")
    parser.add_argument(
        "--chunk-size", type=int_at_least(1), default=None, help="latent frames per chunk (bounds memory)"
    )
    parser.add_argument(
        "--stats-samples",
        type=int_at_least(0),
        default=1024,
        help="clips used for the latent mean/std; 0 keeps the statistics the checkpoint holds (a "
        "vae.safetensors written by walt encode; a tokenizer checkpoint has none, and is refused)",
    )
    parser.add_argument("--stats-only", action="store_true", help="compute statistics, write no shards")
    parser.add_argument("--no-ema", action="store_true", help="use the live weights even if an EMA exists")
    parser.add_argument("--dtype", default="float32", choices=list(STORE_DTYPES), help="stored latent dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run the encoder under bfloat16 autocast")
    args = parser.parse_args(list(argv))
    for option in ("config", "checkpoint", "data"):  # before anything is built
        path = getattr(args, option)
        if path is not None and not Path(path).is_file():
            parser.error(f"--{option} {path}: no such file")
    return args


def encode_main(argv: Sequence[str]) -> int:
    """`walt encode ...`; returns the process exit code."""
    args = _parse_args(argv)
    try:
        _encode(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:  # CheckpointError is a ValueError
        print(f"walt encode: {err}", file=sys.stderr)
        return 1
    return 0


def _encode(args: argparse.Namespace) -> None:
    out = Path(args.output)
    earlier = _check_output(out, args.overwrite)  # refused before anything is loaded
    config = load_config(args.config)
    section = vae_section(config, args.config)
    data_config = load_config(args.data) if args.data else config
    if "data" not in data_config:
        raise ValueError(f"{args.data or args.config} has no data section; pass one with --data")
    vae = _instantiate(section, CausalVAE)
    used = load_vae_weights(vae, args.checkpoint, use_ema=not args.no_ema)
    if args.stats_samples == 0 and _identity_stats(vae):
        raise ValueError(
            f"--stats-samples 0 keeps the latent statistics of the checkpoint, but {args.checkpoint} holds none "
            "(a tokenizer checkpoint never does: walt encode computes them): give --stats-samples N, e.g. 1024"
        )
    vae = vae.to(args.device).eval()
    dataset = _dataset(_instantiate(data_config["data"], L.LightningDataModule), args.split)
    loader = DataLoader(
        _ExactItems(dataset),
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=_collate_readable,
    )
    for path in earlier:  # --overwrite: the old outputs go before any new one is written
        path.unlink(missing_ok=True)
    skipped: dict[str, str] = {}
    autocast = torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.bf16)
    with autocast:
        if args.stats_samples > 0:
            with _bar(min(args.stats_samples, len(dataset)), "statistics") as bar:
                mean, std = latent_statistics(
                    vae, _readable(loader, skipped, bar), args.stats_samples, args.chunk_size
                )
            vae.set_latent_stats(mean.to(args.device), std.to(args.device))
        write_weights(vae.state_dict(), out / "vae.safetensors", {"role": "tokenizer"})
        write_atomic(out / "vae.yaml", yaml.safe_dump(section, sort_keys=False))
        shards = []
        if not args.stats_only:
            with _bar(len(dataset), "shards") as bar:
                shards = encode_to_shards(
                    vae, _readable(loader, skipped, bar), out, args.shard_size, args.chunk_size,
                    STORE_DTYPES[args.dtype],
                )  # fmt: skip
    num_files = _num_files(dataset)
    index = {
        "shards": shards,
        "num_samples": sum(s["num_samples"] for s in shards),
        "latent_channels": vae.latent_channels,
        "latent_shift": vae.latent_shift.tolist(),
        "latent_scale": vae.latent_scale.tolist(),
        "weights": used,
        "checkpoint": str(args.checkpoint),
        "split": args.split,
        "classes": list(getattr(dataset, "classes", ()) or ()),
        "num_files": num_files,
        "skipped": [{"file": path, "reason": skipped[path]} for path in sorted(skipped)],
        "data": data_config["data"],
    }
    write_atomic(out / "index.json", json.dumps(index, indent=2))  # last: the folder is complete
    print(f"walt encode: {index['num_samples']} clips in {len(shards)} shards -> {out}")
    print("latent mean", [round(v, 4) for v in index["latent_shift"]])
    print("latent std ", [round(v, 4) for v in index["latent_scale"]])
    if skipped:
        print(f"walt encode: {_skip_summary(skipped, num_files)}")


def _identity_stats(vae: CausalVAE) -> bool:
    """Whether the tokenizer's latent normalization is still the identity (no statistics set)."""
    return bool((vae.latent_shift == 0).all() and (vae.latent_scale == 1).all())
