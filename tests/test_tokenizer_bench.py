"""benchmarks/tokenizer.py's scoring: the per-clip values it pools agree with walt.metrics on the whole set."""

import importlib
import sys
from pathlib import Path

import pytest
import torch

from walt.metrics import grid_phase, grid_profile, pooled_grid_ratio, psnr, seam_ratio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = importlib.import_module("tokenizer")


def test_summary_pools_the_grid_over_clips_like_the_metric():
    """Three clips, one drawn with 8-pixel blocks: the summary's grid ratio and phase are those of the pooled
    profile (walt.metrics.pooled_grid_ratio, the outermost cell left out), and its PSNR is the clips' mean."""
    g = torch.Generator().manual_seed(0)
    original = torch.rand(3, 3, 2, 32, 32, generator=g) * 2 - 1  # (3, 3, 2, 32, 32)
    cells = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1  # (T, C, 4, 4)
    blocks = torch.nn.functional.interpolate(cells, scale_factor=8).transpose(0, 1)  # (3, 2, 32, 32)
    rec = original.clone()
    rec[0] = 0.5 * rec[0] + 0.5 * blocks  # clip 0 gains a grid
    row = bench.summarize(bench.score_clips(original, rec, None, None))
    assert row["grid_ratio"] == pytest.approx(pooled_grid_ratio(rec, margin=8).item(), rel=1e-5)
    assert row["grid_phase"] == grid_phase(grid_profile(rec, margin=8).mean(0)).item()
    assert row["seam_ratio"] == pytest.approx(
        seam_ratio(grid_profile(rec, margin=8).mean(0)).item(), rel=1e-5
    )
    assert row["grid_ratio_original"] == pytest.approx(pooled_grid_ratio(original, margin=8).item(), rel=1e-5)
    assert row["psnr"] == pytest.approx(psnr(rec, original).mean().item(), rel=1e-5)
    assert row["grid_ratio"] > row["grid_ratio_original"]


def test_the_cogvideox_peer_speaks_walts_codec_interface_and_round_trips_shapes():
    """The speed benchmark's peer: diffusers' CogVideoX VAE (tiny configuration) encodes a 1 + 4k clip to the same
    latent grid as walt (4x time, 8x space) and decodes back to the clip's shape; the speedups come from the rows
    of one run, walt's frames per second over the peer's."""
    pytest.importorskip("diffusers")
    peer = bench.CogVideoXCodec(smoke=True)
    x = torch.rand(1, 3, 9, 32, 32) * 2 - 1
    with torch.no_grad():
        z = peer.encode(x)
        assert z.shape == (1, 4, 3, 4, 4)
        assert peer.decode(z).shape == x.shape
    rows = [
        {"model": "walt", "input": "1x9x32x32", "encode_frames_per_s": 30.0, "decode_frames_per_s": 12.0},
        {"model": "cogvideox", "input": "1x9x32x32", "encode_frames_per_s": 20.0, "decode_frames_per_s": 4.0},
    ]
    (ratio,) = bench.speed_ratios(rows, "walt", "cogvideox")
    assert ratio["encode_speedup"] == 1.5 and ratio["decode_speedup"] == 3.0


def test_channels_last_puts_every_5d_weight_of_both_parts_in_ndhwc_and_keeps_the_output():
    """The speed benchmark's --channels-last: the same model computes the same reconstruction with its 3D
    convolution weights (and the input) in NDHWC order."""
    from walt.tokenizer import CausalVAE, presets

    torch.manual_seed(0)
    vae = CausalVAE(**presets["tiny"]).eval()
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        before = vae.decode(vae.encode(x))
        bench.prepare(vae, channels_last=True, compile=False)
        weights = [p for p in vae.parameters() if p.dim() == 5]
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in weights)
        after = vae.decode(vae.encode(x.contiguous(memory_format=torch.channels_last_3d)))
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)
