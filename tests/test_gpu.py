"""The performance paths on a CUDA device: compiled equals eager, attention stays on the fused kernels, the
compiled training step learns. Run with `pytest -m gpu` on a GPU machine whenever performance-relevant code
changes (CI has no GPU and skips these)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from walt.conditioning import Conditioning
from walt.lightning import DiffusionModule
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

C = 8


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: compiled graphs of earlier tests (other FP8 recipes of the same module
    code) would otherwise count toward Dynamo's recompile limit, and fullgraph=True turns that into a failure."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def model(**kwargs) -> WALT:
    torch.manual_seed(0)
    net = WALT(in_channels=C, depth=4, hidden_size=256, num_heads=4, input_size=(4, 16, 16), num_classes=10,
               self_conditioning=True, **kwargs)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)  # every path non-zero, including the zero-initialized ones
    return net.cuda()


def batch(B: int = 2) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, C, 4, 16, 16, device="cuda", generator=gen)
    t = torch.rand(B, device="cuda", generator=gen)
    labels = torch.randint(0, 10, (B,), device="cuda", generator=gen)
    return x, t, Conditioning(labels=labels, self_cond=torch.zeros_like(x))


def forward_and_gradients(net: WALT, runnable, x, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """`runnable` (net or a compiled net) in bf16: its float32 output and the flat gradient of net's
    parameters for the output's mean square."""
    net.zero_grad(set_to_none=True)
    with torch.autocast("cuda", torch.bfloat16):
        out = runnable(x, t, cond)
    out.float().square().mean().backward()
    return out.float(), torch.cat([p.grad.flatten() for p in net.parameters()])


def test_compiled_forward_and_gradients_match_eager_in_bf16():
    net = model().train()
    x, t, cond = batch()
    eager, g_eager = forward_and_gradients(net, net, x, t, cond)
    compiled, g_compiled = forward_and_gradients(net, torch.compile(net, fullgraph=True), x, t, cond)
    assert (compiled - eager).norm() / eager.norm() < 2e-2
    assert (g_compiled - g_eager).norm() / g_eager.norm() < 5e-2


def test_compiled_fused_norm_model_matches_the_unfused_eager_one_in_bf16():
    """The Triton modulated-LayerNorm kernels inside a fullgraph compile (torch.library.triton_op), forward and
    backward, against the eager composition of PyTorch ops: as close as compiling alone makes it."""
    net = model().train()
    x, t, cond = batch()
    eager, g_eager = forward_and_gradients(net, net, x, t, cond)
    net.fuse_norms()
    fused, g_fused = forward_and_gradients(net, torch.compile(net, fullgraph=True), x, t, cond)
    assert (fused - eager).norm() / eager.norm() < 2e-2
    assert (g_fused - g_eager).norm() / g_eager.norm() < 5e-2


def test_unmasked_window_attention_runs_on_fused_kernels_only():
    """Grid divisible by the windows and no images: no mask, so flash or cuDNN attention must accept it
    (restricting SDPA to them raises if it would have needed the math fallback)."""
    net = model().eval()
    x, t, cond = batch()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        reference = net(x, t, cond)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
            fused = net(x, t, cond)
    torch.testing.assert_close(fused, reference)


@pytest.mark.parametrize(
    ("float8", "fused_norm"),
    [(None, False), ("tensorwise", False), ("rowwise", False), (None, True), ("rowwise", True)],
)
def test_compiled_module_training_lowers_the_loss(float8, fused_norm):
    """Also with FP8 matmuls (needs compute capability 8.9+: an H100/H200 has it) and the fused norms."""
    if float8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    module = DiffusionModule(
        model(),
        ema_decay=0.99,
        warmup_steps=1,
        num_log_samples=0,
        compile=True,
        float8=float8,
        fused_norm=fused_norm,
    ).cuda()
    optimizer = torch.optim.AdamW(module.backbone.parameters(), lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(0)
    data = {
        "latent": torch.randn(16, C, 4, 16, 16, device="cuda") * 0.5,
        "label": torch.arange(16, device="cuda") % 10,
    }

    def held_out_loss() -> float:
        with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
            return module._loss(data, train=False, generator=gen.manual_seed(1)).item()

    before = held_out_loss()
    for _ in range(30):
        with torch.autocast("cuda", torch.bfloat16):
            loss = module._loss(data, train=True)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        module.ema.update(module.backbone)
    assert held_out_loss() < 0.8 * before


@pytest.mark.parametrize("recipe", ["rowwise", "tensorwise"])
def test_fp8_sampling_weights_predict_what_bf16_does_eager_and_compiled(recipe):
    """Pipeline.quantize_float8's conversion: the blocks' four linears hold FP8 weights, and the denoiser's
    prediction stays within FP8's rounding of the bf16 one, eager and compiled (as Pipeline.compile() runs it)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("no FP8 tensor cores")
    from walt.transformer.float8 import float8_linear_names, quantize_float8_inference

    reference = model().eval()
    quantized = model().eval()
    names = float8_linear_names(quantized)
    quantize_float8_inference(quantized, recipe)
    modules = dict(quantized.named_modules())
    assert len(names) == 4 * 4
    assert all(modules[n].weight.qdata.dtype == torch.float8_e4m3fn for n in names)  # torchao's Float8Tensor
    x, t, cond = batch(4)
    dtypes = []
    hook = modules["blocks.0.attn.qkv"].register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        expected = reference(x, t, cond).float()
        eager = quantized(x, t, cond).float()
    assert dtypes == [torch.bfloat16]  # as the bf16 linear's: FP8 must not write float32 activations
    hook.remove()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        quantized.compile(fullgraph=True)
        compiled = quantized(x, t, cond).float()
    for got in (eager, compiled):
        assert (got - expected).norm() / expected.norm() < 0.1
    assert (compiled - eager).norm() / eager.norm() < 2e-2


def test_chunked_causal_decode_equals_one_pass_in_bf16():
    torch.manual_seed(0)
    vae = CausalVAE(**presets["tiny"], variational=False).cuda().eval()
    z = torch.randn(1, vae.latent_channels, 5, 8, 8, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        whole, chunked = vae.decode(z), vae.decode(z, 1)
    torch.testing.assert_close(chunked, whole, atol=2e-2, rtol=0)


def test_first_block_cache_compiled_on_the_gpu_matches_eager_in_bf16():
    """The first-block cache's compiled pieces (what Pipeline.compile() makes it use): a full call and a cached
    call agree with the eager cache under bf16 autocast, and threshold 0 is the model."""
    from walt.transformer import FirstBlockCache

    net = model().eval()
    x, t, cond = batch()
    x1 = x + 0.05 * torch.randn_like(x)
    eager, compiled = FirstBlockCache(net, 1e9), FirstBlockCache(net, 1e9, compile=True)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        assert torch.equal(FirstBlockCache(net, 0.0)(x, t, cond), net(x, t, cond))
        for inputs in (x, x1):
            a, b = eager(inputs, t, cond).float(), compiled(inputs, t, cond).float()
            assert (b - a).norm() / a.norm() < 2e-2
    assert eager.stats == compiled.stats == {"full": 1, "cached": 1}


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_the_compiled_decoder_is_as_close_to_float32_as_the_eager_one_in_bf16(chunk_size):
    """The condition for compiling the decoder by default: under bf16 autocast, the compiled decoder (in place,
    keys unchanged) is no further from the float32 decode than the eager bf16 decode is, in one pass and
    through the causal chunk cache. Fused kernels round elsewhere, so bit equality is not the criterion."""
    import copy

    torch.manual_seed(0)
    vae = CausalVAE(**presets["small"], variational=False).cuda().eval()
    z = torch.randn(2, vae.latent_channels, 3, 16, 16, device="cuda")
    compiled = copy.deepcopy(vae)
    compiled.decoder.compile()
    assert compiled.state_dict().keys() == vae.state_dict().keys()
    with torch.no_grad():
        reference = vae.decode(z, chunk_size).float()
        with torch.autocast("cuda", torch.bfloat16):
            eager = vae.decode(z, chunk_size).float()
            fused = compiled.decode(z, chunk_size).float()
    eager_error, fused_error = (eager - reference).abs(), (fused - reference).abs()
    assert fused_error.mean() <= 1.25 * eager_error.mean() + 1e-4
    assert fused_error.max() <= 2 * eager_error.max() + 1e-3
