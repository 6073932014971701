"""The W.A.L.T denoising backbone: a diffusion transformer with alternating window attention."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from walt.checks import check_int
from walt.conditioning import Conditioning
from walt.config import records_init_args
from walt.diffusion.self_conditioning import estimate_input
from walt.nn import (
    LabelEmbedding,
    PatchEmbed3D,
    ScalarEmbedding,
    SpatioTemporalPositionEmbedding,
    fit_window,
    window_attention_mask,
)
from walt.nn.fused_norm import check_fused_norm
from walt.nn.window import Window
from walt.transformer.block import FinalLayer, WindowBlock
from walt.transformer.presets import presets

# W.A.L.T alternates a spatial window (each whole frame) with a 5 x 8 x 8 spatiotemporal window.
WALT_WINDOWS: tuple[Window, ...] = ((1, -1, -1), (5, 8, 8))

# The guidance scale w (usually 0 .. 8) is embedded like a time: w = 10 maps where t = 1 does (1000), the range
# whose neighbouring values the sinusoidal frequencies tell apart, so scales 0.1 apart embed differently.
GUIDANCE_EMBED_SCALE = 100.0


class BlockInputs(NamedTuple):
    """What every block reads besides the token stream; computed once per forward by `WALT.embed`."""

    shared: Tensor  # (B, T', 1, 1, 6D): the shared AdaLN modulation, T' in {1, T}
    c_act: Tensor  # (B, T', 1, 1, D): silu of the conditioning vector
    windows: list[Window]  # the model's windows fitted to this token grid
    masks: list[Tensor | None]  # the attention mask of each window (padding, images among videos)
    text: Tensor | None  # (B, L, D) projected text tokens
    text_mask: Tensor | None  # (B, L)


class WALT(nn.Module):
    """Window-attention diffusion transformer: latent video (B, C, T, H, W) -> v-prediction (B, C, T, H, W).

    Layer i attends within windows[i % len(windows)]; -1 means a whole axis, so the default alternates
    spatial (1 x H' x W') and spatiotemporal (5 x 8 x 8) windows. Windows larger than the grid shrink to it,
    and axes not divisible by the window are split evenly (see `walt.nn.fit_window`); the rare remainder is
    padded and masked. ((-1, -1, -1),) gives full attention and ((1, -1, -1), (-1, 1, 1)) factorized
    spatial/temporal attention, for comparisons at matched size.

    Conditioning enabled at construction, nothing else is accepted (see `Conditioning`):
    - num_classes: class labels, -1 = learned null label for classifier-free guidance;
    - text_dim: text tokens of that width, through cross-attention in every block;
    - context_frames: known frames, channel-concatenated as [context * mask, mask]; absent = nothing known;
    - lowres: an upsampled low-resolution latent (channel-concatenated) and its noise-augmentation level
      (added to the AdaLN conditioning), for super-resolution;
    - self_conditioning: the previous estimate, channel-concatenated; absent = zeros;
    - guidance_input: the classifier-free guidance scale w (``cond.guidance``), added to the AdaLN
      conditioning, for a guidance-distilled model that computes the guided prediction in one pass.
    The input channel count follows from these, so unused paths cost nothing.

    All modulations, the text cross-attention output and the output projection start at zero, so a new
    model predicts zeros and every block starts as the identity. The guidance embedding's output layer starts
    at zero too, so a guidance-input model loaded with a plain model's weights computes exactly its function.

    Under autocast the residual stream between blocks is kept in the autocast dtype (bf16), as Megatron-LM
    does by default: the float32 position table would otherwise promote it to float32, and reading and
    writing a float32 stream is about a fifth of a block's memory traffic (benchmarks/RESULTS.md).
    ``fp32_residual=True`` keeps it in float32.
    """

    @records_init_args
    def __init__(
        self,
        in_channels: int = 8,
        depth: int = 12,
        hidden_size: int = 384,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        patch_size: int = 1,
        input_size: tuple[int, int, int] = (5, 16, 16),  # latent (T, H, W) the position tables are learned at
        windows: Sequence[tuple[int, int, int]] = WALT_WINDOWS,
        adaln_rank: int = 2,  # W.A.L.T's AdaLN-LoRA rank
        qk_norm: bool = True,
        num_classes: int | None = None,
        text_dim: int | None = None,
        context_frames: bool = False,
        lowres: bool = False,
        self_conditioning: bool = False,
        gradient_checkpointing: bool = False,
        fp32_residual: bool = False,
        guidance_input: bool = False,
    ) -> None:
        super().__init__()
        sizes = {
            "in_channels": in_channels,
            "depth": depth,
            "hidden_size": hidden_size,
            "num_heads": num_heads,
        }
        for name, value in sizes.items():
            check_int(name, value, 1)
        check_int("patch_size", patch_size, 1)
        for name, value in dict(num_classes=num_classes, text_dim=text_dim).items():
            if value is not None:
                check_int(name, value, 1)
        T0, H0, W0 = input_size
        if H0 % patch_size or W0 % patch_size:
            raise ValueError(f"input_size {input_size} must be divisible by patch_size {patch_size}")
        if not windows or any(len(w) != 3 for w in windows):
            raise ValueError(f"windows must be a non-empty list of (t, h, w) triples, got {windows}")
        self.in_channels = in_channels
        self.input_size = tuple(input_size)  # the latent (T, H, W) it was built for; the sampling default
        self.hidden_size = hidden_size
        self.windows = tuple(tuple(w) for w in windows)
        self.num_classes = num_classes
        self.text_dim = text_dim
        self.context_frames = context_frames
        self.lowres = lowres
        self.self_conditioning = self_conditioning
        self.guidance_input = guidance_input
        self.gradient_checkpointing = gradient_checkpointing
        self.fp32_residual = fp32_residual

        cross_attention = text_dim is not None
        channels = in_channels * (1 + context_frames + lowres + self_conditioning) + context_frames
        self.patch_embed = PatchEmbed3D(channels, hidden_size, patch_size)
        token_grid = (T0, H0 // patch_size, W0 // patch_size)
        self.pos_embed = SpatioTemporalPositionEmbedding(hidden_size, token_grid)
        self.t_embed = ScalarEmbedding(hidden_size)
        self.label_embed = LabelEmbedding(num_classes, hidden_size) if num_classes is not None else None
        self.aug_embed = ScalarEmbedding(hidden_size) if lowres else None
        self.guidance_embed = (
            ScalarEmbedding(hidden_size, scale=GUIDANCE_EMBED_SCALE) if guidance_input else None
        )
        # Text encoders differ widely in output scale (T5 vs. sentence encoders): normalize, then project.
        self.text_proj = (
            nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, hidden_size)) if text_dim else None
        )
        self.adaln_shared = nn.Linear(hidden_size, 6 * hidden_size)
        self.blocks = nn.ModuleList(
            WindowBlock(hidden_size, num_heads, mlp_ratio, adaln_rank, qk_norm, cross_attention)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, in_channels, patch_size)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> WALT:
        """A model of preset size `name` ("S", "B", "L", "XL"); `kwargs` set everything else."""
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **kwargs})

    def fuse_norms(self, enabled: bool = True) -> WALT:
        """Runs every block's modulated LayerNorms, with the gated residual add before the second, as Triton
        kernels (`walt.nn.fused_norm`), forward and backward; the same function as the unfused ops.

        An execution setting, not part of the model: checkpoints do not record it. Needs Triton, and the forward
        a CUDA GPU. Call it before `torch.compile`. Returns the model."""
        if enabled:
            check_fused_norm()
        for block in self.blocks:
            block.fused_norm = enabled
        return self

    def initialize_weights(self) -> None:
        """DiT-style init; zeros on every path that should start as identity (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed.spatial, std=0.02)
        nn.init.normal_(self.pos_embed.temporal, std=0.02)
        for embed in (self.t_embed, self.aug_embed, self.guidance_embed):
            if embed is not None:
                nn.init.normal_(embed.mlp[0].weight, std=0.02)
                nn.init.normal_(embed.mlp[2].weight, std=0.02)
        if self.label_embed is not None:
            nn.init.normal_(self.label_embed.table.weight, std=0.02)
        zero = [self.adaln_shared, self.final_layer.adaln, self.final_layer.unembed.proj]
        if self.guidance_embed is not None:  # adds exactly 0 until trained: the model a student starts from
            zero.append(self.guidance_embed.mlp[2])
        for block in self.blocks:
            zero.append(block.adaln.up)
            if block.cross_attn is not None:
                zero.append(block.cross_attn.proj)
        for linear in zero:
            nn.init.zeros_(linear.weight)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """x (B, C, T, H, W) noisy latent; t (B,) or (B, T) diffusion time in [0, 1] -> v (B, C, T, H, W)."""
        h, inputs = self.embed(x, t, cond)  # (B, T, H', W', D)
        h = self.run_blocks(h, inputs)  # (B, T, H', W', D)
        return self.final_layer(h, inputs.c_act)  # (B, C, T, H, W)

    def embed(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> tuple[Tensor, BlockInputs]:
        """The token stream before the first block, (B, T, H', W', D), and what every block reads besides it.

        ``forward`` is ``final_layer(run_blocks(*embed(x, t, cond)), c_act)``; the pieces are public so that a
        sampler-side cache (`walt.transformer.FirstBlockCache`) can run the blocks in two parts."""
        cond = cond if cond is not None else Conditioning()
        self._check(x, t, cond)
        B = x.shape[0]
        c = self._conditioning_vector(x, t, cond)  # (B, T', D), T' in {1, T}
        c_act = F.silu(c)[:, :, None, None, :]  # (B, T', 1, 1, D)
        shared = self.adaln_shared(c_act)  # (B, T', 1, 1, 6D)
        h = self.patch_embed(self._input(x, cond))  # (B, T, H', W', D)
        h = self._residual_dtype(self.pos_embed(h, cond.is_image))  # (B, T, H', W', D)
        text = self.text_proj(cond.text) if self.text_proj is not None else None  # (B, L, D)
        grid = tuple(h.shape[1:4])
        windows = [fit_window(grid, w) for w in self.windows]
        masks = [window_attention_mask(grid, w, B, cond.is_image, device=x.device) for w in windows]
        return h, BlockInputs(shared, c_act, windows, masks, text, cond.text_mask)

    def run_blocks(self, h: Tensor, inputs: BlockInputs, start: int = 0, stop: int | None = None) -> Tensor:
        """Blocks ``start`` .. ``stop - 1`` (default: all) on the token stream h (B, T, H', W', D)."""
        stop = len(self.blocks) if stop is None else stop
        for i in range(start, stop):
            j = i % len(inputs.windows)
            h = self._run_block(  # (B, T, H', W', D)
                self.blocks[i],
                h,
                inputs.shared,
                inputs.c_act,
                inputs.windows[j],
                inputs.masks[j],
                inputs.text,
                inputs.text_mask,
            )
        return h

    def _residual_dtype(self, h: Tensor) -> Tensor:
        device = h.device.type
        if self.fp32_residual or not torch.is_autocast_enabled(device):
            return h
        return h.to(torch.get_autocast_dtype(device))

    def _run_block(self, block: WindowBlock, *args) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _conditioning_vector(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """Sum of the time, label, augmentation-level and guidance embeddings: (B, T', D), T' = 1 or per frame."""
        B, T = x.shape[0], x.shape[2]
        c = self.t_embed(_per_frame(t, B, T, "t"))  # (B, T', D)
        if self.label_embed is not None:
            c = c + self.label_embed(_per_frame(cond.labels, B, T, "cond.labels"))  # (B, T', D)
        if self.aug_embed is not None:
            c = c + self.aug_embed(_per_frame(cond.aug_level, B, T, "cond.aug_level"))  # (B, T', D)
        if self.guidance_embed is not None:
            c = c + self.guidance_embed(_per_frame(cond.guidance, B, T, "cond.guidance"))  # (B, T', D)
        return c

    def _input(self, x: Tensor, cond: Conditioning) -> Tensor:
        """Channel-concatenates the noisy latent with the conditioning latents the model was built for."""
        parts = [x]
        if self.context_frames:
            if cond.context is None:  # nothing known: the null condition for guidance
                parts += [torch.zeros_like(x), x.new_zeros(x.shape[0], 1, *x.shape[2:])]
            else:
                mask = cond.context_mask.to(x.dtype)  # (B, 1, T, H, W)
                parts += [cond.context * mask, mask]
        if self.lowres:
            parts.append(cond.lowres)
        if self.self_conditioning:
            parts.append(estimate_input(cond.self_cond, x))  # (B, C, T, H, W)
        return torch.cat(parts, dim=1)  # (B, C_in, T, H, W)

    def _check(self, x: Tensor, t: Tensor, cond: Conditioning) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, T, H, W), got {tuple(x.shape)}")
        B, C, T, H, W = x.shape
        _require(cond.labels, self.label_embed is not None, "labels", "num_classes")
        _require(cond.text, self.text_proj is not None, "text", "text_dim")
        _require(cond.lowres, self.lowres, "lowres", "lowres=True")
        _require(cond.aug_level, self.lowres, "aug_level", "lowres=True")
        _require(cond.guidance, self.guidance_input, "guidance", "guidance_input=True")
        _allow(cond.text_mask, self.text_proj is not None, "text_mask", "text_dim")
        _allow(cond.context, self.context_frames, "context", "context_frames=True")
        _allow(cond.context_mask, self.context_frames, "context_mask", "context_frames=True")
        _allow(cond.self_cond, self.self_conditioning, "self_cond", "self_conditioning=True")
        if (cond.context is None) != (cond.context_mask is None):
            raise ValueError("cond.context and cond.context_mask must be given together")
        for name in ("context", "lowres", "self_cond"):
            _check_shape(getattr(cond, name), (B, C, T, H, W), name)
        _check_shape(cond.context_mask, (B, 1, T, H, W), "context_mask")
        if cond.text is not None:
            _check_shape(cond.text, (B, cond.text.shape[1], self.text_dim), "text")
            _check_shape(cond.text_mask, (B, cond.text.shape[1]), "text_mask")
        if cond.is_image is not None:
            _check_shape(cond.is_image, (B,), "is_image")
            if cond.is_image.dtype != torch.bool:
                raise ValueError(f"cond.is_image must be a bool tensor, got {cond.is_image.dtype}")


def _per_frame(value: Tensor, batch: int, frames: int, name: str) -> Tensor:
    """(B,) or (B, T) -> (B, T') with T' in {1, T}: one value per sample or one per latent frame."""
    if value.shape not in ((batch,), (batch, frames)):
        shape = tuple(value.shape)
        raise ValueError(f"{name} must have shape ({batch},) or ({batch}, {frames}), got {shape}")
    return value.reshape(batch, -1)


def _require(value: Tensor | None, enabled: bool, name: str, option: str) -> None:
    if enabled and value is None:
        raise ValueError(f"this model was built with {option}: cond.{name} is required")
    _allow(value, enabled, name, option)


def _allow(value: Tensor | None, enabled: bool, name: str, option: str) -> None:
    if value is not None and not enabled:
        raise ValueError(f"cond.{name} was given but the model ignores it; build the model with {option}")


def _check_shape(value: Tensor | None, shape: tuple[int, ...], name: str) -> None:
    if value is not None and tuple(value.shape) != shape:
        raise ValueError(f"cond.{name} must have shape {shape}, got {tuple(value.shape)}")
