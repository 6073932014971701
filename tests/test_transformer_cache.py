"""walt.transformer.FirstBlockCache: off it is the model to the bit; on, a cached call is the model's final layer on
the first block's output plus the other blocks' residual from the last full call, decided against that call."""

from __future__ import annotations

import pytest
import torch

from walt.conditioning import Conditioning
from walt.diffusion import ddim_sample, guided
from walt.pipeline import Pipeline
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT, FirstBlockCache, relative_change


@pytest.fixture(scope="module")
def model() -> WALT:
    """A small class-conditional backbone whose zero-initialized layers (gates, modulation, output) are given
    random values, so that every block changes the stream as a trained one does."""
    torch.manual_seed(0)
    net = WALT(in_channels=4, depth=4, hidden_size=32, num_heads=2, input_size=(3, 4, 4), num_classes=3)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return net.eval()


def inputs(seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 3, 4, 4, generator=g)  # (B, C, T, H, W)
    return x, torch.full((batch,), 0.7), Conditioning(labels=torch.arange(batch) % 3)


def first_block(model: WALT, x, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """h1 and the first block's residual h1 - h0, computed block by block."""
    h0, block_inputs = model.embed(x, t, cond)
    h1 = model.run_blocks(h0, block_inputs, 0, 1)
    return h1, h1 - h0


@torch.no_grad()
def test_the_blocks_in_two_parts_are_the_forward_pass(model):
    x, t, cond = inputs()
    h0, block_inputs = model.embed(x, t, cond)
    h = model.run_blocks(model.run_blocks(h0, block_inputs, 0, 1), block_inputs, 1)
    assert torch.equal(model.final_layer(h, block_inputs.c_act), model(x, t, cond))


@torch.no_grad()
def test_threshold_zero_is_the_model_to_the_bit_on_every_call(model):
    cache = FirstBlockCache(model, 0.0)
    for seed in range(4):
        x, t, cond = inputs(seed)
        assert torch.equal(cache(x, t, cond), model(x, t, cond))
    assert cache.stats == {"full": 4, "cached": 0}


@torch.no_grad()
def test_a_cached_call_adds_the_last_full_calls_residual_to_the_first_blocks_output(model):
    cache = FirstBlockCache(model, 1e9)
    x0, t, cond = inputs(0)
    assert torch.equal(cache(x0, t, cond), model(x0, t, cond))  # the first call always runs every block
    # the residual of blocks 2..N at x0, computed independently
    h1, _ = first_block(model, x0, t, cond)
    _, block_inputs = model.embed(x0, t, cond)
    residual = model.run_blocks(h1, block_inputs, 1).float() - h1.float()
    x1 = x0 + 0.1 * inputs(1)[0]
    h1_new, _ = first_block(model, x1, t, cond)
    expected = model.final_layer((h1_new.float() + residual).to(h1_new.dtype), block_inputs.c_act)
    out = cache(x1, t, cond)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, model(x1, t, cond), atol=1e-3)  # it is an approximation
    assert cache.stats == {"full": 1, "cached": 1}


@torch.no_grad()
def test_the_threshold_decides_on_the_first_blocks_relative_change(model):
    x0, t, cond = inputs(0)
    x1 = x0 + 0.05 * inputs(1)[0]
    change = relative_change(first_block(model, x1, t, cond)[1], first_block(model, x0, t, cond)[1])
    assert 0 < change < 1
    for threshold, expected in (
        (change * 1.01, {"full": 1, "cached": 1}),
        (change * 0.99, {"full": 2, "cached": 0}),
    ):
        cache = FirstBlockCache(model, threshold)
        cache(x0, t, cond)
        cache(x1, t, cond)
        assert cache.stats == expected


@torch.no_grad()
def test_changes_are_measured_against_the_last_full_call_so_small_steps_cannot_pile_up(model):
    x0, t, cond = inputs(0)
    step = 0.05 * inputs(1)[0]
    probes = [first_block(model, x0 + k * step, t, cond)[1] for k in range(3)]
    one_step = max(relative_change(probes[1], probes[0]), relative_change(probes[2], probes[1]))
    two_steps = relative_change(probes[2], probes[0])
    assert one_step < two_steps
    cache = FirstBlockCache(model, (one_step + two_steps) / 2)
    for k in range(3):
        cache(x0 + k * step, t, cond)
    # call 2 is cached (one step from call 1's full pass); call 3 is two steps from it, so it runs in full
    assert cache.stats == {"full": 2, "cached": 1}


def test_relative_change_against_zero_and_bad_thresholds(model):
    zero = torch.zeros(3)
    assert relative_change(zero, zero) == 0.0  # blocks still at their zero initialization: nothing changed
    assert relative_change(torch.ones(3), zero) == float("inf")
    assert relative_change(torch.tensor([1.0, -1.0]), torch.tensor([2.0, -2.0])) == pytest.approx(0.5)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="relative change >= 0"):
            FirstBlockCache(model, bad)


@torch.no_grad()
def test_a_new_batch_size_runs_in_full_instead_of_reusing_another_batchs_residual(model):
    cache = FirstBlockCache(model, 1e9)
    cache(*inputs(0, batch=2))
    x, t, cond = inputs(0, batch=3)
    assert torch.equal(cache(x, t, cond), model(x, t, cond))
    assert cache.stats == {"full": 2, "cached": 0}


@torch.no_grad()
def test_cached_guided_ddim_sampling_follows_the_uncached_trajectory_more_closely_at_a_lower_threshold(model):
    """Guided DDIM over 20 steps: the cached sample drifts from the exact one as the threshold grows, and the
    number of full passes falls with it; threshold 0 is the exact sample."""
    noise = torch.randn(2, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = Conditioning(labels=torch.tensor([0, 2]))

    def run(threshold: float) -> tuple[torch.Tensor, dict]:
        cache = FirstBlockCache(model, threshold)
        fn = guided(cache, 2.0)
        return ddim_sample(lambda x, t: fn(x, t, cond), noise, num_steps=20), cache.stats

    exact, stats = run(0.0)
    assert stats == {"full": 20, "cached": 0}
    errors, fulls = [], []
    for threshold in (0.02, 0.1, 0.5):
        x, stats = run(threshold)
        errors.append((x - exact).abs().mean().item())
        fulls.append(stats["full"])
    assert fulls == sorted(fulls, reverse=True) and fulls[-1] < 20
    assert errors == sorted(errors) and errors[-1] > 0


def _pipeline() -> Pipeline:
    torch.manual_seed(0)
    tokenizer = CausalVAE(**presets["tiny"], variational=False).eval()
    backbone = WALT(
        in_channels=tokenizer.latent_channels, depth=2, hidden_size=32, num_heads=2, input_size=(2, 2, 2)
    )
    with torch.no_grad():
        for p in backbone.parameters():
            if not p.any():
                p.normal_(0, 0.2)
    return Pipeline(backbone.eval(), tokenizer, sample_steps=6)


def test_pipeline_generate_counts_cached_passes_and_zero_is_exact():
    pipe = _pipeline()
    plain = pipe.generate(num_samples=2, output="latent", progress=False)
    assert pipe.cache_stats == {"full": 0, "cached": 0}
    off = pipe.generate(num_samples=2, output="latent", progress=False, cache_threshold=0.0)
    assert torch.equal(off, plain)
    cached = pipe.generate(num_samples=2, output="latent", progress=False, cache_threshold=1e9)
    assert pipe.cache_stats == {"full": 1, "cached": 5}  # one batch of 2, 6 steps: only the first in full
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()
    with pytest.raises(ValueError, match="cache_threshold must be a finite number >= 0"):
        pipe.generate(num_samples=1, progress=False, cache_threshold=-1.0)


@torch.no_grad()
def test_the_compiled_pieces_compute_what_the_eager_ones_do(model):
    x0, t, cond = inputs(0)
    x1 = x0 + 0.05 * inputs(1)[0]
    eager, compiled = FirstBlockCache(model, 1e9), FirstBlockCache(model, 1e9, compile=True)
    for x in (x0, x1):  # a full call, then a cached one
        torch.testing.assert_close(compiled(x, t, cond), eager(x, t, cond), rtol=1e-4, atol=1e-5)
    assert compiled.stats == eager.stats == {"full": 1, "cached": 1}
