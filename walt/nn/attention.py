"""Multi-head attention on PyTorch SDPA with qk-LayerNorm, optionally extended with context tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Attention(nn.Module):
    """Multi-head attention with a fused qkv projection and per-head LayerNorm on queries and keys.

    Self-attention by default. Given `context` tokens it becomes W.A.L.T-style cross-attention: queries come
    from `x` only, keys and values from concat[x, context], both projected with the same key/value weights.
    The context batch may be smaller than the query batch: each context row serves B / B_c consecutive rows of
    `x` (the windows of one sample), so its keys and values are projected once per sample, not per window.

    qk-LayerNorm bounds attention logits, which keeps training stable at large widths and in bf16.
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend `x` (B, N, D) to itself (and to `context` (B_c, L, D) when given).

        mask: bool (B, 1, N or 1, N), True = may attend, over the keys of `x`; None = all.
        context_mask: bool (B_c, L), True = real token, False = padding; None = all real.
        """
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d) each
        # Under autocast LayerNorm runs in float32; SDPA needs one dtype for q, k and v.
        q = self.q_norm(q).to(v.dtype)  # (B, h, N, d)
        k = self.k_norm(k).to(v.dtype)  # (B, h, N, d)
        if context is not None:
            k, v, mask = self._append_context(k, v, mask, context, context_mask)  # (B, h, N + L, d)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, D)
        return self.proj(x)  # (B, N, D)

    def _append_context(
        self, k: Tensor, v: Tensor, mask: Tensor | None, context: Tensor, context_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        B, _, N, _ = k.shape
        Bc, L, D = context.shape
        if B % Bc:
            raise ValueError(f"context batch {Bc} must divide the query batch {B} (windows per sample)")
        groups = B // Bc
        # Through the module, not slices of its weight: a wrapper of the projection (a LoRA adapter) then acts
        # on the text tokens as on the window tokens, merged or not. The queries of the text are not used.
        kv = self.qkv(context)[..., D:]  # (Bc, L, 2D)
        kc, vc = kv.view(Bc, L, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        kc = self.k_norm(kc).to(v.dtype)  # (Bc, h, L, d)
        k = torch.cat([k, kc.repeat_interleave(groups, 0)], dim=2)  # (B, h, N + L, d)
        v = torch.cat([v, vc.to(v.dtype).repeat_interleave(groups, 0)], dim=2)  # (B, h, N + L, d)
        if mask is None and context_mask is None:
            return k, v, None
        if mask is None:
            mask = torch.ones(B, 1, 1, N, dtype=torch.bool, device=k.device)  # (B, 1, 1, N)
        if context_mask is None:
            context_mask = torch.ones(Bc, L, dtype=torch.bool, device=k.device)  # (Bc, L)
        rows = mask.shape[2]
        ctx = context_mask.repeat_interleave(groups, 0)[:, None, None, :].expand(B, 1, rows, L)
        return k, v, torch.cat([mask, ctx], dim=-1)  # mask (B, 1, rows, N + L)
