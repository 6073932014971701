"""Multi-process training on CPU (DDP over gloo) and the configs in configs/distributed/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from torch.distributed.fsdp import ShardingStrategy

from tests.conftest import cpu_sized_config, write_tiny_latents
from walt.cli import WaltCLI
from walt.transformer import WALT
from walt.transformer.block import WindowBlock

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = sorted((ROOT / "configs/base").glob("*.yaml")) + sorted((ROOT / "configs/sr").glob("*.yaml"))


class _ParseOnly(WaltCLI):
    """WaltCLI that parses and validates the configs but builds nothing (the stage configs name data and
    tokenizer weights that are not on this machine)."""

    def instantiate_classes(self) -> None:
        pass


def _strategy(config_paths: list[Path]):
    cli = _ParseOnly(args=[a for p in config_paths for a in ("--config", str(p))], run=False)
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=Strategy)
    namespace = parser.parse_object({"strategy": cli.config.trainer.strategy.as_dict()})
    return cli.config, parser.instantiate(namespace).strategy


@pytest.mark.parametrize("config", STAGE_CONFIGS, ids=lambda p: p.parent.name + "/" + p.name)
def test_distributed_configs_parse_with_every_stage_config(config, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["walt"])
    parsed, ddp = _strategy([config, ROOT / "configs/distributed/ddp.yaml"])
    assert isinstance(ddp, DDPStrategy) and parsed.trainer.devices == "auto"
    assert (
        ddp._ddp_kwargs["find_unused_parameters"] is False
        and ddp._ddp_kwargs["gradient_as_bucket_view"] is True
    )
    assert parsed.model.class_path == yaml.safe_load(config.read_text())["model"]["class_path"]  # kept

    parsed, fsdp = _strategy([config, ROOT / "configs/distributed/fsdp.yaml"])
    assert isinstance(fsdp, FSDPStrategy) and parsed.trainer.precision == "bf16-mixed"
    # Blocks and whole WALTs (the backbone and its EMA copy alike) are FSDP units; blocks are checkpointed.
    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {WindowBlock, WALT}
    assert fsdp._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {WindowBlock}
    assert fsdp.sharding_strategy == ShardingStrategy.FULL_SHARD and fsdp._state_dict_type == "full"
    assert fsdp.kwargs["use_orig_params"] is True


def test_ddp_on_two_cpu_processes_keeps_weights_and_ema_identical(tmp_path):
    """`walt fit` with configs/distributed/ddp.yaml on 2 CPU processes (gloo): 2 epochs of 1 step per rank with a
    validation pass (rank 0 alone samples the logged videos). Both ranks end with the same weights and EMA, which
    the checkpoint holds, each rank having drawn from its own random stream."""
    write_tiny_latents(tmp_path)  # 8 latents: a batch of 4 per rank
    config = yaml.safe_load((ROOT / "configs/base/quickstart.yaml").read_text())
    config["model"]["init_args"].update(sample_steps=2, num_log_samples=2)
    config["trainer"].update(max_epochs=2, check_val_every_n_epoch=1, num_sanity_val_steps=0)
    config["trainer"]["callbacks"].append(
        {"class_path": "_rank_state.SaveRankState", "init_args": {"folder": str(tmp_path / "ranks")}}
    )
    path = cpu_sized_config(config, tmp_path, "base.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")]))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # Lightning launches and numbers the second process itself
    command = [sys.executable, "-m", "walt", "fit", "--config", str(path)]
    command += ["--config", str(ROOT / "configs/distributed/ddp.yaml")]
    command += [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.enable_progress_bar",
        "false",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    rank0, rank1 = (torch.load(tmp_path / "ranks" / f"rank{r}.pt") for r in range(2))
    for part in ("backbone", "ema"):
        assert rank0[part].keys() == rank1[part].keys()
        assert all(torch.equal(rank0[part][k], rank1[part][k]) for k in rank0[part]), part
    assert int(rank0["ema"]["num_updates"]) == 2
    # One batch of 4 per rank and epoch: Lightning's distributed sampler split the 8 items in two.
    assert len(rank0["labels"]) == len(rank1["labels"]) == 2
    assert not torch.equal(rank0["draw"], rank1["draw"])  # each rank has its own random stream

    checkpoint = torch.load(
        tmp_path / "run/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True
    )
    weights = checkpoint["state_dict"]
    assert all(torch.equal(weights[f"backbone.{k}"], v) for k, v in rank0["backbone"].items())
    assert all(torch.equal(weights[f"ema.{k}"], v) for k, v in rank0["ema"].items())
    assert any(not torch.equal(rank0["ema"][f"module.{k}"], v) for k, v in rank0["backbone"].items())
    events = list((tmp_path / "run/lightning_logs/version_0").glob("events.out.tfevents.*"))
    assert len(events) == 1  # one logger, rank 0's
