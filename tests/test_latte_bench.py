"""benchmarks/latte.py, the Latte-XL/2 anchor of the training-step benchmark: its size, and that its spatial and
temporal blocks mix exactly the tokens they should, with the token order restored between them."""

import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
latte = importlib.import_module("latte")


def tiny(**kwargs):
    torch.manual_seed(0)
    return latte.LatteXL2(frames=4, size=8, dim=32, depth=2, heads=2, num_classes=3, **kwargs).eval()


def silence(block) -> None:
    """adaLN-Zero's starting point: every gate zero, so the block passes its input through."""
    torch.nn.init.zeros_(block.adaln[1].weight)
    torch.nn.init.zeros_(block.adaln[1].bias)


def response(model, frame: int, row: int, col: int) -> torch.Tensor:
    """Which output pixels (T, H, W) change when one input pixel of one frame does."""
    x = torch.randn(1, 4, 4, 8, 8)
    t, y = torch.tensor([0.3]), torch.tensor([1])
    moved = x.clone()
    moved[0, :, frame, row, col] += 1.0
    with torch.no_grad():
        return (model(moved, t, y) - model(x, t, y)).abs().amax(dim=(0, 1)) > 0  # (T, H, W)


def test_the_xl_configuration_has_latte_xls_size():
    with torch.device("meta"):
        model = latte.LatteXL2()
    assert (
        round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 673.8
    )  # 28 DiT-XL blocks at width 1152, as Latte-XL


def test_spatial_blocks_mix_one_frame_temporal_blocks_one_position_and_the_order_is_restored():
    model = tiny()
    for block in model.blocks:
        silence(block)
    changed = response(model, frame=2, row=5, col=3)  # identity blocks: only that pixel's 2x2 patch
    expected = torch.zeros(4, 8, 8, dtype=torch.bool)
    expected[2, 4:6, 2:4] = True
    assert torch.equal(changed, expected)

    spatial = tiny()
    silence(spatial.blocks[1])
    changed = response(spatial, frame=2, row=5, col=3)  # the whole frame, no other frame
    assert changed[2].all() and not changed[[0, 1, 3]].any()

    temporal = tiny()
    silence(temporal.blocks[0])
    changed = response(temporal, frame=2, row=5, col=3)  # the patch's position in every frame, nothing else
    expected = torch.zeros(4, 8, 8, dtype=torch.bool)
    expected[:, 4:6, 2:4] = True
    assert torch.equal(changed, expected)
