"""Multi-process training on CPU (DDP over gloo) and the configs in configs/distributed/."""

from __future__ import annotations

import json
import os
import pickle
import shutil
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
from tests.test_pipeline import Payload
from walt.checkpoint import load_weights_only, read_checkpoint
from walt.cli import WaltCLI
from walt.lightning import WaltFSDPStrategy
from walt.lightning.strategies import MANIFEST
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
    assert type(fsdp) is WaltFSDPStrategy  # checkpoints read with walt's checks, written atomically
    # Blocks and whole WALTs (the backbone and its EMA copy alike) are FSDP units; blocks are checkpointed.
    assert fsdp.kwargs["auto_wrap_policy"]._module_classes == {WindowBlock, WALT}
    assert fsdp._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {WindowBlock}
    assert fsdp.sharding_strategy == ShardingStrategy.FULL_SHARD and fsdp._state_dict_type == "full"
    assert fsdp.kwargs["use_orig_params"] is True


def _fit_on_two_processes(
    tmp_path: Path, strategy: str, accelerator: str, callback: str = "SaveRankState"
) -> Path:
    """`walt fit` of the quickstart base config (2-layer backbone, tiny latents) with
    configs/distributed/<strategy>.yaml on 2 processes: 2 epochs of 1 step per rank with a validation pass.
    Each rank writes what it trained on and the weights it ended with (tests/_rank_state.py)."""
    write_tiny_latents(tmp_path)  # 8 latents: a batch of 4 per rank
    config = yaml.safe_load((ROOT / "configs/base/quickstart.yaml").read_text())
    config["model"]["init_args"].update(sample_steps=2, num_log_samples=2)
    config["trainer"].update(max_epochs=2, check_val_every_n_epoch=1, num_sanity_val_steps=0)
    config["trainer"].setdefault("callbacks", []).append(
        {"class_path": f"_rank_state.{callback}", "init_args": {"folder": str(tmp_path / "ranks")}}
    )
    path = cpu_sized_config(config, tmp_path, "base.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")]))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # Lightning launches and numbers the second process itself
    command = [sys.executable, "-m", "walt", "fit", "--config", str(path)]
    command += ["--config", str(ROOT / f"configs/distributed/{strategy}.yaml")]
    command += ["--trainer.accelerator", accelerator, "--trainer.devices", "2"]
    command += ["--trainer.enable_progress_bar", "false"]
    if accelerator == "cpu":
        command += ["--trainer.precision", "32-true"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return path


two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)


@pytest.mark.parametrize(
    "accelerator",
    ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, two_gpus])],
    ids=["cpu-gloo", "gpu-nccl"],
)
def test_ddp_on_two_processes_keeps_weights_and_ema_identical(tmp_path, accelerator):
    """DDP on 2 CPU processes (gloo) or 2 GPUs (NCCL): both ranks end with the same weights and EMA, which the
    checkpoint holds, each rank having drawn from its own random stream (rank 0 alone samples the logged
    videos)."""
    _fit_on_two_processes(tmp_path, "ddp", accelerator)
    rank0, rank1 = (torch.load(tmp_path / "ranks" / f"rank{r}.pt", map_location="cpu") for r in range(2))
    for part in ("backbone", "ema"):
        assert rank0[part].keys() == rank1[part].keys()
        assert all(torch.equal(rank0[part][k], rank1[part][k]) for k in rank0[part]), part
    assert int(rank0["ema"]["num_updates"]) == 2
    # One batch of 4 per rank and epoch: Lightning's distributed sampler split the 8 items in two.
    assert len(rank0["labels"]) == len(rank1["labels"]) == 2
    assert not torch.equal(rank0["draw"], rank1["draw"])  # each rank has its own random stream

    # The stable checkpoint path (<default_root_dir>/checkpoints), the TensorBoard log in lightning_logs/version_0.
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    weights = checkpoint["state_dict"]
    assert all(torch.equal(weights[f"backbone.{k}"], v) for k, v in rank0["backbone"].items())
    assert all(torch.equal(weights[f"ema.{k}"], v) for k, v in rank0["ema"].items())
    assert any(not torch.equal(rank0["ema"][f"module.{k}"], v) for k, v in rank0["backbone"].items())
    events = list((tmp_path / "run/lightning_logs/version_0").glob("events.out.tfevents.*"))
    assert len(events) == 1  # one logger, rank 0's


@pytest.mark.gpu
@two_gpus
def test_fsdp_on_two_gpus_checkpoints_the_gathered_weights_which_sample_on_one_gpu(tmp_path):
    """The first FSDP run: `walt fit` with configs/distributed/fsdp.yaml on 2 GPUs. The full checkpoint rank 0
    writes holds exactly the weights gathered from the shards (backbone, EMA, tokenizer); every rank gathers the
    same; the EMA moved away from the live weights (its shards were updated against the matching live shards);
    and the checkpoint loads on one GPU, as `walt sample` loads it, sampling exactly what the gathered weights
    sample."""
    from walt.checkpoint import module_weights
    from walt.pipeline import Pipeline

    _fit_on_two_processes(tmp_path, "fsdp", "gpu", callback="SaveGatheredWeights")
    rank0, rank1 = (torch.load(tmp_path / "ranks" / f"rank{r}.pt", map_location="cpu") for r in range(2))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    path = tmp_path / "run/checkpoints/last.ckpt"
    weights = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert weights.keys() <= rank0.keys() and any(k.startswith("ema.module.") for k in weights)
    assert all(torch.equal(weights[k].cpu(), rank0[k]) for k in weights)
    assert int(weights["ema.num_updates"]) == 2
    assert any(
        not torch.equal(weights[f"ema.module.{k[9:]}"], v)
        for k, v in weights.items()
        if k.startswith("backbone.")
    )

    videos = []
    for state in (None, {k: rank0[k] for k in weights}):
        pipe = Pipeline.from_pretrained(path, device="cuda")  # as `walt sample --model` loads it: EMA weights
        if state is not None:  # the weights gathered from the shards, in the same parts
            pipe.backbone.load_state_dict(module_weights(state, "backbone.")[0])
            pipe.tokenizer.load_state_dict(module_weights(state, "tokenizer.", use_ema=False)[0])
        videos.append(pipe.generate(labels=[0, 1], seeds=[0, 1], steps=3, output="float", progress=False))
    assert videos[0].shape == (2, 3, 17, 32, 32)
    assert torch.isfinite(videos[0]).all() and torch.equal(videos[0], videos[1])


def _fsdp_fit(
    folder: Path, name: str, accelerator: str, state_dict_type: str, *args: str, weights_at: dict
) -> subprocess.CompletedProcess:
    """`walt fit` of the CPU-sized quickstart base config with configs/distributed/fsdp.yaml (its strategy's
    state_dict_type set) on 2 processes, in ``folder/name``: 8 latents in batches of 2 per rank (2 steps per
    epoch), 4 steps, a checkpoint after each (``epoch=E-step=S.ckpt``, a file or a sharded folder). Each rank
    writes its weights, gathered from the shards, to ``folder/name/ranks`` when ``weights_at`` says
    (tests/_rank_state.py's SaveGatheredWeights). On CPU processes the strategy is tests/_cpu_fsdp.py's CPUFSDP
    (WaltFSDPStrategy, its FSDP units on the CPU)."""
    run = folder / name
    run.mkdir()
    config = yaml.safe_load((ROOT / "configs/base/quickstart.yaml").read_text())
    config["model"]["init_args"].update(sample_steps=2, num_log_samples=0)
    config["trainer"].pop("max_epochs")
    config["trainer"].update(
        max_steps=4, check_val_every_n_epoch=None, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    config["checkpoint"] = {"every_n_train_steps": 1, "train_time_interval": None, "save_top_k": -1}
    config["trainer"]["callbacks"] = [
        {
            "class_path": "_rank_state.SaveGatheredWeights",
            "init_args": {"folder": str(run / "ranks"), **weights_at},
        }
    ]
    path = cpu_sized_config(config, folder, f"{name}.yaml")  # the latents in `folder`, written once
    config = yaml.safe_load(path.read_text())
    config["data"]["init_args"]["batch_size"] = 2
    config["trainer"]["default_root_dir"] = str(run / "run")
    path.write_text(yaml.safe_dump(config))
    fsdp = yaml.safe_load((ROOT / "configs/distributed/fsdp.yaml").read_text())
    fsdp["trainer"]["strategy"]["init_args"]["state_dict_type"] = state_dict_type
    if accelerator == "cpu":
        fsdp["trainer"]["strategy"]["class_path"] = "_cpu_fsdp.CPUFSDP"
        fsdp["trainer"]["precision"] = "32-true"
    fsdp["trainer"].update(accelerator=accelerator, devices=2)
    (run / "fsdp.yaml").write_text(yaml.safe_dump(fsdp))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")]))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "walt",
        "fit",
        "--config",
        str(path),
        "--config",
        str(run / "fsdp.yaml"),
        *args,
    ]
    return subprocess.run(command, cwd=run, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("state_dict_type", ["full", "sharded"])
@pytest.mark.parametrize(
    "accelerator",
    [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("gpu", marks=[pytest.mark.gpu, two_gpus])],
    ids=["cpu-gloo", "gpu-nccl"],
)
def test_an_fsdp_run_resumes_mid_epoch_through_walts_checks(tmp_path, accelerator, state_dict_type):
    """configs/distributed/fsdp.yaml (walt.lightning.WaltFSDPStrategy) on 2 processes: every checkpoint is written
    whole and signed (a file with its weights hash, or a sharded folder with its files' hashes); a run resumed
    from the one of step 1 (mid-epoch) starts from exactly the weights, EMA and tokenizer every rank held after
    step 1, and trains on to step 4; a corrupt copy and a forged one are refused, naming the file, on every rank,
    without running the forger's code (Lightning's FSDPStrategy unpickled both without restriction, and had no
    hash to check).

    (The resumed steps do not repeat the uninterrupted run's: each rank's random stream is re-derived from rank
    0's saved one when a multi-process run starts, WaltModule.on_fit_start.)"""
    write_tiny_latents(tmp_path)
    done = _fsdp_fit(tmp_path, "whole", accelerator, state_dict_type, weights_at={"at_step": 1})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    checkpoints = tmp_path / "whole/run/checkpoints"
    step1 = checkpoints / "epoch=0-step=1.ckpt"
    if state_dict_type == "sharded":
        assert step1.is_dir() and (step1 / MANIFEST).is_file() and (checkpoints / "last.ckpt").is_dir()
        assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # no staging folder left
    else:
        weights = read_checkpoint(step1)["state_dict"]  # the weights hash checks out
        saved = torch.load(tmp_path / "whole/ranks/rank0.pt")
        assert weights.keys() <= saved.keys() and all(
            torch.equal(weights[k].cpu(), saved[k]) for k in weights
        )

    resumed = ("--ckpt_path", str(step1))
    done = _fsdp_fit(
        tmp_path, "resumed", accelerator, state_dict_type, *resumed, weights_at={"at_start": True}
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for rank in (0, 1):
        after_step1, restored = (
            torch.load(tmp_path / f"{run}/ranks/rank{rank}.pt") for run in ("whole", "resumed")
        )
        assert after_step1.keys() == restored.keys()
        assert all(torch.equal(after_step1[k], restored[k]) for k in after_step1), rank
    last = tmp_path / "resumed/run/checkpoints/last.ckpt"
    meta = load_weights_only(last / "meta.pt") if state_dict_type == "sharded" else read_checkpoint(last)
    assert meta["global_step"] == 4

    corrupt, forged, marker = tmp_path / "corrupt.ckpt", tmp_path / "forged.ckpt", tmp_path / "payload_ran"
    if state_dict_type == "sharded":
        shutil.copytree(step1, corrupt)
        shard = corrupt / "__1_0.distcp"
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        shard.write_bytes(bytes(raw))
        shutil.copytree(step1, forged)
        (forged / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
        (forged / MANIFEST).unlink()  # a forger rewrites or drops the record: the unpickler refuses alone
        refusals = {
            corrupt: f"{shard} is corrupt",
            forged: f"{forged / '.metadata'} is not a readable checkpoint index",
        }
    else:
        shutil.copy(step1, corrupt)
        state = read_checkpoint(corrupt)["state_dict"]
        name = max(state, key=lambda k: state[k].numel())
        raw, data = bytearray(corrupt.read_bytes()), state[name].contiguous().cpu().numpy().tobytes()
        raw[raw.find(data) + len(data) // 2] ^= 0x01
        corrupt.write_bytes(bytes(raw))
        torch.save({"state_dict": state, "payload": Payload(marker)}, forged)
        refusals = {corrupt: f"{corrupt} is corrupt", forged: f"{forged} is not a readable walt checkpoint"}
    for bad, message in refusals.items():
        done = _fsdp_fit(
            tmp_path, bad.stem, accelerator, state_dict_type, "--ckpt_path", str(bad), weights_at={}
        )
        assert done.returncode != 0 and message in done.stderr, done.stdout[-3000:] + done.stderr[-5000:]
        assert not marker.exists() and not list((tmp_path / bad.stem).glob("run/checkpoints/*"))


@pytest.mark.gpu
@two_gpus
def test_evaluate_is_bit_identical_on_one_process_and_on_two_gpus(tmp_path):
    """`walt evaluate` (FVD, 512 against 512 MovingDigits clips) in one process on one GPU and under torchrun on
    2 GPUs (NCCL): the same fixed batches, folded in the same order, give the same number to the last bit."""
    for split, seed in (("test", 0), ("train", 1)):
        init = {"split": split, "num_samples": 512, "num_frames": 16, "seed": seed}
        dataset = {"dataset": {"class_path": "walt.data.MovingDigits", "init_args": init}}
        (tmp_path / f"{split}.yaml").write_text(yaml.safe_dump(dataset))
    args = [
        "evaluate",
        "fvd2048_16f",
        "--real",
        str(tmp_path / "test.yaml"),
        "--fake",
        str(tmp_path / "train.yaml"),
    ]
    args += ["--num-real", "512", "--num-fake", "512", "--no-cache", "--no-progress", "--batch-size", "16"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    values = []
    for launcher in ([sys.executable, "-m", "walt"], [sys.executable, "-m", "torch.distributed.run",
                                                     "--nproc_per_node", "2", "-m", "walt"]):  # fmt: skip
        out = tmp_path / f"{len(values)}.json"
        done = subprocess.run(
            [*launcher, *args, "--output", str(out)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-5000:]
        values.append(json.loads(out.read_text())["value"])
    assert values[0] == values[1] and values[0] > 0
