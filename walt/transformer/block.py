"""Window-attention transformer block and the output layer of the W.A.L.T backbone."""

from __future__ import annotations

from torch import Tensor, nn

from walt.nn import AdaLNLoRA, Attention, Mlp, PatchUnembed3D
from walt.nn.fused_norm import gated_residual_norm, modulated_norm
from walt.nn.window import Window, pad_to_windows, window_merge, window_partition


def window_attention(
    attn: Attention,
    x: Tensor,
    window: Window,
    mask: Tensor | None,
    context: Tensor | None = None,
    context_mask: Tensor | None = None,
) -> Tensor:
    """Runs `attn` independently inside each window of x (B, T, H, W, D); all windows in one batched call."""
    T, H, W = x.shape[1:4]
    x = pad_to_windows(x, window)  # (B, Tp, Hp, Wp, D)
    padded = x.shape[1:4]
    windows = window_partition(x, window)  # (B * nw, N, D)
    windows = attn(windows, mask, context, context_mask)  # (B * nw, N, D)
    x = window_merge(windows, window, padded)  # (B, Tp, Hp, Wp, D)
    return x[:, :T, :H, :W]  # (B, T, H, W, D)


class WindowBlock(nn.Module):
    """Pre-norm transformer block whose attention is restricted to windows of the (T, H, W) token grid.

    The same block serves spatial windows (1 x H x W: each frame) and spatiotemporal windows (t x h x w);
    the window is chosen by the model per layer. Self-attention and the MLP are modulated by AdaLN-LoRA and
    gated (adaLN-Zero). With `cross_attention`, a cross-attention layer after self-attention lets each window
    attend to concat[window tokens, text tokens]. `fused_norm` (set by `WALT.fuse_norms`) runs each modulated
    LayerNorm, with the gated residual add before it, as one Triton kernel (`walt.nn.fused_norm`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        adaln_rank: int = 2,
        qk_norm: bool = True,
        cross_attention: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.cross_norm = nn.LayerNorm(dim, eps=1e-6) if cross_attention else None
        self.cross_attn = Attention(dim, num_heads, qk_norm=qk_norm) if cross_attention else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaln = AdaLNLoRA(dim, adaln_rank, num_chunks=6)
        self.fused_norm = False

    def forward(
        self,
        x: Tensor,
        shared: Tensor,
        c_act: Tensor,
        window: Window,
        mask: Tensor | None = None,
        text: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """x (B, T, H, W, D); shared (B, T', 1, 1, 6D) shared modulation; c_act (B, T', 1, 1, D) = silu(c)
        with T' in {1, T}; window: the fitted window; mask: `window_attention_mask` for it;
        text (B, L, D) and text_mask (B, L) when the block has cross-attention."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(shared, c_act)  # (B, T', 1, 1, D) each
        fused = self.fused_norm
        h = modulated_norm(x, shift1, scale1, self.norm1.eps, fused)  # (B, T, H, W, D)
        y = window_attention(self.attn, h, window, mask)  # (B, T, H, W, D)
        if self.cross_attn is None:
            x, h = gated_residual_norm(
                x, y, gate1, shift2, scale2, self.norm2.eps, fused
            )  # (B, T, H, W, D) each
        else:
            x = x + gate1 * y  # (B, T, H, W, D)
            h = self.cross_norm(x)  # (B, T, H, W, D)
            x = x + window_attention(self.cross_attn, h, window, mask, text, text_mask)  # (B, T, H, W, D)
            h = modulated_norm(x, shift2, scale2, self.norm2.eps, fused)  # (B, T, H, W, D)
        return x + gate2 * self.mlp(h)  # (B, T, H, W, D)


class FinalLayer(nn.Module):
    """Modulated LayerNorm and projection of tokens back to latent patches."""

    def __init__(self, dim: int, out_channels: int, patch_size: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln = nn.Linear(dim, 2 * dim)
        self.unembed = PatchUnembed3D(dim, out_channels, patch_size)

    def forward(self, x: Tensor, c_act: Tensor) -> Tensor:
        """x (B, T, H', W', D); c_act (B, T', 1, 1, D) -> (B, C, T, H, W)."""
        shift, scale = self.adaln(c_act).chunk(2, dim=-1)  # (B, T', 1, 1, D) each
        x = modulated_norm(x, shift, scale, self.norm.eps)  # (B, T, H', W', D)
        return self.unembed(x)  # (B, C, T, H, W)
