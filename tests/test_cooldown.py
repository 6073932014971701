"""LearningRateCooldown: the rate each optimizer step used, by step budget, by time budget, on top of a scheduler,
and in the tokenizer's manual optimization with two optimizers."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Timer
from torch import nn
from torch.utils.data import DataLoader

from walt.data import SyntheticVideos, collate_items
from walt.lightning import LearningRateCooldown, TokenizerModule
from walt.lightning.cooldown import budget_progress, cooldown_factor
from walt.tokenizer import CausalVAE, presets
from walt.tokenizer.discriminator import Discriminator3D
from walt.tokenizer.losses import TokenizerLoss


class Recorder(L.LightningModule):
    """One linear layer; records the rate of every optimizer step, optionally behind a warmup scheduler."""

    def __init__(self, warmup: int = 0) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.warmup = warmup
        self.rates: list[float] = []

    def training_step(self, batch, batch_idx):
        self.rates.append(self.optimizers().param_groups[0]["lr"])
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=1.0)
        if not self.warmup:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / self.warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(
    module: L.LightningModule, callback: LearningRateCooldown, data, ckpt_path=None, **kwargs
) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback], **kwargs,
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer


def test_factor_is_one_then_falls_linearly_to_zero():
    assert [cooldown_factor(p, 0.25) for p in (0.0, 0.5, 0.75, 0.875, 1.0, 1.2)] == [1, 1, 1, 0.5, 0, 0]
    assert cooldown_factor(0.5, 1.0) == 0.5
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            LearningRateCooldown(bad)


def test_rate_of_every_step_with_a_step_budget():
    module = Recorder()
    fit(module, LearningRateCooldown(0.5), DataLoader(torch.randn(40, 2), batch_size=2), max_steps=10)
    assert module.rates == pytest.approx([1.0] * 6 + [0.8, 0.6, 0.4, 0.2])


@pytest.mark.parametrize("warmup", [0, 4])
def test_resumed_run_continues_the_schedule(tmp_path, warmup):
    """Stopped after 7 of 10 steps, in the cooldown, and resumed: the rates are those of a run never stopped (the
    optimizer comes back with the cooled rate, which must not be taken for the base)."""

    class StopAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 7:
                trainer.should_stop = True

    data = DataLoader(torch.randn(40, 2), batch_size=2)
    whole = Recorder(warmup)
    fit(whole, LearningRateCooldown(0.5), data, max_steps=10)
    first = Recorder(warmup)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LearningRateCooldown(0.5), StopAt()], max_steps=10,
    )  # fmt: skip
    trainer.fit(first, data)
    trainer.save_checkpoint(tmp_path / "stopped.ckpt")
    second = Recorder(warmup)
    fit(second, LearningRateCooldown(0.5), data, max_steps=10, ckpt_path=tmp_path / "stopped.ckpt")
    assert first.rates + second.rates == pytest.approx(whole.rates)
    assert len(second.rates) == 3 and second.rates[0] < whole.rates[6]  # resumed inside the cooldown


def test_epoch_budget_and_scheduler_multiply():
    """20 steps (2 epochs of 10 batches), warmup over 4 steps, cooldown over the last half."""
    module = Recorder(warmup=4)
    fit(module, LearningRateCooldown(0.5), DataLoader(torch.randn(20, 2), batch_size=2), max_epochs=2)
    expected = [min(1.0, (s + 1) / 4) * min(1.0, (1 - s / 20) / 0.5) for s in range(20)]
    assert module.rates == pytest.approx(expected)


def test_time_budget_counts_when_it_ends_first(monkeypatch):
    trainer = L.Trainer(accelerator="cpu", logger=False, max_time={"seconds": 100}, max_steps=1000)
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": 90.0)
    assert budget_progress(trainer) == pytest.approx(0.9)  # steps: 0 of 1000
    assert cooldown_factor(budget_progress(trainer), 0.2) == pytest.approx(0.5)


def test_several_ranks_take_rank_zeros_progress(monkeypatch):
    """Time read on each rank differs a little; replicas must never step with different rates."""
    broadcasts = []

    def broadcast(self, obj, src=0):
        broadcasts.append((obj, src))
        return 0.9  # rank 0's progress

    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))
    monkeypatch.setattr(type(L.Trainer(accelerator="cpu", logger=False).strategy), "broadcast", broadcast)
    module = Recorder()
    fit(module, LearningRateCooldown(0.2), DataLoader(torch.randn(8, 2), batch_size=2), max_steps=2)
    assert module.rates == pytest.approx(
        [0.5, 0.5]
    )  # factor (1 - 0.9) / 0.2, whatever this rank's clock says
    progress = [b for b in broadcasts if isinstance(b[0], float)]  # Lightning broadcasts other things too
    assert progress == [(0.0, 0), (0.5, 0)]  # this rank's own progress: steps 0 and 1 of 2


def test_run_without_an_end_is_refused():
    with pytest.raises(ValueError, match="needs the run's end"):
        fit(Recorder(), LearningRateCooldown(), DataLoader(torch.randn(4, 2), batch_size=2), max_epochs=-1)


def test_tokenizer_module_both_optimizers_cool_down():
    """Manual optimization: the autoencoder and, once it has joined, the discriminator (2 optimizer steps per batch
    then, as Lightning counts them)."""
    torch.manual_seed(0)
    seen: list[tuple[float, float]] = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(tuple(o.param_groups[0]["lr"] for o in trainer.optimizers))

    module = TokenizerModule(
        CausalVAE(**presets["tiny"]), TokenizerLoss(gan_start_step=2), Discriminator3D(channels=4, multipliers=(2,)),
        optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), discriminator_optimizer=lambda p: torch.optim.Adam(p, lr=2e-3),
    )  # fmt: skip
    data = SyntheticVideos(num_samples=12, num_frames=5, resolution=16, seed=0)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[LearningRateCooldown(0.5), Watch()], max_steps=8,
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=2, collate_fn=collate_items))
    # global steps before each batch: 0, 1, then 2 per batch with D: 2, 4, 6 -> factors 1, 1, 1, 1, 0.5
    factors = [min(1.0, (1 - s / 8) / 0.5) for s in (0, 1, 2, 4, 6)]
    assert factors[-1] == 0.5
    assert [rate for pair in seen for rate in pair] == pytest.approx(
        [r * f for f in factors for r in (1e-3, 2e-3)]
    )
