"""Shared primitives of walt.nn against independent references and exact properties."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from walt.nn import (
    AdaLNLoRA,
    Attention,
    LabelEmbedding,
    PatchEmbed3D,
    PatchUnembed3D,
    SpatioTemporalPositionEmbedding,
    fit_window,
    pad_to_windows,
    sinusoidal_features,
    window_attention_mask,
    window_merge,
    window_partition,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("window", [(1, 6, 8), (2, 3, 4), (4, 1, 1), (4, 6, 8), (1, 1, 1)])
def test_partition_merge_round_trip_is_exact(window):
    x = torch.randn(2, 4, 6, 8, 5)
    windows = window_partition(x, window)
    n = (4 // window[0]) * (6 // window[1]) * (8 // window[2])
    assert windows.shape == (2 * n, math.prod(window), 5)
    assert torch.equal(window_merge(windows, window, (4, 6, 8)), x)


def test_partition_yields_the_grid_blocks_in_raster_order():
    B, T, H, W, D = 2, 4, 6, 8, 3
    x = torch.randn(B, T, H, W, D)
    wt, wh, ww = 2, 3, 4
    windows = window_partition(x, (wt, wh, ww))
    k = 0
    for b in range(B):
        for t in range(0, T, wt):
            for h in range(0, H, wh):
                for w in range(0, W, ww):
                    expected = x[b, t : t + wt, h : h + wh, w : w + ww].reshape(-1, D)
                    assert torch.equal(windows[k], expected)
                    k += 1


def test_partition_rejects_non_divisible_grid():
    with pytest.raises(ValueError, match="pad_to_windows"):
        window_partition(torch.zeros(1, 5, 8, 8, 2), (2, 4, 4))


@pytest.mark.parametrize(
    ("grid", "window", "fitted"),
    [
        ((5, 16, 16), (5, 8, 8), (5, 8, 8)),  # divisible: as requested
        ((16, 16, 16), (5, 8, 8), (4, 8, 8)),  # 16 frames: 4 windows of 4, no padding
        ((17, 16, 16), (5, 8, 8), (5, 8, 8)),  # 17 frames: 4 windows of 5, 3 padded
        ((1, 16, 16), (5, 8, 8), (1, 8, 8)),  # an image: the window shrinks to one frame
        ((7, 12, 4), (5, 8, 8), (4, 6, 4)),  # 2 windows of 4 (1 padded), 2 of 6, 1 of 4
        ((3, 16, 16), (1, -1, -1), (1, 16, 16)),  # -1: the whole axis
    ],
)
def test_fit_window(grid, window, fitted):
    assert fit_window(grid, window) == fitted


def test_fit_window_rejects_invalid_size():
    with pytest.raises(ValueError, match="positive or -1"):
        fit_window((4, 4, 4), (0, 2, 2))


def test_no_mask_on_the_common_path():
    assert window_attention_mask((5, 16, 16), (5, 8, 8), batch_size=2) is None
    # packed images need no mask in spatial windows: those never mix frames
    assert window_attention_mask((5, 16, 16), (1, 16, 16), 2, is_image=torch.tensor([True, False])) is None


def test_padding_mask_marks_exactly_the_real_tokens():
    grid, window = (3, 4, 5), (2, 4, 3)
    mask = window_attention_mask(grid, window, batch_size=2)
    real = pad_to_windows(torch.ones(2, *grid, 1), window)  # 1 on real tokens, 0 on padding
    expected = window_partition(real, window)[..., 0].bool()  # (B * nw, N)
    assert mask.shape == (expected.shape[0], 1, 1, expected.shape[1])
    assert torch.equal(mask[:, 0, 0], expected)


def test_image_mask_keeps_frames_apart_and_videos_whole():
    window = (2, 2, 2)
    mask = window_attention_mask((2, 2, 2), window, batch_size=2, is_image=torch.tensor([False, True]))
    frame = torch.arange(8) // 4
    assert mask.shape == (2, 1, 8, 8)
    assert mask[0, 0].all()
    assert torch.equal(mask[1, 0], frame[:, None] == frame[None, :])


# ---------------------------------------------------------------- attention


def reference_attention(attn: Attention, x, keys_from, key_mask=None):
    """Softmax attention written out: queries from x, keys/values from keys_from, LayerNorm on q and k."""
    h, d = attn.num_heads, attn.head_dim
    W, b = attn.qkv.weight, attn.qkv.bias
    D = x.shape[-1]
    q = (x @ W[:D].T + b[:D]).unflatten(-1, (h, d))  # (N, h, d)
    k = (keys_from @ W[D : 2 * D].T + b[D : 2 * D]).unflatten(-1, (h, d))  # (M, h, d)
    v = (keys_from @ W[2 * D :].T + b[2 * D :]).unflatten(-1, (h, d))  # (M, h, d)
    q = F.layer_norm(q, (d,), attn.q_norm.weight, attn.q_norm.bias, attn.q_norm.eps)
    k = F.layer_norm(k, (d,), attn.k_norm.weight, attn.k_norm.bias, attn.k_norm.eps)
    logits = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(d)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    out = torch.einsum("hnm,mhd->nhd", logits.softmax(-1), v).reshape(x.shape[0], D)
    return attn.proj(out)


def randomized_attention(dim=16, heads=4):
    attn = Attention(dim, heads)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    return attn


def test_self_attention_matches_reference():
    attn = randomized_attention()
    x = torch.randn(3, 7, 16)
    out = attn(x)
    for i in range(3):
        torch.testing.assert_close(out[i], reference_attention(attn, x[i], x[i]), atol=1e-5, rtol=1e-5)


def test_masked_self_attention_matches_reference():
    attn = randomized_attention()
    x = torch.randn(2, 6, 16)
    mask = torch.rand(2, 1, 6, 6) > 0.5
    mask |= torch.eye(6, dtype=torch.bool)  # every row keeps one key
    out = attn(x, mask)
    for i in range(2):
        expected = reference_attention(attn, x[i], x[i], mask[i, 0])
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_concat_reference_per_window():
    """Keys/values = concat[window tokens, real text tokens of the window's sample]."""
    attn = randomized_attention()
    samples, windows_per_sample, n, L = 2, 3, 5, 4
    x = torch.randn(samples * windows_per_sample, n, 16)
    text = torch.randn(samples, L, 16)
    text_mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = attn(x, context=text, context_mask=text_mask)
    for i in range(x.shape[0]):
        s = i // windows_per_sample
        keys = torch.cat([x[i], text[s][text_mask[s]]])
        torch.testing.assert_close(out[i], reference_attention(attn, x[i], keys), atol=1e-5, rtol=1e-5)


def test_cross_attention_combines_window_and_text_masks():
    attn = randomized_attention()
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[:, ..., 3:] = False  # two padded window positions
    text = torch.randn(1, 3, 16)
    text_mask = torch.tensor([[True, False, True]])
    out = attn(x, mask, text, text_mask)
    for i in range(2):
        keys = torch.cat([x[i, :3], text[0][text_mask[0]]])
        torch.testing.assert_close(out[i], reference_attention(attn, x[i], keys), atol=1e-5, rtol=1e-5)


def test_attention_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        Attention(10, 3)
    with pytest.raises(ValueError, match="must divide"):
        Attention(8, 2)(torch.randn(3, 4, 8), context=torch.randn(2, 1, 8))


# ---------------------------------------------------------------- modulation and embeddings


def test_adaln_lora_update_is_zero_at_init_and_rank_limited():
    dim, rank = 12, 2
    lora = AdaLNLoRA(dim, rank).double()
    shared = torch.randn(40, 6 * dim, dtype=torch.float64)
    c = torch.randn(40, dim, dtype=torch.float64)
    torch.nn.init.zeros_(lora.up.weight)
    assert all(torch.equal(a, b) for a, b in zip(lora(shared, c), shared.chunk(6, -1)))
    torch.nn.init.normal_(lora.up.weight)
    update = torch.cat(lora(shared, c), dim=-1) - shared  # (40, 6D) over 40 different conditionings
    assert torch.linalg.matrix_rank(update).item() == rank
    assert sum(p.numel() for p in lora.parameters()) == 7 * rank * dim


def test_sinusoidal_features_golden_values():
    x = torch.tensor([0.0, 1.0, 250.0])
    out = sinusoidal_features(x, 8, max_period=10_000.0).numpy()
    freqs = 10_000.0 ** (-np.arange(4) / 4)  # 1, 0.1, 0.01, 0.001
    expected = np.concatenate([np.cos(x.numpy()[:, None] * freqs), np.sin(x.numpy()[:, None] * freqs)], 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_null_label_is_its_own_learned_row():
    embed = LabelEmbedding(num_classes=5, dim=4)
    out = embed(torch.tensor([-1, 0, 4]))
    assert torch.equal(out[0], embed.table.weight[5])
    assert torch.equal(out[1:], embed.table.weight[[0, 4]])


@pytest.mark.parametrize("p", [1, 2])
def test_patch_embed_layout_and_exact_unembed(p):
    C, D = 3, 3 * p * p
    embed, unembed = PatchEmbed3D(C, D, p), PatchUnembed3D(D, C, p)
    with torch.no_grad():  # identity projections expose the raw patch layout
        for layer in (embed.proj, unembed.proj):
            layer.weight.copy_(torch.eye(D))
            layer.bias.zero_()
    x = torch.randn(2, C, 3, 4, 6)
    tokens = embed(x)
    assert tokens.shape == (2, 3, 4 // p, 6 // p, D)
    patch = x[1, :, 2, p : 2 * p, 2 * p : 3 * p]  # (C, p, p) patch at token (t=2, i=1, j=2)
    assert torch.equal(tokens[1, 2, 1, 2], patch.permute(1, 2, 0).reshape(-1))
    assert torch.equal(unembed(tokens), x)


def test_patch_embed_rejects_bad_input():
    embed = PatchEmbed3D(4, 8, patch_size=2)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        embed(torch.zeros(1, 4, 1, 5, 4))
    with pytest.raises(ValueError, match="4 input channels"):
        embed(torch.zeros(1, 3, 1, 4, 4))


def position_embedding(dim=4, grid=(3, 4, 4)):
    pos = SpatioTemporalPositionEmbedding(dim, grid)
    with torch.no_grad():
        pos.spatial.normal_()
        pos.temporal.normal_()
    return pos


def test_position_embedding_at_training_size_adds_the_tables():
    pos = position_embedding()
    out = pos(torch.zeros(2, 3, 4, 4, 4))
    expected = pos.spatial[None, None] + pos.temporal[None, :, None, None]
    assert torch.equal(out, expected.expand_as(out))


def test_position_embedding_shorter_clips_and_images_keep_frame_rows():
    pos = position_embedding()
    out = pos(torch.zeros(1, 2, 4, 4, 4))  # 2 of 3 frames: rows 0 and 1, not a resampled table
    assert torch.equal(out[0, :, 0, 0], pos.spatial[0, 0] + pos.temporal[:2])
    packed = pos(torch.zeros(2, 3, 4, 4, 4), is_image=torch.tensor([False, True]))
    assert torch.equal(packed[1], (pos.spatial + pos.temporal[0]).expand(3, 4, 4, 4))
    assert torch.equal(packed[0], pos(torch.zeros(1, 3, 4, 4, 4))[0])


def test_position_embedding_interpolates_to_new_sizes():
    pos = SpatioTemporalPositionEmbedding(2, (3, 4, 4))
    with torch.no_grad():
        pos.spatial.fill_(0.5)
        pos.temporal.copy_(torch.tensor([[0.0, 0.0], [1.0, 2.0], [2.0, 4.0]]))
    out = pos(torch.zeros(1, 5, 8, 6, 2))
    torch.testing.assert_close(
        out[0, :, 3, 2, :] - 0.5, torch.tensor([[0.0, 0.0], [0.5, 1.0], [1.0, 2.0], [1.5, 3.0], [2.0, 4.0]])
    )
    torch.testing.assert_close(out[0, 0] - out[0, 0, 0, 0], torch.zeros(8, 6, 2))  # constant stays constant
