"""`walt evaluate rfvd2048_16f --model TOKENIZER --real DATASET`: a tokenizer benchmarked as a stage of its own.

The real side is the protocol's seeded selection of real clips; the generated side is the tokenizer's
reconstruction of exactly those clips (encode, decode), scored by the same protocol, with PSNR, SSIM and
(when its weights are installed) LPIPS of the same clips. Batches are sharded under ``torchrun`` as everywhere
in ``walt.metrics.evaluate``: the number is the same on 1 or N processes.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from walt.data import to_uint8
from walt.metrics.assets import MissingAssetError
from walt.metrics.evaluate import (
    _broadcast_from_first,
    _dist_info,
    _fold_sharded,
    _gather_to_first,
    _side_stats,
    count_warnings,
    result_record,
    select_units,
)
from walt.metrics.lpips import LPIPS
from walt.metrics.pixel import psnr, ssim
from walt.metrics.protocols import Protocol, get_protocol

__all__ = ["evaluate_tokenizer"]


def evaluate_tokenizer(
    protocol: str | Protocol,
    tokenizer: str | os.PathLike,
    real: Dataset,
    *,
    num_samples: int | None = None,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    weights_path: str | os.PathLike | None = None,
    lpips_weights: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict:
    """Reconstruction FVD of ``tokenizer`` (a model folder or checkpoint, a tokenizer checkpoint, or what
    `walt encode` writes) on ``real`` (a walt dataset of 1 + 4k >= 16 frames), with pixel metrics of the same
    clips; the JSON-ready record of :func:`walt.metrics.evaluate.evaluate_folders` plus ``pixel_metrics``."""
    from walt.pipeline import load_tokenizer

    start = time.perf_counter()
    protocol = get_protocol(protocol)
    if not protocol.reconstruction:
        raise ValueError(f"{protocol.name} scores generated samples; a tokenizer is scored by rfvd2048_16f")
    frames = getattr(real, "num_frames", None)
    if not isinstance(real, Dataset) or frames is None or frames < 16 or (frames - 1) % 4:
        raise ValueError(
            f"{protocol.name} reconstructs real clips: give --real as a dataset YAML with num_frames 1 + 4k "
            f"of at least 16 (e.g. 17; the first 16 frames are scored), got {frames}"
        )
    vae = load_tokenizer(tokenizer).to(device)
    num = protocol.num_real if num_samples is None else num_samples
    count_warnings(protocol, num, num)
    network = protocol.network(weights_path=weights_path).to(device)
    cache = None if cache_dir is None else Path(cache_dir)
    real_stats, real_info = _side_stats(
        protocol, real, num, seed, network, batch_size, cache, progress, side="real"
    )
    units = select_units(len(real), num, seed, type(real).__name__, "--num-real")  # the real side's clips
    scorer = _PixelScores(lpips_weights, device)

    def reconstruct(batch: list[int]) -> list:
        clips = torch.stack([real[i]["video"] for i in batch])  # (b, 3, T, H, W) in [-1, 1]
        autocast = torch.autocast(torch.device(device).type, dtype) if dtype else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            rec = vae.decode(vae.encode(clips.to(device))).float().clamp(-1, 1)  # (b, 3, T, H, W)
        scorer.add(batch, rec, clips.to(device))
        return [protocol.reader.from_frames(to_uint8(v.cpu()).numpy()) for v in rec]

    fake_stats = _fold_sharded(
        protocol, units, reconstruct, num, network, batch_size, progress, f"{protocol.name} reconstructed",
        batched=True,
    )  # fmt: skip
    pixel = scorer.gathered()
    result = None
    if _dist_info()[0] == 0:
        fake_info = {"source": str(tokenizer), "kind": "tokenizer reconstructions", "count": num}
        result = result_record(
            protocol, real_stats, fake_stats, real_info, fake_info, seed, batch_size, weights_path
        )
        result["pixel_metrics"] = pixel
        result["tokenizer"] = {"path": str(tokenizer)}
        result["world_size"] = _dist_info()[1]
        result["seconds"] = time.perf_counter() - start
    return _broadcast_from_first(result)


class _PixelScores:
    """Per-clip PSNR, SSIM and LPIPS, kept by clip index and averaged in index order on process 0 (the same
    mean whatever process computed which clip)."""

    def __init__(self, lpips_weights, device) -> None:
        self.scores: dict[int, dict[str, float]] = {}
        self.note = None
        try:
            self.lpips = LPIPS(lpips_weights).to(device).eval()
        except MissingAssetError as err:
            self.lpips, self.note = None, f"LPIPS skipped: {err}"

    def add(self, units: list[int], rec: torch.Tensor, real: torch.Tensor) -> None:
        values = {"psnr": psnr(rec, real), "ssim": ssim(rec, real)}  # (b,) each, over all frames
        if self.lpips is not None:
            with torch.no_grad():
                values["lpips"] = self.lpips(rec, real)
        for i, unit in enumerate(units):
            self.scores[unit] = {k: float(v[i]) for k, v in values.items()}

    def gathered(self) -> dict | None:
        parts = _gather_to_first(self.scores)
        if parts is None:
            return None
        merged = {unit: s for part in parts for unit, s in part.items()}
        names = next(iter(merged.values())).keys() if merged else ()
        out = {k: sum(merged[u][k] for u in sorted(merged)) / len(merged) for k in names}
        out["clips"] = len(merged)
        if self.note:
            out["note"] = self.note
        return out
