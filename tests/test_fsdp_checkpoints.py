"""walt.lightning.WaltFSDPStrategy: what FSDP reads and writes goes through walt's checks.

Real FSDP needs a process group (tests/test_distributed.py runs it on 2 processes); here the strategy's own
reading and writing are called directly in one CPU process, on a plain module: Lightning's code for a module
that is not FSDP-wrapped loads it as FSDP loads a wrapped one, and ``torch.distributed.checkpoint`` reads and
writes a sharded folder without a process group.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn

from tests.test_pipeline import Payload
from walt.atomic import staging_name
from walt.checkpoint import INTEGRITY_KEY, CheckpointError, weights_sha256
from walt.cli import _checked_fsdp
from walt.lightning import AtomicCheckpointIO, WaltFSDPStrategy
from walt.lightning.checkpoint import atomic_torch_save
from walt.lightning.strategies import MANIFEST, _SafeReader


class Net(L.LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.layer = torch.nn.Linear(64, 64)
        self.register_buffer("count", torch.tensor(5))


def strategy(model: Net, state_dict_type: str = "full") -> WaltFSDPStrategy:
    """A one-process strategy holding ``model`` as it holds the wrapped module after setup, resuming a fit."""
    strategy = WaltFSDPStrategy(parallel_devices=[torch.device("cpu")], state_dict_type=state_dict_type)
    strategy.model = model
    strategy._lightning_module = model
    model._trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING))
    return strategy


def full_checkpoint(path: Path, model: Net) -> dict:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    checkpoint = {"state_dict": state, "epoch": 3, INTEGRITY_KEY: {"weights_sha256": weights_sha256(state)}}
    atomic_torch_save(checkpoint, path)
    return checkpoint


def flip_one_bit(path: Path, tensor: torch.Tensor) -> None:
    """Flips one bit inside ``tensor``'s bytes in ``path`` (found by its bytes: checkpoints hold tensors raw)."""
    raw = bytearray(path.read_bytes())
    at = raw.find(tensor.contiguous().numpy().tobytes())
    assert at >= 0
    raw[at + tensor.numel() * tensor.element_size() // 2 + 1] ^= 0x10
    path.write_bytes(bytes(raw))


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def no_weights_only_default(monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: a loader that leaves weights_only unset unpickles anything."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")


# ---- full checkpoints (one file) ------------------------------------------------------------------------------


def test_a_full_checkpoint_is_read_with_its_weights_checked(tmp_path):
    path = tmp_path / "last.ckpt"
    written = full_checkpoint(path, Net(seed=1))
    model = Net(seed=2)
    checkpoint = strategy(model).load_checkpoint(path)
    assert same_weights(model, Net(seed=1)) and checkpoint["epoch"] == 3 and "state_dict" not in checkpoint
    assert checkpoint[INTEGRITY_KEY] == written[INTEGRITY_KEY]


def test_a_flipped_bit_in_a_full_checkpoint_is_refused_before_anything_is_loaded(tmp_path):
    path = tmp_path / "last.ckpt"
    full_checkpoint(path, Net(seed=1))
    flip_one_bit(path, Net(seed=1).layer.weight.detach())
    model = Net(seed=2)
    message = re.escape(f"{path} is corrupt: its weights do not match the hash written with them")
    with pytest.raises(CheckpointError, match=message):
        strategy(model).load_checkpoint(path)
    assert same_weights(model, Net(seed=2))


def test_lightnings_fsdp_runs_a_checkpoints_code_and_walts_refuses_it(tmp_path, no_weights_only_default):
    """The cause: Lightning's FSDPStrategy reads a checkpoint file with its lazy loader, a plain
    pickle.Unpickler, whatever weights_only says."""
    marker, path = tmp_path / "payload_ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": Net().state_dict(), "payload": Payload(marker)}, path)
    lightning_fsdp = FSDPStrategy(parallel_devices=[torch.device("cpu")])
    lightning_fsdp.model = lightning_fsdp._lightning_module = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lightning_fsdp.load_checkpoint(path, weights_only=True)  # loads, weights_only=True notwithstanding
    assert marker.exists()

    marker.unlink()
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is not a readable walt checkpoint")):
        strategy(Net()).load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage that starts like a pickle", "truncated"])
def test_a_file_that_is_not_a_checkpoint_is_refused_by_name(tmp_path, content):
    path = tmp_path / "last.ckpt"
    if content == "truncated":
        full_checkpoint(path, Net())
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        strategy(Net()).load_checkpoint(path)


def test_weights_only_false_and_a_refusal_on_another_rank_stop_the_load(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    full_checkpoint(path, Net(seed=1))
    with pytest.raises(ValueError, match="load with weights_only=True"):
        strategy(Net()).load_checkpoint(path, weights_only=False)
    refused_elsewhere = strategy(Net())
    monkeypatch.setattr(refused_elsewhere, "reduce_boolean_decision", lambda decision, all=True: False)
    with pytest.raises(CheckpointError, match="refused on another rank"):
        refused_elsewhere.load_checkpoint(path)


def test_a_full_checkpoint_is_written_atomically(tmp_path):
    """Rank 0 writes through the strategy's writer, walt's atomic one unless another was configured: a failed
    write leaves the previous checkpoint whole."""
    walt_fsdp = strategy(Net())
    assert type(walt_fsdp.checkpoint_io) is AtomicCheckpointIO
    path = tmp_path / "last.ckpt"
    walt_fsdp.save_checkpoint({"state_dict": Net(seed=1).state_dict()}, path)
    before = path.read_bytes()

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        walt_fsdp.save_checkpoint({"state_dict": Net(seed=2).state_dict(), "bad": Unpicklable()}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]


def test_lightnings_spelling_becomes_walts_strategy_in_walt_fit():
    """`walt fit` with `class_path: lightning.pytorch.strategies.FSDPStrategy` (or `strategy: fsdp`) gets the
    checks: the strategy is made walt's, its settings kept; `strategy: walt_fsdp` names it directly."""
    lightning_fsdp = FSDPStrategy(sharding_strategy="SHARD_GRAD_OP", state_dict_type="full")
    trainer = SimpleNamespace(strategy=lightning_fsdp)
    _checked_fsdp(trainer)
    assert type(trainer.strategy) is WaltFSDPStrategy and trainer.strategy is lightning_fsdp
    assert (
        trainer.strategy._state_dict_type == "full"
        and trainer.strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    )
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    assert StrategyRegistry["walt_fsdp"]["strategy"] is WaltFSDPStrategy


# ---- sharded checkpoints (a folder) ---------------------------------------------------------------------------


def sharded_checkpoint(path: Path, model: Net) -> None:
    checkpoint = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}, "epoch": 4}
    strategy(Net(), "sharded").save_checkpoint(checkpoint, path)


def test_a_sharded_checkpoint_is_written_whole_with_its_files_hashed_and_read_back(tmp_path):
    path = tmp_path / "last.ckpt"
    sharded_checkpoint(path, Net(seed=1))
    assert sorted(os.listdir(path)) == sorted([".metadata", "__0_0.distcp", "meta.pt", MANIFEST])
    assert os.listdir(tmp_path) == ["last.ckpt"]  # nothing staged left behind
    model = Net(seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checkpoint = strategy(model, "sharded").load_checkpoint(path)
    assert not [w for w in caught if MANIFEST in str(w.message)]  # the warning of a folder without a record
    assert same_weights(model, Net(seed=1)) and checkpoint["epoch"] == 4

    orphan = staging_name(path)  # a save killed midway left its folder
    orphan.mkdir()
    (orphan / "__0_0.distcp").write_bytes(b"half")
    sharded_checkpoint(path, Net(seed=3))  # replaces the folder: the old one or the new one, never a mix
    assert os.listdir(tmp_path) == ["last.ckpt"]
    strategy(model, "sharded").load_checkpoint(path)
    assert same_weights(model, Net(seed=3))


def test_a_failed_sharded_save_leaves_the_previous_folder_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    sharded_checkpoint(path, Net(seed=1))
    before = {name: (path / name).read_bytes() for name in os.listdir(path)}

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):  # meta.pt, written after the shards
        strategy(Net(), "sharded").save_checkpoint(
            {"state_dict": Net(seed=2).state_dict(), "x": Unpicklable()}, path
        )
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == before
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_a_flipped_bit_in_a_shard_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "last.ckpt"
    sharded_checkpoint(path, Net(seed=1))
    flip_one_bit(path / "__0_0.distcp", Net(seed=1).layer.weight.detach())
    model = Net(seed=2)
    with pytest.raises(CheckpointError, match=re.escape(f"{path / '__0_0.distcp'} is corrupt")):
        strategy(model, "sharded").load_checkpoint(path)
    assert same_weights(model, Net(seed=2))
    (path / "meta.pt").unlink()  # no longer a sharded checkpoint: a folder that is not a checkpoint
    with pytest.raises(CheckpointError, match=r"a folder without meta\.pt"):
        strategy(model, "sharded").load_checkpoint(path)


def test_a_sharded_folder_without_a_record_is_read_with_a_warning_and_nan_weights_refused(tmp_path):
    """Lightning's FSDPStrategy writes no record of the files: read with a warning, its shards still checked for
    NaN and infinite values once loaded."""
    path = tmp_path / "last.ckpt"
    nan = Net(seed=1)
    with torch.no_grad():
        nan.layer.weight[3, 4] = float("nan")
    sharded_checkpoint(path, nan)
    (path / MANIFEST).unlink()
    with (
        pytest.warns(UserWarning, match=f"carries no {MANIFEST}"),
        pytest.raises(
            CheckpointError, match=r"1 of its weight tensors hold NaN or infinite values \(layer.weight"
        ),
    ):
        strategy(Net(), "sharded").load_checkpoint(path)


def test_a_forged_sharded_index_runs_no_code(tmp_path, no_weights_only_default):
    """torch.distributed.checkpoint unpickles a folder's .metadata without restriction (Lightning's strategy runs
    the payload); walt's reader accepts only the index's own record types."""
    path, marker = tmp_path / "last.ckpt", tmp_path / "payload_ran"
    sharded_checkpoint(path, Net(seed=1))
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    (path / MANIFEST).unlink()  # a forger rewrites the record too: the unpickler must refuse by itself

    lightning_fsdp = FSDPStrategy(parallel_devices=[torch.device("cpu")], state_dict_type="sharded")
    lightning_fsdp.model = lightning_fsdp._lightning_module = Net()
    with warnings.catch_warnings(), pytest.raises(BaseException):  # noqa: B017  (fails after the payload ran)
        warnings.simplefilter("ignore")
        lightning_fsdp.load_checkpoint(path)
    assert marker.exists()

    marker.unlink()
    with (
        warnings.catch_warnings(),
        pytest.raises(
            CheckpointError, match=re.escape(f"{path / '.metadata'} is not a readable checkpoint index")
        ),
    ):
        warnings.simplefilter("ignore")  # the missing record
        strategy(Net(), "sharded").load_checkpoint(path)
    assert not marker.exists()


def test_a_sharded_entry_holding_code_is_refused_unread(tmp_path):
    """A non-tensor entry (an optimizer's settings, say) is stored as a pickle that torch's load planner
    unpickles without restriction; walt's reader lets it through only after a weights-only unpickling of the
    same bytes."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "payload_ran"
    dcp.save({"w": torch.ones(3), "name": "adamw", "evil": Payload(marker)}, checkpoint_id=tmp_path / "c")
    state = {"w": torch.zeros(3), "name": None}
    dcp.load(state, storage_reader=_SafeReader(tmp_path / "c"))
    assert torch.equal(state["w"], torch.ones(3)) and state["name"] == "adamw"
    # torch.distributed.checkpoint gathers every rank's failure into a CheckpointException (a BaseException);
    # WaltFSDPStrategy raises the CheckpointError inside it.
    with pytest.raises(BaseException, match="the entry evil is refused unread"):
        dcp.load({"evil": None}, storage_reader=_SafeReader(tmp_path / "c"))
    assert not marker.exists()


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_folder_replaces_a_folder_or_a_file_whole(tmp_path, monkeypatch, exchange):
    """walt.atomic.replace_folder: in one step where Linux's renameat2 can swap the two, else by two renames."""
    import walt.atomic

    if not exchange:
        monkeypatch.setattr(walt.atomic, "_exchange", lambda a, b: False)
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"a full checkpoint")  # a sharded save over a full one
    for content in (b"first", b"second"):
        staged = staging_name(path)
        staged.mkdir()
        (staged / "meta.pt").write_bytes(content)
        walt.atomic.replace_folder(staged, path)
        assert (path / "meta.pt").read_bytes() == content and os.listdir(tmp_path) == ["last.ckpt"]
