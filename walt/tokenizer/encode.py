"""`walt encode`: turn a video dataset into latent shards with a trained tokenizer.

Diffusion training then reads latents instead of decoding and encoding videos at every step. The command also
measures the per-channel mean/std of the raw latents (the latent normalization W.A.L.T applies before the
transformer), stores them in the tokenizer's buffers, and writes shards of normalized latents.

Output folder:
  shard-00000.safetensors ...  "latents" (N, C, 1+k, h, w), "labels" (N,) when the data has labels;
                               metadata "captions" (JSON list) when it has captions
  index.json                   shard names and sizes, latent shape, the statistics, the source config
  vae.safetensors, vae.yaml    tokenizer weights including the statistics (and their sha256, checked when they
                               are loaded), and its class_path/init_args
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning as L
import torch
import yaml
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from walt.checkpoint import module_weights, read_checkpoint, read_weights, write_weights
from walt.tokenizer.vae import CausalVAE

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- statistics and shards --------------------------------------------------------------------------------


@torch.no_grad()
def latent_statistics(
    vae: CausalVAE, batches: Iterable[dict], max_samples: int | None = None, chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and std of raw posterior means over every latent position (float64 accumulation)."""
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
    return mean.float(), std.float()


def _write_shard(path: Path, latents: list[Tensor], labels: list[Tensor], captions: list[str]) -> int:
    tensors = {"latents": torch.cat(latents).contiguous()}
    if labels:
        tensors["labels"] = torch.cat(labels).long().contiguous()
    metadata = {"captions": json.dumps(captions)} if captions else None
    save_file(tensors, str(path), metadata=metadata)
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


def load_vae_weights(vae: CausalVAE, checkpoint: str | Path, use_ema: bool = True) -> str:
    """Loads a TokenizerModule checkpoint (.ckpt) or a bare tokenizer state dict (.safetensors) into `vae`.

    Returns which weights were used ("ema", "vae" or "file").
    """
    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".safetensors":
        vae.load_state_dict(read_weights(checkpoint))
        return "file"
    state = read_checkpoint(checkpoint)["state_dict"]
    weights, which = module_weights(state, "vae.", use_ema, checkpoint)
    vae.load_state_dict(weights)
    return "ema" if which == "ema" else "vae"


def _dataset(data: L.LightningDataModule, split: str) -> Dataset:
    dataset = getattr(data, split, None)
    if dataset is None:
        raise ValueError(f"the data config has no {split!r} dataset; choose --split among train/val/test")
    return dataset


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
    parser.add_argument("--data", help="YAML whose `data:` section replaces the one in --config")
    parser.add_argument("--split", default="train", choices=["train", "val", "test"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--shard-size", type=int, default=1024, help="clips per shard")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="latent frames per chunk (bounds memory)"
    )
    parser.add_argument(
        "--stats-samples",
        type=int,
        default=1024,
        help="clips used for the latent mean/std; 0 keeps the statistics already in the checkpoint",
    )
    parser.add_argument("--stats-only", action="store_true", help="compute statistics, write no shards")
    parser.add_argument("--no-ema", action="store_true", help="use the live weights even if an EMA exists")
    parser.add_argument("--dtype", default="float32", choices=list(STORE_DTYPES), help="stored latent dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="run the encoder under bfloat16 autocast")
    return parser.parse_args(list(argv))


def encode_main(argv: Sequence[str]) -> int:
    """`walt encode ...`; returns the process exit code."""
    args = _parse_args(argv)
    config = load_config(args.config)
    section = vae_section(config, args.config)
    data_config = load_config(args.data) if args.data else config
    if "data" not in data_config:
        raise ValueError(f"{args.data or args.config} has no data section; pass one with --data")
    vae = _instantiate(section, CausalVAE)
    used = load_vae_weights(vae, args.checkpoint, use_ema=not args.no_ema)
    vae = vae.to(args.device).eval()
    data = _instantiate(data_config["data"], L.LightningDataModule)
    dataset = _dataset(data, args.split)
    from walt.data import collate_items

    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.num_workers,
        collate_fn=collate_items,
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    autocast = torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.bf16)
    with autocast:
        if args.stats_samples > 0:
            mean, std = latent_statistics(vae, loader, args.stats_samples, args.chunk_size)
            vae.set_latent_stats(mean.to(args.device), std.to(args.device))
        write_weights(vae.state_dict(), out / "vae.safetensors", {"role": "tokenizer"})
        (out / "vae.yaml").write_text(yaml.safe_dump(section, sort_keys=False))
        shards = []
        if not args.stats_only:
            shards = encode_to_shards(
                vae, loader, out, args.shard_size, args.chunk_size, STORE_DTYPES[args.dtype]
            )
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
        "data": data_config["data"],
    }
    (out / "index.json").write_text(json.dumps(index, indent=2))
    print(f"walt encode: {index['num_samples']} clips in {len(shards)} shards -> {out}")
    print("latent mean", [round(v, 4) for v in index["latent_shift"]])
    print("latent std ", [round(v, 4) for v in index["latent_scale"]])
    return 0
