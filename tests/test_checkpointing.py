"""Runs that survive a kill: periodic checkpoints, atomic writes, and mid-epoch resumes that continue exactly.

The fast tests train in-process; the kill tests run `walt fit` in a subprocess and kill it with SIGKILL, at a
step or during a checkpoint write, then resume it with ``walt fit ... --ckpt_path .../last.ckpt`` (WaltCLI in
this process, which saves a second start-up of ~12 s).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import cpu_sized_config, write_tiny_latents
from tests.test_base_module import module, trainer
from walt.checkpoint import CheckpointError, read_checkpoint
from walt.cli import WaltCLI
from walt.cli import main as walt_main
from walt.data import (
    UCF101,
    EpochShuffleSampler,
    ResumableDataLoader,
    SyntheticVideos,
    VideoDataModule,
    collate_items,
)
from walt.lightning import AtomicCheckpointIO, PeriodicCheckpoint
from walt.lightning.checkpoint import atomic_torch_save, parse_interval
from walt.lightning.tokenizer import TokenizerModule
from walt.tokenizer import CausalVAE, presets
from walt.tokenizer.losses import TokenizerLoss

ROOT = Path(__file__).resolve().parents[1]


# ---- atomic writes ------------------------------------------------------------------------------------------------


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle this")


def test_a_failed_write_leaves_the_old_checkpoint_whole_and_no_temporary_file(tmp_path, monkeypatch):
    """The write goes to a temporary file beside the destination (nothing in $TMPDIR, which may be another
    filesystem) and replaces the destination only when complete."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read $TMPDIR
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="cannot pickle"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1000), "bad": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"] and not any(tmpdir.iterdir())
    umask = os.umask(0)
    os.umask(umask)
    assert (
        stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    )  # as any file the user writes, not mkstemp's 0600


def test_the_next_save_removes_a_killed_writers_temporary_file(tmp_path):
    orphan = tmp_path / ".last.ckpt.0badc0de.tmp"  # the name a write of last.ckpt uses
    orphan.write_bytes(b"half a checkpoint")
    other = tmp_path / ".epoch=0-step=5.ckpt.0badc0de.tmp"  # another file's: left to that file's next save
    other.write_bytes(b"x")
    atomic_torch_save({"step": torch.tensor(7)}, tmp_path / "last.ckpt")
    assert not orphan.exists() and other.exists()
    assert int(torch.load(tmp_path / "last.ckpt", weights_only=True)["step"]) == 7


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"is an empty file \(0 bytes\), not a checkpoint"),
        (
            bytes(range(256)) * 20,
            "is not a checkpoint: its 5120 bytes are neither a PyTorch archive nor a pickle",
        ),
        ("half", "is not a checkpoint: its .* bytes are neither a PyTorch archive nor a pickle"),
    ],
    ids=["empty", "random-bytes", "truncated"],
)
def test_a_file_that_is_not_a_checkpoint_is_named_with_what_is_wrong(
    tmp_path, monkeypatch, capsys, content, message
):
    """torch.load says a bare EOFError for an empty file and "unsafe pickle" for random bytes; the reader and
    `walt fit --ckpt_path` name the file and the problem, in one line, before anything is built."""
    path = tmp_path / "last.ckpt"
    if content == "half":
        atomic_torch_save({"state_dict": {"w": torch.ones(1000)}}, path)
        content = path.read_bytes()[: path.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{path}.*{message}"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        AtomicCheckpointIO().load_checkpoint(path)
    write_tiny_latents(tmp_path)
    config = cpu_sized_config(_quickstart(tmp_path), tmp_path, "base.yaml")
    monkeypatch.setattr(sys, "argv", ["walt"])
    with pytest.raises(SystemExit) as exit_info:
        walt_main(["fit", "--config", str(config), "--ckpt_path", str(path)])
    assert exit_info.value.code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert re.match(f"walt fit: {path}.*{message}", line) and not (tmp_path / "run").exists()


def test_a_resumed_run_logs_on_in_its_own_version_folder_without_the_eval_mode_warning(tmp_path, monkeypatch):
    """Each resume used to start lightning_logs/version_N+1; it continues the checkpoint's version. And the
    frozen tokenizer and EMA copy, in eval mode on purpose, no longer raise Lightning's "Found N module(s) in
    eval mode" at every fit."""
    write_tiny_latents(tmp_path)
    config = _quickstart(tmp_path, max_steps=2, log_every_n_steps=1)
    config["trainer"]["logger"] = True  # Lightning's default TensorBoard logger
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _cli(monkeypatch, tmp_path, config, run=True)
        last = tmp_path / "run/checkpoints/last.ckpt"
        _cli(
            monkeypatch,
            tmp_path,
            {**config, "trainer": {**config["trainer"], "max_steps": 4}},
            "--ckpt_path",
            str(last),
            run=True,
        )
    assert not [w for w in caught if "in eval mode" in str(w.message)]
    logs = tmp_path / "run/lightning_logs"
    assert [p.name for p in logs.iterdir()] == ["version_0"]
    steps = sorted(
        event.step
        for events in (logs / "version_0").glob("events.out.tfevents.*")
        for event in EventAccumulator(str(events)).Reload().Scalars("train/loss")
    )
    assert steps == [0, 1, 2, 3]  # logged as global_step - 1: both runs' steps, in one folder
    assert read_checkpoint(last)["walt_log_versions"] == [0]


# ---- when checkpoints are written ---------------------------------------------------------------------------------


class _SavedSteps(Callback):
    """The step held by last.ckpt as each batch starts, i.e. after the previous step's checkpoint (if any)."""

    def __init__(self, path: Path) -> None:
        self.path, self.steps = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append(read_checkpoint(self.path)["global_step"] if self.path.exists() else None)


def _data(num_samples: int = 12, batch_size: int = 3, mixed: bool = False, **kwargs) -> VideoDataModule:
    def videos(n: int, frames: int = 5) -> SyntheticVideos:
        return SyntheticVideos(
            num_samples=n,
            num_frames=frames,
            resolution=16,
            colors=["red"],
            motions=["left", "right"],
            shapes=["circle", "square"],
        )

    images = dict(image_dataset=videos(10, frames=1), image_ratio=0.25, image_batch_size=4) if mixed else {}
    return VideoDataModule(videos(num_samples), batch_size=batch_size, num_workers=0, **images, **kwargs)


def test_steps_keep_numbered_checkpoints_and_the_end_is_always_saved(tmp_path):
    periodic = PeriodicCheckpoint(
        tmp_path / "ckpt", every_n_train_steps=3, train_time_interval=None, save_top_k=-1
    )
    seen = _SavedSteps(tmp_path / "ckpt/last.ckpt")
    trainer(tmp_path, max_steps=7, callbacks=[periodic, seen]).fit(module(ema_decay=None), _data())
    assert seen.steps == [None, None, None, 3, 3, 3, 6]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "epoch=0-step=3.ckpt", "epoch=1-step=6.ckpt", "last.ckpt",
    ]  # fmt: skip
    assert (
        read_checkpoint(tmp_path / "ckpt/last.ckpt")["global_step"] == 7
    )  # max_steps ended it between saves


def test_time_rewrites_last_ckpt_only(tmp_path):
    periodic = PeriodicCheckpoint(
        tmp_path / "ckpt", every_n_train_steps=None, train_time_interval=timedelta(0), save_top_k=-1
    )
    seen = _SavedSteps(tmp_path / "ckpt/last.ckpt")
    trainer(tmp_path, max_steps=4, callbacks=[periodic, seen]).fit(module(ema_decay=None), _data())
    assert seen.steps == [None, 1, 2, 3]  # an interval of 0 is due at every step
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.ckpt"]


def test_steps_that_jump_past_a_multiple_still_save():
    """The tokenizer's GAN phase advances the step by 2 per batch: with N odd, step % N == 0 would skip half."""
    periodic = PeriodicCheckpoint(every_n_train_steps=3, train_time_interval=None)
    assert [periodic._steps_due(step) for step in (2, 4, 6, 8, 10)] == [False, True, True, False, True]


def test_bad_checkpoint_settings_fail_with_a_clear_message():
    assert parse_interval("00:01:30:00") == timedelta(hours=1, minutes=30)
    with pytest.raises(ValueError, match=r"days:hours:minutes:seconds.*'00:00:10:00'"):
        PeriodicCheckpoint(train_time_interval="0:10:00")
    with pytest.raises(ValueError, match="is zero"):
        PeriodicCheckpoint(train_time_interval="00:00:00:00")
    with pytest.raises(ValueError, match="every_n_train_steps=-5: give a positive step count"):
        PeriodicCheckpoint(every_n_train_steps=-5)


# ---- what walt fit installs ---------------------------------------------------------------------------------------


def _quickstart(folder: Path, **trainer_args) -> dict:
    config = yaml.safe_load((ROOT / "configs/base/quickstart.yaml").read_text())
    config.pop("checkpoint", None)  # walt fit's default applies
    config["model"]["init_args"].update(sample_steps=2, num_log_samples=0, warmup_steps=2)
    config["trainer"].pop("max_epochs")
    config["trainer"].update(
        check_val_every_n_epoch=None, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, **{"max_steps": 10, **trainer_args},
    )  # fmt: skip
    return config


def _cli(monkeypatch, folder: Path, config: dict, *args: str, run: bool = False) -> WaltCLI:
    monkeypatch.setattr(sys, "argv", ["walt"])
    path = cpu_sized_config(config, folder, "base.yaml")
    return WaltCLI(
        args=["fit", "--config", str(path), *args] if run else ["--config", str(path), *args], run=run
    )


def test_walt_fit_checkpoints_every_run_periodically_and_atomically(tmp_path, monkeypatch):
    write_tiny_latents(tmp_path)
    cli = _cli(monkeypatch, tmp_path, _quickstart(tmp_path))
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    periodic = [c for c in cli.trainer.callbacks if isinstance(c, PeriodicCheckpoint)]
    assert len(periodic) == 1 and cli.trainer.checkpoint_callback is periodic[0]
    assert periodic[0].every_n_steps == 1000 and periodic[0].interval == timedelta(minutes=10)  # the defaults

    cli = _cli(monkeypatch, tmp_path, _quickstart(tmp_path), "--trainer.enable_checkpointing", "false")
    assert not cli.trainer.checkpoint_callbacks  # Lightning would refuse a checkpoint callback here


def test_a_second_writer_of_last_ckpt_is_refused_before_training(tmp_path, monkeypatch):
    write_tiny_latents(tmp_path)
    config = _quickstart(tmp_path)
    config["trainer"]["callbacks"] = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}
    ]
    with pytest.raises(ValueError, match=r"remove save_last from that callback.*checkpoint:"):
        _cli(monkeypatch, tmp_path, config, run=True)
    assert not (tmp_path / "run/checkpoints").exists()


# ---- mid-epoch resume ---------------------------------------------------------------------------------------------


class _Steps(Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append((trainer.global_step, float(batch["video"].double().sum()), float(outputs["loss"])))


@pytest.mark.parametrize("mixed", [False, True], ids=["videos", "videos+images"])
def test_a_resume_mid_epoch_follows_the_uninterrupted_run_exactly(tmp_path, mixed):
    """4 batches per epoch (5 with images mixed in); a checkpoint at every step. Resumed from step 2 (mid-epoch
    0) and step 5 (mid-epoch 1 or late in epoch 0), the run trains on the same batches with the same losses,
    bit for bit, and ends with the same weights, EMA and optimizer state."""
    full = _Steps()
    periodic = PeriodicCheckpoint(
        tmp_path / "a", every_n_train_steps=1, train_time_interval=None, save_top_k=-1
    )
    first = module()
    trainer(tmp_path / "a", max_steps=7, callbacks=[full, periodic]).fit(first, _data(mixed=mixed))
    assert len({row[1] for row in full.rows}) == 7  # seven different batches: an order to get wrong
    for step in (2, 5):
        resumed, steps = module(), _Steps()
        torch.manual_seed(1234)  # whatever the process did before must not matter
        checkpoint = next((tmp_path / "a").glob(f"epoch=*-step={step}.ckpt"))
        fit = trainer(tmp_path / f"b{step}", max_steps=7, callbacks=[steps])
        fit.fit(resumed, _data(mixed=mixed), ckpt_path=checkpoint)
        assert steps.rows == full.rows[step:], step
        assert all(
            torch.equal(a, b) for a, b in zip(first.state_dict().values(), resumed.state_dict().values())
        )
        assert int(resumed.ema.num_updates) == 7
        assert _same(first.trainer.optimizers[0].state_dict(), fit.optimizers[0].state_dict())


def test_a_resumed_variational_tokenizer_draws_the_same_posterior_noise(tmp_path):
    """Found by tools/fault_injection.py: only the diffusion modules saved the random stream, so a variational
    tokenizer (the UCF-101 and Kinetics configs) resumed with other posterior samples than the uninterrupted run
    drew. Every walt module saves it now (WaltModule)."""

    def tokenizer() -> TokenizerModule:
        torch.manual_seed(0)
        vae = CausalVAE(**presets["tiny"])  # variational: z = mean + noise * std
        return TokenizerModule(vae, TokenizerLoss(), optimizer=lambda p: torch.optim.Adam(p, lr=1e-3))

    full = _Steps()
    periodic = PeriodicCheckpoint(
        tmp_path / "a", every_n_train_steps=1, train_time_interval=None, save_top_k=-1
    )
    first = tokenizer()
    trainer(tmp_path / "a", max_steps=4, callbacks=[full, periodic]).fit(first, _data())
    resumed, steps = tokenizer(), _Steps()
    torch.manual_seed(1234)  # whatever the process did before must not matter
    checkpoint = next((tmp_path / "a").glob("epoch=*-step=2.ckpt"))
    trainer(tmp_path / "b", max_steps=4, callbacks=[steps]).fit(resumed, _data(), ckpt_path=checkpoint)
    assert steps.rows == full.rows[2:]
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), resumed.state_dict().values()))


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def _loader(sampler, **kwargs) -> ResumableDataLoader:
    return ResumableDataLoader(list(range(20)), batch_size=4, sampler=sampler, **kwargs)


def _batches(loader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)  # as Lightning does before every epoch
    return [b.tolist() for b in loader]


def test_the_loader_state_continues_the_epoch_once(caplog):
    loader = _loader(EpochShuffleSampler(20, seed=3))
    epoch2 = _batches(loader, 2)
    loader.sampler.set_epoch(2)
    it = iter(loader)
    seen = [next(it).tolist() for _ in range(2)]
    state = loader.state_dict()
    assert seen == epoch2[:2] and state == {"epoch": 2, "batches": 2, "batches_per_epoch": 5}

    rng = torch.get_rng_state()
    resumed = _loader(EpochShuffleSampler(20, seed=3))
    resumed.load_state_dict(state)
    assert _batches(resumed, 2) == epoch2[2:]  # the rest of epoch 2, nothing read twice
    assert torch.equal(torch.get_rng_state(), rng)  # iterating drew nothing from the training's random stream
    assert _batches(resumed, 2) == epoch2  # the state applies once

    other_epoch = _loader(EpochShuffleSampler(20, seed=3))
    other_epoch.load_state_dict(state)
    assert len(_batches(other_epoch, 3)) == 5  # a checkpoint of another epoch: this one is whole
    finished = _loader(EpochShuffleSampler(20, seed=3))
    finished.load_state_dict({**state, "batches": 5})
    assert _batches(finished, 2) == epoch2  # the checkpoint's epoch was over: the next pass is a new epoch

    resized = ResumableDataLoader(list(range(20)), batch_size=5, sampler=EpochShuffleSampler(20, seed=3))
    resized.load_state_dict(state)
    with caplog.at_level(logging.WARNING, logger="walt.data.datamodule"):
        assert len(_batches(resized, 2)) == 4
    assert "had 5 batches and this loader's has 4" in caplog.text


def test_a_resumed_loader_keeps_its_workers_and_skips_only_once():
    loader = _loader(EpochShuffleSampler(20, seed=3), num_workers=1, persistent_workers=True)
    loader.load_state_dict({"epoch": 0, "batches": 3, "batches_per_epoch": 5})
    reference = _batches(_loader(EpochShuffleSampler(20, seed=3)), 0)
    assert _batches(loader, 0) == reference[3:]
    assert _batches(loader, 0) == reference


def test_random_clip_offsets_resume_exactly_with_workers(ucf_root):
    """UCF-101 training clips start at a random frame. Each start is drawn from (seed, epoch, index), not from a
    worker's random stream, whose state depends on which items that worker read before: resumed mid-epoch, two
    workers read other batches than they did in the uninterrupted pass (batch 3 goes to the first worker, not the
    second), and the loader still gives the uninterrupted pass's clips, bit for bit."""

    def loader(num_workers: int = 2, **kwargs) -> ResumableDataLoader:
        dataset = UCF101(ucf_root, split="train", num_frames=4, resolution=16)  # 6 clips of 20 frames
        sampler = EpochShuffleSampler(len(dataset), seed=3)
        return ResumableDataLoader(
            dataset,
            batch_size=1,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate_items,
            **kwargs,
        )

    def videos(loader: ResumableDataLoader, epoch: int) -> list[torch.Tensor]:
        loader.sampler.set_epoch(epoch)
        return [batch["video"] for batch in loader]

    def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    whole = loader()
    epoch0, epoch1 = videos(whole, 0), videos(whole, 1)
    assert len(epoch1) == 6
    dataset = whole.dataset
    starts = {}
    for epoch in (0, 1):
        dataset.set_epoch(epoch, seed=3)
        starts[epoch] = [dataset[i]["video"] for i in range(len(dataset))]
    assert not same(starts[0], starts[1])  # another epoch, other clips of the same videos

    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "batches": 3, "batches_per_epoch": 6})
    assert same(videos(resumed, 1), epoch1[3:])
    rng = torch.get_rng_state()
    assert same(videos(loader(num_workers=0), 1), epoch1)  # in the main process: the same clips,
    assert torch.equal(torch.get_rng_state(), rng)  # drawing nothing from the training's random stream
    persistent = loader(persistent_workers=True)  # workers that keep their copy of the dataset between epochs
    assert same(videos(persistent, 0), epoch0) and same(videos(persistent, 1), epoch1)


def test_under_ddp_each_rank_skips_within_its_own_shard():
    """Under DDP Lightning wraps the sampler to shard it per rank; each rank resumes inside its shard."""

    def rank_loader(rank: int) -> ResumableDataLoader:
        sampler = DistributedSamplerWrapper(
            EpochShuffleSampler(40, seed=1), num_replicas=2, rank=rank, shuffle=False
        )
        return ResumableDataLoader(list(range(40)), batch_size=4, sampler=sampler)

    for rank in (0, 1):
        whole = _batches(rank_loader(rank), 1)
        resumed = rank_loader(rank)
        resumed.load_state_dict({"epoch": 1, "batches": 2, "batches_per_epoch": 5})
        assert len(whole) == 5 and _batches(resumed, 1) == whole[2:]
    shards = [{i for b in _batches(rank_loader(r), 1) for i in b} for r in (0, 1)]
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 40


# ---- real kills -----------------------------------------------------------------------------------------------


def _write_config(folder: Path, name: str, every: int, callbacks: list[dict], max_steps: int = 10) -> Path:
    """The CPU-sized quickstart base config: 8 latents in batches of 2 (4 per epoch), `max_steps` steps, a
    checkpoint every `every` steps (time off, for kill points that do not depend on the machine's speed)."""
    config = _quickstart(folder, max_steps=max_steps)
    config["checkpoint"] = {"every_n_train_steps": every, "train_time_interval": None}
    config["trainer"]["callbacks"] = [
        {
            "class_path": "tests._kill_points.RecordSteps",
            "init_args": {"path": str(folder / f"{name}.jsonl")},
        },
        *callbacks,
    ]
    path = cpu_sized_config(config, folder, f"{name}.yaml")
    config = yaml.safe_load(path.read_text())
    config["data"]["init_args"]["batch_size"] = 2
    path.write_text(yaml.safe_dump(config))
    return path


def _walt_fit(folder: Path, config: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "walt", "fit", "--config", str(config), *args]
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _walt_fit_here(config: Path, *args: str) -> None:
    """`walt fit` in this process (WaltCLI, as the command runs it, without the ~12 s of imports of a new process),
    on one thread like the subprocesses, so that the sums of every step add up in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "argv", ["walt"])
            WaltCLI(args=["fit", "--config", str(config), *args])
    finally:
        torch.set_num_threads(threads)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL the process as soon as ``ready()`` holds: no handler, no cleanup, as the OOM killer or a
    preempted node does."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            raise AssertionError(process.stdout.read().decode()[-4000:])
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tensors(checkpoint: dict) -> dict:
    return {"weights": checkpoint["state_dict"], "optimizer": checkpoint["optimizer_states"]}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("uninterrupted")
    write_tiny_latents(folder)
    _walt_fit_here(_write_config(folder, "steps", every=2, callbacks=[]))
    last = read_checkpoint(folder / "run/checkpoints/last.ckpt")
    return {"folder": folder, "rows": _rows(folder / "steps.jsonl"), "last": last}


def _same_latents(source: Path, folder: Path) -> None:
    """write_tiny_latents draws a new tokenizer each time: the runs to compare must read the same latents."""
    for name in ("vae.safetensors", "shard-00000.safetensors", "index.json"):
        shutil.copy(source / name, folder / name)


@pytest.mark.parametrize(
    "kill_at", [3, pytest.param(8, marks=pytest.mark.slow)], ids=lambda s: f"killed-at-step-{s}"
)
def test_a_killed_walt_fit_resumes_from_last_ckpt_as_if_never_killed(tmp_path, uninterrupted, kill_at):
    """`walt fit` with a checkpoint every 2 steps, SIGKILLed at the end of step 3 (mid-epoch 0) or 8 (the end of
    epoch 1, before its checkpoint), resumed with --ckpt_path .../last.ckpt: it loses at most the 2 steps since
    the last checkpoint, then trains on the same batches with the same losses as the run that was never
    killed, and ends with the same weights, EMA and optimizer state."""
    _same_latents(uninterrupted["folder"], tmp_path)
    flag = tmp_path / "paused"
    pause = {"class_path": "tests._kill_points.PauseAt", "init_args": {"step": kill_at, "flag": str(flag)}}
    process = _walt_fit(tmp_path, _write_config(tmp_path, "killed", every=2, callbacks=[pause]))
    _kill_when(process, flag.exists)
    last = tmp_path / "run/checkpoints/last.ckpt"
    saved = read_checkpoint(last)["global_step"]
    assert saved == 2 * ((kill_at - 1) // 2)  # lost: the steps since the last multiple of 2, at most 2

    resumed = _write_config(tmp_path, "resumed", every=2, callbacks=[])
    _walt_fit_here(resumed, "--ckpt_path", str(last))
    full = uninterrupted["rows"]
    assert _rows(tmp_path / "killed.jsonl") == full[:kill_at]
    assert _rows(tmp_path / "resumed.jsonl") == full[saved:]
    assert _same(_tensors(read_checkpoint(last)), _tensors(uninterrupted["last"]))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # renamed into place meanwhile
        return 0


def _temporary_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".last.ckpt.*.tmp")) if folder.exists() else []


@pytest.mark.parametrize(
    "write", [pytest.param(1, marks=pytest.mark.slow), 2, pytest.param(3, marks=pytest.mark.slow)],
    ids=lambda w: f"killed-in-write-{w}",
)  # fmt: skip
def test_a_kill_during_a_checkpoint_write_leaves_the_previous_checkpoint_whole(tmp_path, write):
    """A checkpoint every step, each carrying 128 MB of ballast so the write takes a while, and $TMPDIR on another
    filesystem (tmpfs) where there is one, as when last.ckpt was found truncated: SIGKILL while the n-th write is
    under way (its temporary file is there, beside last.ckpt). last.ckpt is then the previous complete
    checkpoint (none before the first), and the resumed run removes the orphaned temporary file."""
    write_tiny_latents(tmp_path)
    ballast = {"class_path": "tests._kill_points.Ballast", "init_args": {"megabytes": 128}}
    tmpdir = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path
    config = _write_config(tmp_path, "killed", every=1, callbacks=[ballast])
    process = _walt_fit(tmp_path, config, env={"TMPDIR": str(tmpdir)})
    folder = tmp_path / "run/checkpoints"
    written: set[Path] = set()

    def nth_write_under_way() -> bool:
        current = [p for p in _temporary_files(folder) if _size(p) > 0]
        written.update(current)
        return bool(current) and len(written) == write

    _kill_when(process, nth_write_under_way)
    orphans, last = _temporary_files(folder), folder / "last.ckpt"
    assert len(orphans) == 1  # killed during the write, not after it
    if write == 1:
        assert not last.exists()
    else:
        assert read_checkpoint(last)["global_step"] == write - 1

    resume = ("--ckpt_path", str(last)) if last.exists() else ()
    resumed = _write_config(tmp_path, "resumed", every=1, callbacks=[], max_steps=write + 1)
    _walt_fit_here(resumed, *resume)
    assert read_checkpoint(last)["global_step"] == write + 1 and not _temporary_files(folder)
