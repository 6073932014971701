"""The block's AdaLN-modulated LayerNorm, optionally fused with the gated residual add before it, in Triton.

Each W.A.L.T block computes ``x = x + gate * branch(h)`` and then ``h = LN(x) * (1 + scale) + shift`` twice.
Compiled, Inductor already fuses the forward of each into one pass, but it splits the backward into a per-token
kernel and separate reductions over the tokens for the gradients of ``gate``, ``shift`` and ``scale`` (they are
per sample or per frame), which read the activations again. The kernels here do the forward in one pass and the
backward in one pass that also accumulates those three reductions per block of tokens.

`modulated_norm` and `gated_residual_norm` take ``fused``: False is the composition of PyTorch ops (any device);
True runs the kernels, which need Triton and a CUDA GPU (or Triton's CPU interpreter, ``TRITON_INTERPRET=1``,
which the tests use). Both are registered as ``torch.library.triton_op`` so that ``torch.compile`` keeps them in
its graph, forward and backward.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from walt.nn.modulation import modulate

# Read once at import: Triton reads TRITON_INTERPRET at its import too, and torch.compile cannot trace find_spec.
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# How many tokens one backward program walks: enough to amortize writing its partial sums of the modulation
# gradients, few enough that a 4 x 4096-token batch still fills every SM.
BACKWARD_ROWS = 32


def fused_norm_problem(device: torch.device | str | None = None) -> str | None:
    """Why the fused kernels cannot run (on `device`, when given), with the fix; None when they can."""
    if not _HAS_TRITON:
        return (
            "the fused norms need Triton (it comes with PyTorch's CUDA builds on Linux): pip install triton"
        )
    if device is None or _INTERPRETED:
        return None
    if torch.device(device).type != "cuda":
        return (
            f"the fused norms run on a CUDA GPU, not on {torch.device(device).type}: move the model to a GPU "
            "or leave fused_norm off (the unfused ops compute the same function)"
        )
    return None


def check_fused_norm(device: torch.device | str | None = None) -> None:
    """Raises ValueError with the fix when `fused_norm_problem` finds one."""
    problem = fused_norm_problem(device)
    if problem is not None:
        raise ValueError(problem)


def modulated_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, fused: bool = False) -> Tensor:
    """LN(x) * (1 + scale) + shift, LayerNorm without affine over the last axis.

    x (B, T, H, W, D); shift, scale (B, T', 1, 1, D) with T' in {1, T}.
    """
    if not fused:
        return modulate(F.layer_norm(x, x.shape[-1:], eps=eps), shift, scale)  # (B, T, H, W, D)
    rows, mods, shape = _flatten(x, shift)
    h, _, _ = torch.ops.walt.modulated_norm(rows, mods(shift), mods(scale), eps)  # (M, D)
    return h.view(shape)  # (B, T, H, W, D)


def gated_residual_norm(
    x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float = 1e-6, fused: bool = False
) -> tuple[Tensor, Tensor]:
    """x + gate * y, and its `modulated_norm`: the residual stream after a gated branch, and the next input.

    x, y (B, T, H, W, D); gate, shift, scale (B, T', 1, 1, D) with T' in {1, T}.
    """
    if not fused:
        x = x + gate * y  # (B, T, H, W, D)
        return x, modulated_norm(x, shift, scale, eps)
    rows, mods, shape = _flatten(x, shift)
    y = y.reshape(rows.shape)  # (M, D)
    x, h, _, _ = torch.ops.walt.gated_residual_norm(rows, y, mods(gate), mods(shift), mods(scale), eps)
    return x.view(shape), h.view(shape)  # (B, T, H, W, D) each


def _flatten(x: Tensor, shift: Tensor):
    """x as (M, D) token rows, a function giving each modulation as (B * T', D) rows, and x's shape.

    Tokens are ordered (b, t, h, w), so a modulation row serves M / (B * T') consecutive token rows."""
    check_fused_norm(x.device)
    B, T = x.shape[:2]
    if (
        shift.ndim != x.ndim
        or shift.shape[0] != B
        or shift.shape[1] not in (1, T)
        or shift.shape[2:-1].numel() != 1
    ):
        raise ValueError(f"modulation of shape {tuple(shift.shape)} does not fit tokens {tuple(x.shape)}")
    D = x.shape[-1]
    return x.reshape(-1, D), lambda m: m.reshape(-1, D).contiguous(), x.shape


if _HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

    @triton.jit
    def _forward_kernel(
        x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr,  # inputs
        xo_ptr, h_ptr, mean_ptr, rstd_ptr,  # outputs
        D, group, eps,
        HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        mod = row // group  # the sample (or frame) whose modulation this token takes
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y = tl.load(y_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            gate = tl.load(gate_ptr + mod * D + cols, mask=mask, other=0.0).to(tl.float32)
            xo = (x + gate * y).to(xo_ptr.dtype.element_ty)
            tl.store(xo_ptr + row * D + cols, xo, mask=mask)
            x = xo.to(tl.float32)  # normalize the stream as stored: the backward reads it back
        mean = tl.sum(x, axis=0) / D
        centered = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / D + eps)
        shift = tl.load(shift_ptr + mod * D + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + mod * D + cols, mask=mask, other=0.0).to(tl.float32)
        h = centered * rstd * (1.0 + scale) + shift
        tl.store(h_ptr + row * D + cols, h.to(h_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _backward_kernel(
        xo_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr, dh_ptr, dxo_ptr,  # inputs
        dx_ptr, dy_ptr, part_ptr,  # outputs; part: (mods, chunks, 3, D) partial sums
        D, group, chunks, rows_per_program,
        HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        mod = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        scale = tl.load(scale_ptr + mod * D + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.zeros([BLOCK_D], tl.float32)
        if HAS_RESIDUAL:
            gate = tl.load(gate_ptr + mod * D + cols, mask=mask, other=0.0).to(tl.float32)
        d_scale = tl.zeros([BLOCK_D], tl.float32)
        d_shift = tl.zeros([BLOCK_D], tl.float32)
        d_gate = tl.zeros([BLOCK_D], tl.float32)
        first = chunk * rows_per_program
        for i in range(0, rows_per_program):
            m = mask & (first + i < group)
            row = mod * group + first + i
            x = tl.load(xo_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
            dh = tl.load(dh_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
            mean = tl.load(mean_ptr + row, mask=first + i < group, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=first + i < group, other=0.0)
            xhat = tl.where(m, (x - mean) * rstd, 0.0)
            dxhat = dh * (1.0 + scale)
            dx = (dxhat - (xhat * (tl.sum(xhat * dxhat, axis=0) / D) + tl.sum(dxhat, axis=0) / D)) * rstd
            d_scale += dh * xhat
            d_shift += dh
            if HAS_RESIDUAL:
                dx += tl.load(dxo_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
                y = tl.load(y_ptr + row * D + cols, mask=m, other=0.0).to(tl.float32)
                d_gate += dx * y
                tl.store(dy_ptr + row * D + cols, (dx * gate).to(dy_ptr.dtype.element_ty), mask=m)
            tl.store(dx_ptr + row * D + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)
        part = part_ptr + ((mod * chunks + chunk) * 3) * D + cols
        tl.store(part, d_scale, mask=mask)
        tl.store(part + D, d_shift, mask=mask)
        tl.store(part + 2 * D, d_gate, mask=mask)

    def _warps(block: int) -> int:
        return min(max(block // 256, 1), 16)

    def _forward(x, y, gate, shift, scale, eps, residual):
        M, D = x.shape
        dtype = (
            torch.promote_types(x.dtype, torch.promote_types(y.dtype, gate.dtype)) if residual else x.dtype
        )
        xo = torch.empty(M, D, dtype=dtype, device=x.device) if residual else x.new_empty(0)
        h = torch.empty(M, D, dtype=dtype, device=x.device)
        mean = torch.empty(M, dtype=torch.float32, device=x.device)
        rstd = torch.empty(M, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(D)
        wrap_triton(_forward_kernel)[(M,)](
            x, y, gate, shift, scale, xo, h, mean, rstd, D, M // shift.shape[0], eps,
            HAS_RESIDUAL=residual, BLOCK_D=block, num_warps=_warps(block),
        )  # fmt: skip
        return xo, h, mean, rstd

    @triton_op("walt::modulated_norm", mutates_args=())
    def _modulated_norm(x: Tensor, shift: Tensor, scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        x = x.contiguous()
        _, h, mean, rstd = _forward(x, x, shift, shift, scale, eps, residual=False)
        return h, mean, rstd

    @triton_op("walt::gated_residual_norm", mutates_args=())
    def _gated_residual_norm(
        x: Tensor, y: Tensor, gate: Tensor, shift: Tensor, scale: Tensor, eps: float
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _forward(x.contiguous(), y.contiguous(), gate, shift, scale, eps, residual=True)

    @triton_op("walt::modulated_norm_backward", mutates_args=())
    def _modulated_norm_backward(
        xo: Tensor, y: Tensor, gate: Tensor, scale: Tensor, mean: Tensor, rstd: Tensor, dh: Tensor, dxo: Tensor,
        x_dtype: torch.dtype, residual: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        """dx, dy (M, D) and the summed (mods, 3, D) gradients of scale, shift and gate; dy is empty without
        the residual."""
        M, D = xo.shape
        mods = scale.shape[0]
        group = M // mods
        chunks = triton.cdiv(group, BACKWARD_ROWS)
        dx = torch.empty(M, D, dtype=x_dtype, device=xo.device)
        dy = torch.empty(M, D, dtype=y.dtype, device=xo.device) if residual else xo.new_empty(0)
        part = torch.empty(mods, chunks, 3, D, dtype=torch.float32, device=xo.device)
        block = triton.next_power_of_2(D)
        wrap_triton(_backward_kernel)[(mods, chunks)](
            xo, y, gate, scale, mean, rstd, dh.contiguous(), dxo.contiguous(), dx, dy, part,
            D, group, chunks, BACKWARD_ROWS,
            HAS_RESIDUAL=residual, BLOCK_D=block, num_warps=_warps(block),
        )  # fmt: skip
        return dx, dy, part.sum(1)

    def _save_norm(ctx, inputs, output):
        x, shift, scale, _eps = inputs
        _h, mean, rstd = output
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_dtype = shift.dtype

    def _norm_backward(ctx, dh, _dmean, _drstd):
        x, scale, mean, rstd = ctx.saved_tensors
        x = x.contiguous()
        dx, _, sums = torch.ops.walt.modulated_norm_backward(
            x, x, scale, scale, mean, rstd, dh, dh, x.dtype, False
        )
        return dx, sums[:, 1].to(ctx.shift_dtype), sums[:, 0].to(scale.dtype), None

    def _save_residual(ctx, inputs, output):
        x, y, gate, shift, scale, _eps = inputs
        xo, _h, mean, rstd = output
        ctx.save_for_backward(xo, y, gate, scale, mean, rstd)
        ctx.x_dtype = x.dtype
        ctx.shift_dtype = shift.dtype

    def _residual_backward(ctx, dxo, dh, _dmean, _drstd):
        xo, y, gate, scale, mean, rstd = ctx.saved_tensors
        dxo = torch.zeros_like(xo) if dxo is None else dxo
        dh = torch.zeros_like(xo) if dh is None else dh
        dx, dy, sums = torch.ops.walt.modulated_norm_backward(
            xo, y.contiguous(), gate, scale, mean, rstd, dh, dxo, ctx.x_dtype, True
        )
        d_scale, d_shift, d_gate = sums.unbind(1)
        return dx, dy, d_gate.to(gate.dtype), d_shift.to(ctx.shift_dtype), d_scale.to(scale.dtype), None

    _modulated_norm.register_autograd(_norm_backward, setup_context=_save_norm)
    _gated_residual_norm.register_autograd(_residual_backward, setup_context=_save_residual)
