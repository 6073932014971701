"""Pre-encoded latents written by ``walt encode``, for diffusion training without running the tokenizer."""

from __future__ import annotations

import bisect
import json
from pathlib import Path

from safetensors import safe_open
from torch.utils.data import Dataset

__all__ = ["LatentShards"]


class LatentShards(Dataset):
    """Items ``{"latent": (C, T, H, W) float32, "label": int, "caption": str}`` from a ``walt encode`` folder.

    Shards are memory-mapped and read one item at a time, so the dataset costs no memory up front and data
    loader workers share the page cache.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        index_path = self.root / "index.json"
        if not index_path.is_file():
            if any(self.root.glob("*.safetensors")):  # walt encode writes index.json last
                raise FileNotFoundError(
                    f"{self.root} is incomplete: no index.json; re-run walt encode (with --overwrite): the "
                    "run that wrote these shards did not finish"
                )
            raise FileNotFoundError(
                f"no index.json in {self.root}: point root at a folder written by `walt encode --output`"
            )
        index = json.loads(index_path.read_text())
        self.shards = [self.root / s["file"] for s in index["shards"]]
        missing = [str(p) for p in self.shards if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index_path} are missing: {', '.join(missing)}")
        sizes = [int(s["num_samples"]) for s in index["shards"]]
        self._starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._length = sum(sizes)
        self._captions: dict[int, list[str] | None] = {}
        self.classes: list[str] = list(index.get("classes", []))  # names of the encoded dataset's labels

    def __len__(self) -> int:
        return self._length

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self._length:
            raise IndexError(index)
        shard = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        with safe_open(str(self.shards[shard]), framework="pt") as f:
            item = {"latent": f.get_slice("latents")[row : row + 1][0].float()}
            if "labels" in f.keys():
                item["label"] = int(f.get_slice("labels")[row : row + 1][0])
            captions = self._shard_captions(shard, f.metadata())
        if captions is not None:
            item["caption"] = captions[row]
        return item

    def _shard_captions(self, shard: int, metadata: dict | None) -> list[str] | None:
        if shard not in self._captions:
            text = (metadata or {}).get("captions")
            self._captions[shard] = json.loads(text) if text else None
        return self._captions[shard]
