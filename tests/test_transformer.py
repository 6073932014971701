"""The W.A.L.T backbone: window locality, mixed image/video batches, conditioning, init, compile, sizes."""

import pytest
import torch

from walt.conditioning import Conditioning
from walt.nn import Attention, fit_window, window_attention_mask
from walt.transformer import WALT, WindowBlock, presets, window_attention

C = 4  # latent channels of the tiny test models


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny(**kwargs) -> WALT:
    config = {"in_channels": C, "depth": 2, "hidden_size": 32, "num_heads": 2, "input_size": (4, 8, 8)}
    config["windows"] = ((1, -1, -1), (2, 4, 4))
    return WALT(**{**config, **kwargs}).eval()


def randomize_(module: torch.nn.Module, std: float = 0.2) -> torch.nn.Module:
    """Stand-in for trained weights: every parameter nonzero, including the zero-initialized paths."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def full_model(**kwargs) -> WALT:
    """Every conditioning path enabled."""
    return tiny(num_classes=5, text_dim=6, context_frames=True, lowres=True, self_conditioning=True, **kwargs)


def full_inputs(B=2, T=3, H=8, W=8):
    x = torch.randn(B, C, T, H, W)
    context_mask = torch.zeros(B, 1, T, H, W)
    context_mask[:, :, :1] = 1  # first latent frame known (image-to-video)
    cond = Conditioning(
        labels=torch.tensor([1, 2])[:B],
        text=torch.randn(B, 3, 6),
        text_mask=torch.tensor([[True, True, False], [True, True, True]])[:B],
        context=torch.randn(B, C, T, H, W),
        context_mask=context_mask,
        lowres=torch.randn(B, C, T, H, W),
        aug_level=torch.rand(B),
        self_cond=torch.randn(B, C, T, H, W),
    )
    return x, torch.rand(B), cond


# ---------------------------------------------------------------- init and shapes


def test_zero_initialized_model_outputs_zeros_and_still_learns():
    model = full_model()
    x, t, cond = full_inputs()
    out = model(x, t, cond)
    assert torch.equal(out, torch.zeros_like(x))
    out.square().add(out).sum().backward()  # d/d(out) = 1 everywhere
    assert model.final_layer.unembed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("patch_size", "shape"),
    [
        (1, (2, C, 5, 8, 8)),  # the paper's grid shape pattern (5 latent frames)
        (2, (2, C, 5, 8, 8)),
        (1, (2, C, 3, 6, 10)),  # windows (2, 4, 4) fit to (2, 3, 4): time and width padded
        (2, (1, C, 7, 12, 20)),  # tokens (7, 6, 10): padded in every axis
        (1, (3, C, 1, 8, 8)),  # images: a single latent frame
    ],
)
def test_output_shape(patch_size, shape):
    model = randomize_(tiny(patch_size=patch_size, num_classes=5))
    x = torch.randn(shape)
    out = model(x, torch.rand(shape[0]), Conditioning(labels=torch.zeros(shape[0], dtype=torch.long)))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_presets_and_from_preset():
    assert presets["L"] == {"depth": 24, "hidden_size": 1024, "num_heads": 16}
    assert presets["XL"] == {"depth": 28, "hidden_size": 1152, "num_heads": 16}
    assert {"S", "B"} <= set(presets)
    model = WALT.from_preset("S", depth=1)
    assert model.hidden_size == 384 and len(model.blocks) == 1
    with pytest.raises(ValueError, match="unknown preset"):
        WALT.from_preset("XXL")


# ---------------------------------------------------------------- window locality


def block_output(block, x, window):
    shared = torch.randn(1, 1, 1, 1, 6 * x.shape[-1], generator=torch.Generator().manual_seed(1))
    c_act = torch.randn(1, 1, 1, 1, x.shape[-1], generator=torch.Generator().manual_seed(2))
    mask = window_attention_mask(tuple(x.shape[1:4]), window, x.shape[0])
    return block(x, shared, c_act, window, mask)


@pytest.mark.parametrize(
    ("kind", "window"), [("spatial", (1, 8, 8)), ("spatiotemporal", (2, 4, 4)), ("temporal", (4, 1, 1))]
)
def test_block_output_depends_only_on_its_window(kind, window):
    block = randomize_(WindowBlock(16, 2)).eval()
    x = torch.randn(1, 4, 8, 8, 16)
    p = (3, 5, 6)  # (t, h, w) of the watched token
    start = [(i // w) * w for i, w in zip(p, window)]
    inside = torch.zeros(4, 8, 8, dtype=torch.bool)
    inside[tuple(slice(s, s + w) for s, w in zip(start, window))] = True
    out = block_output(block, x, window)

    outside_changed = x + 10 * torch.randn_like(x) * (~inside)[None, ..., None]
    torch.testing.assert_close(block_output(block, outside_changed, window)[(0, *p)], out[(0, *p)])

    neighbour = (p[0], p[1], p[2] - 1) if kind == "spatial" else (p[0] - 1, p[1], p[2])
    assert inside[neighbour]
    inside_changed = x.clone()
    inside_changed[(0, *neighbour)] += torch.randn(16)  # not a constant: LayerNorm would remove it
    assert not torch.allclose(block_output(block, inside_changed, window)[(0, *p)], out[(0, *p)])


@pytest.mark.parametrize("is_image", [None, torch.tensor([False, True])])
def test_padded_windows_equal_attention_on_each_ragged_window(is_image):
    """Padding is invisible: each (possibly cut-off) window attends exactly within itself."""
    attn = randomize_(Attention(8, 2), 0.3)
    grid, window = (3, 5, 7), (2, 3, 4)
    x = torch.randn(2, *grid, 8)
    mask = window_attention_mask(grid, window, 2, is_image)
    out = window_attention(attn, x, window, mask)
    for b in range(2):
        for t in range(0, 3, 2):
            for h in range(0, 5, 3):
                for w in range(0, 7, 4):
                    region = x[b, t : t + 2, h : h + 3, w : w + 4]  # (t', h', w', D), cut at the border
                    if is_image is not None and is_image[b]:
                        frames = [attn(f.reshape(1, -1, 8)).reshape(f.shape) for f in region]
                        expected = torch.stack(frames)
                    else:
                        expected = attn(region.reshape(1, -1, 8)).reshape(region.shape)
                    torch.testing.assert_close(out[b, t : t + 2, h : h + 3, w : w + 4], expected)


# ---------------------------------------------------------------- mixed image/video batches


@pytest.mark.parametrize("frames", [4, 3])  # 3: the spatiotemporal window (2, 4, 4) pads time
def test_mixed_batch_images_and_videos_do_not_interact(frames):
    model = randomize_(tiny(num_classes=5, depth=4)).double()
    videos = torch.randn(2, C, frames, 8, 8, dtype=torch.float64)
    images = torch.randn(2, C, frames, 8, 8, dtype=torch.float64)  # 2 samples of `frames` packed images
    video_t, image_t = torch.rand(2, dtype=torch.float64), torch.rand(2, frames, dtype=torch.float64)
    video_labels, image_labels = torch.tensor([0, 3]), torch.randint(-1, 5, (2, frames))

    mixed = model(
        torch.cat([videos, images]),
        torch.cat([video_t[:, None].expand(2, frames), image_t]),
        Conditioning(
            labels=torch.cat([video_labels[:, None].expand(2, frames), image_labels]),
            is_image=torch.tensor([False, False, True, True]),
        ),
    )
    alone = model(videos, video_t, Conditioning(labels=video_labels))
    torch.testing.assert_close(mixed[:2], alone)
    for b in range(2):
        for f in range(frames):
            image = images[b : b + 1, :, f : f + 1]  # (1, C, 1, H, W)
            single = model(image, image_t[b, f : f + 1], Conditioning(labels=image_labels[b, f : f + 1]))
            torch.testing.assert_close(mixed[2 + b, :, f : f + 1], single[0])


# ---------------------------------------------------------------- conditioning


def test_every_conditioning_path_changes_the_output():
    model = randomize_(full_model())
    x, t, cond = full_inputs()
    base = model(x, t, cond)
    known = cond.context_mask.bool().expand_as(cond.context)
    one_token = torch.tensor([True, False, False])  # flipping the mask keeps one real token per sample
    variants = {
        "t": (x, torch.rand(2), cond),
        "labels": (x, t, Conditioning(**{**vars(cond), "labels": torch.tensor([2, 4])})),
        "null label": (x, t, Conditioning(**{**vars(cond), "labels": torch.tensor([-1, -1])})),
        "text": (x, t, Conditioning(**{**vars(cond), "text": torch.randn(2, 3, 6)})),
        "text_mask": (x, t, Conditioning(**{**vars(cond), "text_mask": ~cond.text_mask | one_token})),
        "context": (x, t, Conditioning(**{**vars(cond), "context": torch.where(known, 0.0, cond.context)})),
        "context_mask": (x, t, Conditioning(**{**vars(cond), "context_mask": torch.ones(2, 1, 3, 8, 8)})),
        "lowres": (x, t, Conditioning(**{**vars(cond), "lowres": torch.randn_like(x)})),
        "aug_level": (x, t, Conditioning(**{**vars(cond), "aug_level": torch.rand(2)})),
        "self_cond": (x, t, Conditioning(**{**vars(cond), "self_cond": None})),
    }
    for name, inputs in variants.items():
        assert (model(*inputs) - base).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4, name


def test_unread_inputs_do_not_change_the_output():
    model = randomize_(full_model())
    x, t, cond = full_inputs()
    base = model(x, t, cond)
    unknown = ~cond.context_mask.bool().expand_as(cond.context)
    text = cond.text.clone()
    text[0, 2] = 100.0  # a padded text token
    same = {
        "context where the mask is 0": Conditioning(
            **{**vars(cond), "context": torch.where(unknown, torch.randn_like(x), cond.context)}
        ),
        "padded text tokens": Conditioning(**{**vars(cond), "text": text}),
    }
    for name, c in same.items():
        torch.testing.assert_close(model(x, t, c), base, msg=name)


def test_inputs_the_model_was_not_built_for_are_rejected():
    x = torch.randn(2, C, 3, 8, 8)
    t = torch.rand(2)
    with pytest.raises(ValueError, match="num_classes"):
        tiny(num_classes=5)(x, t)
    with pytest.raises(ValueError, match="model ignores it"):
        tiny()(x, t, Conditioning(labels=torch.zeros(2, dtype=torch.long)))
    with pytest.raises(ValueError, match="lowres=True"):
        tiny()(x, t, Conditioning(lowres=torch.randn_like(x)))
    with pytest.raises(ValueError, match="context_mask must be given together"):
        tiny(context_frames=True)(x, t, Conditioning(context=torch.randn_like(x)))
    with pytest.raises(ValueError, match=r"cond.self_cond must have shape"):
        tiny(self_conditioning=True)(x, t, Conditioning(self_cond=torch.randn(2, C, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"t must have shape"):
        tiny()(x, torch.rand(3))
    with pytest.raises(ValueError, match=r"x must be \(B, 4, T, H, W\)"):
        tiny()(torch.randn(2, 3, 3, 8, 8), t)


def test_input_channels_follow_the_enabled_paths():
    assert tiny().patch_embed.proj.in_features == C
    assert tiny(self_conditioning=True).patch_embed.proj.in_features == 2 * C
    assert full_model().patch_embed.proj.in_features == 4 * C + 1  # x, context, mask, lowres, self_cond


# ---------------------------------------------------------------- execution modes


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, cond = full_inputs()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = randomize_(full_model()).train()
        model.gradient_checkpointing = checkpointing
        model(x, t, cond).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_compiles_in_one_graph_with_masks_and_checkpointing():
    """fullgraph=True raises on any graph break (block loop, masks, checkpointing)."""
    model = randomize_(tiny(num_classes=5, gradient_checkpointing=True)).train()
    x = torch.randn(2, C, 3, 6, 10)  # padded windows
    t = torch.rand(2, 3)
    cond = Conditioning(labels=torch.randint(-1, 5, (2, 3)), is_image=torch.tensor([False, True]))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, t, cond)
    out.square().mean().backward()
    torch.testing.assert_close(out, model(x, t, cond))


def test_one_block_compiles_with_inductor():
    """Inductor code generation of a whole block in one graph (what the GPU benchmark compiles)."""
    block = randomize_(WindowBlock(16, 2)).eval()
    x = torch.randn(1, 5, 8, 8, 16)
    shared, c_act = torch.randn(1, 1, 1, 1, 96), torch.randn(1, 1, 1, 1, 16)
    window = fit_window((5, 8, 8), (5, 4, 4))
    compiled = torch.compile(block, fullgraph=True)
    torch.testing.assert_close(compiled(x, shared, c_act, window), block(x, shared, c_act, window))


def test_bf16_autocast_stays_close_to_float32():
    model = randomize_(full_model(), std=0.1)
    x, t, cond = full_inputs()
    reference = model(x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
    assert out.dtype == torch.bfloat16
    error = (out.float() - reference).norm() / reference.norm()
    assert error < 0.03, error


@pytest.mark.parametrize("fp32_residual", [False, True])
def test_residual_stream_dtype_under_autocast(fp32_residual):
    """bf16 autocast keeps the stream between blocks in bf16 (unless asked for float32); both stay close to a
    float32 forward, and the choice compiles into one graph."""
    model = randomize_(full_model(fp32_residual=fp32_residual), std=0.1)
    x, t, cond = full_inputs()
    reference = model(x, t, cond)
    seen = []
    model.blocks[0].register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, cond)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x, t, cond)
    stream = torch.float32 if fp32_residual else torch.bfloat16
    assert seen[0] == (stream, stream)
    error = (out.float() - reference).norm() / reference.norm()
    assert error < 0.03, error
    torch.testing.assert_close(compiled, out)


# ---------------------------------------------------------------- parameter counts


def count_by_formula(depth, D, in_channels, out_channels, num_classes, rank, grid, patch=1, freq=256):
    """Parameters of a class-conditional WALT, counted by hand from the architecture."""
    T0, H0, W0 = grid
    head_dim = D // 16
    attention = (3 * D * D + 3 * D) + 2 * (2 * head_dim) + (D * D + D)  # qkv, qk-LayerNorms, output
    mlp = (D * 4 * D + 4 * D) + (4 * D * D + D)
    adaln_lora = D * rank + rank * 6 * D
    blocks = depth * (attention + mlp + adaln_lora)
    patch_embed = in_channels * patch * patch * D + D
    positions = (H0 // patch) * (W0 // patch) * D + T0 * D
    time = (freq * D + D) + (D * D + D)
    labels = (num_classes + 1) * D
    shared_adaln = D * 6 * D + 6 * D
    final = (D * 2 * D + 2 * D) + (D * patch * patch * out_channels + patch * patch * out_channels)
    return blocks + patch_embed + positions + time + labels + shared_adaln + final


@pytest.mark.parametrize(("name", "paper_millions"), [("L", 313), ("XL", 460)])
def test_parameter_counts_of_paper_sizes(name, paper_millions):
    """UCF-101 setting: 101 classes, 8 latent channels with self-conditioning, 5 x 16 x 16 latents."""
    with torch.device("meta"):
        model = WALT.from_preset(name, num_classes=101, self_conditioning=True, adaln_rank=2)
    counted = sum(p.numel() for p in model.parameters())
    preset = presets[name]
    expected = count_by_formula(
        preset["depth"], preset["hidden_size"], 16, 8, num_classes=101, rank=2, grid=(5, 16, 16)
    )
    print(f"{name}: {counted / 1e6:.1f}M parameters (paper: {paper_millions}M)")
    assert counted == expected
    assert abs(counted / 1e6 - paper_millions) / paper_millions < 0.005
