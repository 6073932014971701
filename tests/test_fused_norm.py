"""The fused modulated-LayerNorm kernels (walt.nn.fused_norm) against the PyTorch ops they replace.

The kernel tests run on a CUDA GPU when there is one, and otherwise under Triton's CPU interpreter: the CI test
`test_the_kernels_pass_under_the_triton_interpreter` runs this file again with ``TRITON_INTERPRET=1`` (it must be
set before Triton compiles anything, so not in this process). The other tests here check what a user sees without
a GPU: clear refusals, and checkpoints that do not record the setting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from walt.conditioning import Conditioning
from walt.lightning import DiffusionModule
from walt.nn.fused_norm import BACKWARD_ROWS, gated_residual_norm, modulated_norm
from walt.transformer import WALT

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_native_or_interpreted = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETED, reason="runs on a GPU, or on the CPU under TRITON_INTERPRET=1"
)


def kernels(test):
    """A test of the kernels: `pytest -m gpu` picks it on a GPU; on a CPU it runs under the interpreter."""
    return pytest.mark.gpu(_native_or_interpreted(test))


def inputs(B, T, H, W, D, frames, dtype=torch.float32, seed=0):
    """Tokens, a branch output and gate/shift/scale modulations (one per sample, or one per frame)."""
    gen = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(B, T, H, W, D, generator=gen) for _ in range(2))
    mods = [torch.randn(B, T if frames else 1, 1, 1, D, generator=gen) for _ in range(3)]
    return [t.to(DEVICE, dtype).requires_grad_() for t in (x, y, *mods)]


def run(fused: bool, residual: bool, x, y, gate, shift, scale):
    """Outputs and the gradients of all inputs for a loss that weighs every output element differently."""
    D = x.shape[-1]
    weight = torch.linspace(-1, 1, D, device=x.device)
    if residual:
        xo, h = gated_residual_norm(x, y, gate, shift, scale, fused=fused)
        loss = (h.float() * weight).square().sum() + (xo.float() * weight).sum()
        leaves, outs = (x, y, gate, shift, scale), (xo, h)
    else:
        h = modulated_norm(x, shift, scale, fused=fused)
        loss = (h.float() * weight).square().sum()
        leaves, outs = (x, shift, scale), (h,)
    return outs, torch.autograd.grad(loss, leaves)


# The tails matter: D = 48 leaves a quarter of a 64-wide block masked, and 7 x 7 or 3 x 7 x 7 tokens per
# modulation split into chunks of BACKWARD_ROWS with a partial last one; 2 x 4 x 8 tokens fill chunks exactly.
SHAPES = [(2, 3, 7, 7, 48, True), (2, 3, 7, 7, 48, False), (1, 2, 4, 8, 64, False)]
assert [(H * W if f else T * H * W) % BACKWARD_ROWS > 0 for _, T, H, W, _, f in SHAPES] == [True, True, False]


@kernels
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "residual+norm"])
@pytest.mark.parametrize("shape", SHAPES, ids=["per-frame", "per-sample", "one-chunk"])
def test_kernels_match_the_unfused_ops_forward_and_backward_in_float32(shape, residual):
    args = inputs(*shape)
    (outs0, grads0), (outs1, grads1) = run(False, residual, *args), run(True, residual, *args)
    for a, b in zip(outs0 + grads0, outs1 + grads1, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@kernels
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "residual+norm"])
def test_kernels_in_bf16_are_as_close_to_float64_as_the_unfused_ops(residual):
    """In bf16 neither is exact. Against the float64 function of the same bf16 inputs, the kernels' error may
    exceed the ops' only by what rounding (or the interpreter's bf16 conversion) adds: 2x, or one bf16 step."""
    args = inputs(2, 2, 8, 8, 96, True, dtype=torch.bfloat16, seed=1)
    exact = [a.detach().double().requires_grad_() for a in args]
    ref_outs, ref_grads = run(False, residual, *exact)

    def relative_errors(fused: bool):
        outs, grads = run(fused, residual, *args)
        errors = [
            (a.double() - r).abs().max() / r.abs().max() for a, r in zip(outs + grads, ref_outs + ref_grads)
        ]
        return errors, grads

    (unfused, _), (errors, grads) = relative_errors(False), relative_errors(True)
    assert all(e <= max(2 * u, 2**-7) for e, u in zip(errors, unfused, strict=True)), (errors, unfused)
    assert all(g.dtype == torch.bfloat16 for g in grads)


def small_walt(**kwargs) -> WALT:
    torch.manual_seed(0)
    net = WALT(
        in_channels=4, depth=2, hidden_size=48, num_heads=2, input_size=(3, 6, 6), num_classes=5, **kwargs
    )
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)  # every gate and modulation non-zero, unlike at initialization
    return net.to(DEVICE)


@kernels
@pytest.mark.parametrize("text", [False, True], ids=["class", "text"])
def test_a_fused_model_computes_the_same_function_and_gradients(text):
    """The whole backbone, both window kinds, and the cross-attention block (which fuses only the norms)."""
    net = small_walt(text_dim=16 if text else None)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 3, 6, 6, generator=gen).to(DEVICE)
    t = torch.rand(2, 3, generator=gen).to(DEVICE)  # per-frame times: one modulation per frame
    cond = Conditioning(labels=torch.tensor([1, 3], device=DEVICE))
    if text:
        cond = Conditioning(labels=cond.labels, text=torch.randn(2, 5, 16, generator=gen).to(DEVICE))
    results = []
    for fused in (False, True):
        net.fuse_norms(fused)
        net.zero_grad(set_to_none=True)
        out = net(x, t, cond)
        out.square().mean().backward()
        results.append((out, [p.grad for p in net.parameters()]))
    (out0, grads0), (out1, grads1) = results
    torch.testing.assert_close(out1, out0, rtol=1e-4, atol=1e-5)
    for g0, g1 in zip(grads0, grads1, strict=True):
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(INTERPRETED, reason="this is the test that starts the interpreted run")
def test_the_kernels_pass_under_the_triton_interpreter():
    if DEVICE == "cuda":
        pytest.skip("the kernels ran natively on the GPU")
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not interpreter"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\b11 passed", done.stdout), done.stdout[-1000:]


@pytest.mark.skipif(DEVICE == "cuda" or INTERPRETED, reason="checks the refusal on a CPU")
def test_a_fused_model_on_a_cpu_refuses_with_the_fix():
    net = small_walt().fuse_norms()
    x = torch.randn(1, 4, 3, 6, 6)
    with pytest.raises(ValueError, match=r"CUDA GPU.*leave fused_norm off"):
        net(x, torch.rand(1), Conditioning(labels=torch.tensor([0])))
    out = net.fuse_norms(False)(x, torch.rand(1), Conditioning(labels=torch.tensor([0])))
    assert out.shape == x.shape


@pytest.mark.skipif(DEVICE == "cuda" or INTERPRETED, reason="checks the refusal on a CPU")
def test_a_diffusion_module_with_fused_norms_is_refused_before_the_first_step_on_a_cpu(tmp_path):
    import lightning as L

    module = DiffusionModule(small_walt(), fused_norm=True, ema_decay=None, num_log_samples=0)
    assert all(block.fused_norm for block in module.backbone.blocks)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    data = [{"latent": torch.randn(4, 3, 6, 6), "label": 1} for _ in range(2)]
    with pytest.raises(ValueError, match="CUDA GPU, not on cpu"):
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    assert trainer.global_step == 0


def test_fusing_is_not_part_of_the_model_its_checkpoint_or_its_init_args():
    net = small_walt()
    before = (dict(net.init_args), set(net.state_dict()))
    net.fuse_norms()
    assert (dict(net.init_args), set(net.state_dict())) == before
