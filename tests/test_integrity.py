"""No silent garbage: weight files carry the hash of their weights and loading checks it (and refuses NaN or
infinite weights) on every path; a diverging run stops and never saves its diverged weights; sampling settings
that are not finite are refused while parsing; no loader runs a checkpoint's pickled code, whatever
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says. On real `walt fit` checkpoints and exports of tiny models."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from safetensors import safe_open
from torch.utils.data import DataLoader

from tests import test_pipeline
from tests.conftest import cpu_sized_config, write_tiny_latents
from tests.test_base_module import backbone, data, module, trainer
from tests.test_pipeline import ROOT, Payload, main_exit
from walt.checkpoint import CheckpointError, read_checkpoint, read_weights, weights_sha256, write_weights
from walt.cli import WaltCLI
from walt.cli import main as walt_main
from walt.data import SyntheticVideos, collate_items
from walt.lightning import (
    AtomicCheckpointIO,
    BaseDiffusionModule,
    DistillationModule,
    PeriodicCheckpoint,
    SuperResolutionModule,
    TokenizerModule,
    WaltModule,
)
from walt.lightning.distillation import teacher_weights
from walt.pipeline import ModelFileError, Pipeline, load_tokenizer
from walt.tokenizer import CausalVAE, presets
from walt.tokenizer.encode import load_vae_weights
from walt.tokenizer.losses import TokenizerLoss

trained = test_pipeline.trained  # the fixture: 2 steps of `walt fit` on the CPU-sized quickstart base config


def overwrite_one_float(path: Path, tensor: torch.Tensor, value: float = 1e30) -> None:
    """Overwrites 4 bytes of ``path`` inside ``tensor``'s data (found by its bytes: a checkpoint's zip entries
    and a safetensors file hold tensors raw) with the float32 ``value``, leaving the file's structure whole, as
    a bad disk or copy does."""
    raw, data_bytes = path.read_bytes(), tensor.contiguous().numpy().tobytes()
    at = raw.find(data_bytes)
    assert at >= 0 and raw.find(data_bytes, at + 1) < 0, "the tensor's bytes must occur once"
    at += (len(data_bytes) // 8) * 4  # a float in the middle
    path.write_bytes(raw[:at] + struct.pack("<f", value) + raw[at + 4 :])


def largest(state: dict[str, torch.Tensor], prefix: str) -> str:
    return max((k for k in state if k.startswith(prefix)), key=lambda k: state[k].numel())


# ---- checkpoints and exports carry the hash of their weights -------------------------------------------------


@pytest.fixture
def corrupt_ckpt(trained, tmp_path) -> tuple[Path, str]:
    """A copy of a real `walt fit` last.ckpt with one float of its largest EMA weight (the sampled weights) set to
    1e30: a finite value, so only the hash can tell."""
    path = tmp_path / "last.ckpt"
    shutil.copy(trained["ckpt"], path)
    state = read_checkpoint(path)["state_dict"]
    name = largest(state, "ema.module.")
    overwrite_one_float(path, state[name])
    return path, name


def test_a_checkpoint_records_the_hash_of_its_weights_and_loads_clean(trained):
    checkpoint = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)
    assert len(checkpoint["walt_integrity"]["weights_sha256"]) == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even the warning of a file without a hash
        read_checkpoint(trained["ckpt"])


def test_a_flipped_weight_in_last_ckpt_fails_every_loader_naming_the_file(corrupt_ckpt):
    path, name = corrupt_ckpt
    # PyTorch alone reads the damaged file without a word (it does not check the zip's CRCs): the bug.
    assert torch.load(path, map_location="cpu", weights_only=True)["state_dict"][name].max() == 1e30
    message = re.escape(f"{path} is corrupt: its weights do not match the hash written with them")
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)
    with pytest.raises(ModelFileError, match=message):
        Pipeline.from_pretrained(path)
    with pytest.raises(ModelFileError, match=message):
        load_tokenizer(path)
    with pytest.raises(CheckpointError, match=message):
        BaseDiffusionModule.load_from_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        teacher_weights(path)
    with pytest.raises(CheckpointError, match=message):
        load_vae_weights(CausalVAE(**presets["tiny"], variational=False), path)


def test_a_flip_outside_the_weights_is_refused_and_a_stripped_checkpoint_still_loads(trained, tmp_path):
    """Found by tools/fault_injection.py: 4 bytes flipped in an Adam moment (or the random stream, or a loop
    counter) passed the weights' hash, and `walt fit --ckpt_path` resumed on the damaged state without a word.
    Every other entry of a walt fit checkpoint is hashed too; an entry removed on purpose (the optimizer state of
    a checkpoint stripped for sharing) is no damage, and an entry the file was not written with is refused."""
    from walt.checkpoint import sha256_of_entries

    checkpoint = read_checkpoint(trained["ckpt"])
    recorded = checkpoint["walt_integrity"]["entries_sha256"]
    assert {"optimizer_states", "rng_states", "loops", "walt_model"} <= set(recorded)
    assert recorded == sha256_of_entries(checkpoint)
    path = tmp_path / "last.ckpt"
    shutil.copy(trained["ckpt"], path)
    moments = [v for s in checkpoint["optimizer_states"] for p in s["state"].values() for v in p.values()]
    overwrite_one_float(path, max(moments, key=torch.Tensor.numel))
    message = re.escape(f"{path} is corrupt: its optimizer_states do not match the hash written with them")
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match=message):
        AtomicCheckpointIO().load_checkpoint(path)  # what a resume reads with

    stripped = {k: v for k, v in checkpoint.items() if k != "optimizer_states"}
    torch.save(stripped, tmp_path / "stripped.ckpt")
    assert "optimizer_states" not in read_checkpoint(tmp_path / "stripped.ckpt")
    Pipeline.from_pretrained(tmp_path / "stripped.ckpt")
    torch.save({**stripped, "optimizer_stated": checkpoint["optimizer_states"]}, tmp_path / "renamed.ckpt")
    with pytest.raises(CheckpointError, match="its optimizer_stated do not match"):
        read_checkpoint(tmp_path / "renamed.ckpt")


def test_walt_sample_on_a_corrupt_checkpoint_exits_with_the_reason(corrupt_ckpt, tmp_path):
    """The reported case: `walt sample` made black videos from such a file and exited 0."""
    path, _ = corrupt_ckpt
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "walt", "sample", "--model", str(path), "--output", str(tmp_path / "out"),
               "--num-samples", "1", "--steps", "1", "--device", "cpu"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{path} is corrupt" in done.stderr and not list((tmp_path / "out").glob("*.mp4"))


def test_resuming_from_a_corrupt_checkpoint_is_refused(corrupt_ckpt, trained, monkeypatch):
    path, _ = corrupt_ckpt
    monkeypatch.setattr(sys, "argv", ["walt"])
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is corrupt")):
        WaltCLI(args=["fit", "--config", str(trained["config"]), "--model.init_args.backbone.init_args.hidden_size",
                      "48", "--trainer.max_steps", "3", "--ckpt_path", str(path)])  # fmt: skip


def test_an_exported_model_records_each_files_hash_and_a_flipped_weight_is_refused(trained, tmp_path):
    folder = Pipeline.from_pretrained(trained["ckpt"]).save_pretrained(tmp_path / "model")
    for name in ("backbone.safetensors", "tokenizer.safetensors"):
        with safe_open(str(folder / name), framework="pt") as f:
            assert len(f.metadata()["weights_sha256"]) == 64
    Pipeline.from_pretrained(folder)  # loads clean
    target = folder / "tokenizer.safetensors"
    state = read_weights(target)
    overwrite_one_float(target, state[largest(state, "")])
    with pytest.raises(ModelFileError, match=re.escape(f"{target} is corrupt")):
        Pipeline.from_pretrained(folder)


def test_walt_encodes_vae_safetensors_is_checked_wherever_it_is_loaded(tmp_path):
    """vae.safetensors (written by `walt encode` with :func:`write_weights`) is loaded by path alone: the hash
    travels inside it."""
    vae = CausalVAE(**presets["tiny"], variational=False)
    spec = {"class_path": "walt.tokenizer.CausalVAE", "init_args": {**presets["tiny"], "variational": False}}
    (tmp_path / "vae.yaml").write_text(yaml.safe_dump(spec))  # as walt encode writes it
    path = write_weights(vae.state_dict(), tmp_path / "vae.safetensors", {"role": "tokenizer"})
    assert load_vae_weights(CausalVAE(**presets["tiny"], variational=False), path) == "file"
    overwrite_one_float(path, vae.state_dict()[largest(vae.state_dict(), "")])
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is corrupt")):
        load_vae_weights(CausalVAE(**presets["tiny"], variational=False), path)
    with pytest.raises(ModelFileError, match=re.escape(f"{path} is corrupt")):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is corrupt")):
        BaseDiffusionModule(backbone(), CausalVAE(**presets["tiny"], variational=False), str(path))


def test_nan_weights_are_refused_by_every_loader_even_with_a_matching_hash(tmp_path):
    """Weights that were NaN when written (a run that diverged before walt stopped such runs) hash fine."""
    vae_state = CausalVAE(**presets["tiny"], variational=False).state_dict()
    vae_state[largest(vae_state, "")][0] = float("nan")
    weights = write_weights(vae_state, tmp_path / "vae.safetensors", {})
    state = {
        **module().state_dict(),
        "backbone.final_layer.unembed.proj.weight": torch.full((4, 4), float("inf")),
    }
    ckpt = tmp_path / "inf.ckpt"
    torch.save({"state_dict": state, "walt_integrity": {"weights_sha256": weights_sha256(state)}}, ckpt)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{weights}: 1 of its weight tensors hold NaN or infinite values")
    ):
        load_vae_weights(CausalVAE(**presets["tiny"], variational=False), weights)
    message = re.escape(f"{ckpt}: 1 of its weight tensors hold NaN or infinite values (backbone.final_layer")
    with pytest.raises(CheckpointError, match=message):
        read_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match=message):
        teacher_weights(ckpt)
    with pytest.raises(ModelFileError, match=message):
        load_tokenizer(ckpt)


def test_a_checkpoint_of_an_older_walt_loads_unverified_with_a_warning(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"vae.w": torch.ones(3)}}, path)
    with pytest.warns(UserWarning, match=re.escape(f"{path} carries no weights hash")):
        assert read_checkpoint(path)["state_dict"]["vae.w"].sum() == 3


# ---- a diverging run stops and never saves its diverged weights ---------------------------------------------


def test_every_training_module_shares_one_guard():
    for cls in (TokenizerModule, BaseDiffusionModule, SuperResolutionModule, DistillationModule):
        assert issubclass(cls, WaltModule)
        assert cls.on_before_backward is WaltModule.on_before_backward


def _saving_trainer(folder: Path, **kwargs) -> L.Trainer:
    """A trainer that saves as `walt fit` does (PeriodicCheckpoint, atomic writes), time-based saves off."""
    every = kwargs.pop("every_n_train_steps", None)
    return trainer(
        folder,
        callbacks=[PeriodicCheckpoint(folder, every_n_train_steps=every, train_time_interval=None),
                   *kwargs.pop("callbacks", [])],
        plugins=[AtomicCheckpointIO()], **kwargs,
    )  # fmt: skip


def test_a_tokenizer_at_lr_1e10_stops_at_its_first_nan_and_saves_nothing(tmp_path):
    """Reported: 11 NaN steps, then a NaN checkpoint saved at the end of training."""
    torch.manual_seed(0)
    tokenizer = TokenizerModule(
        CausalVAE(**presets["tiny"]), TokenizerLoss(), optimizer=lambda p: torch.optim.Adam(p, lr=1e10)
    )
    videos = DataLoader(
        SyntheticVideos(num_samples=24, num_frames=5, resolution=16), 2, collate_fn=collate_items
    )
    with pytest.raises(
        FloatingPointError, match=r"TokenizerModule: non-finite loss \(nan\) at step 1; the run stops"
    ):
        _saving_trainer(tmp_path, max_steps=12).fit(tokenizer, videos)
    assert int(tokenizer.train_steps) == 1 and not list(tmp_path.glob("*.ckpt"))


def test_walt_fit_says_in_one_line_why_a_diverged_run_stopped(tmp_path, monkeypatch, capsys):
    """Found by tools/fault_injection.py: the run stopped at its first NaN, but `walt fit` printed the error at
    the end of a traceback through Lightning's loops."""
    config = yaml.safe_load((ROOT / "configs/tokenizer/quickstart.yaml").read_text())
    model = config["model"]["init_args"]
    model["vae"]["init_args"] = {
        k: list(v) if isinstance(v, tuple) else v for k, v in presets["tiny"].items()
    }
    model["optimizer"]["init_args"]["lr"] = 1e10
    model["num_log_videos"] = 0
    data = config["data"]["init_args"]
    for split in ("train", "val"):
        data[split]["init_args"].update(num_samples=4, num_frames=5, resolution=16)
    data["batch_size"] = 2
    config["checkpoint"] = {"every_n_train_steps": 1, "train_time_interval": None}
    config["trainer"].update(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, default_root_dir=str(tmp_path / "run"))  # fmt: skip
    path = tmp_path / "tokenizer.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["walt"])
    with pytest.raises(SystemExit) as exit_info:
        walt_main(["fit", "--config", str(path)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("walt fit: TokenizerModule: ")
    assert "refusing to save a checkpoint at step 1" in err or "non-finite loss" in err
    assert not list(tmp_path.rglob("*.ckpt"))


class _LearningRateAt(Callback):
    """Sets every learning rate to ``lr`` for the step after ``step``: a run that diverges partway."""

    def __init__(self, step: int, lr: float) -> None:
        self.step, self.lr = step, lr

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = self.lr


def test_exploded_weights_are_not_saved_and_the_last_good_checkpoint_stays(tmp_path):
    """Reported: the base module's last.ckpt after a divergence held weights of 2.5e8 and sampled garbage. Here
    steps 1 and 2 train and are saved; step 3, at lr 1e10, explodes the weights (its loss, computed before the
    update, is finite): its save is refused, and last.ckpt stays step 2's, which loads and samples."""
    fit = _saving_trainer(tmp_path, max_steps=6, every_n_train_steps=1, callbacks=[_LearningRateAt(2, 1e10)])
    m = module()
    refused = (r"refusing to save a checkpoint at step 3: the RMS of its backbone weights grew .*x since step 2 "
               r"\(.*nothing is written .*\(the last checkpoint written is from step 2\)")  # fmt: skip
    with pytest.raises(FloatingPointError, match=refused):
        fit.fit(m, data())
    assert m.backbone.blocks[0].attn.qkv.weight.abs().max() > 1e8  # it did explode
    last = read_checkpoint(tmp_path / "last.ckpt")
    assert last["global_step"] == 2
    assert max(v.abs().max() for k, v in last["state_dict"].items() if k.startswith("backbone.")) < 10
    Pipeline.from_pretrained(tmp_path / "last.ckpt").generate(labels=[0], steps=2, progress=False)


def test_non_finite_weights_are_never_saved(tmp_path):
    m = module()
    fit = _saving_trainer(tmp_path, max_steps=1)
    fit.fit(m, data())
    with torch.no_grad():
        m.ema.module.final_layer.unembed.proj.weight.fill_(float("inf"))  # the loss never sees the EMA
    with pytest.raises(FloatingPointError, match=r"ema\.module\.final_layer\.unembed\.proj\.weight"):
        fit.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


# ---- sampling settings ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, error",
    [
        ("--guidance", "nan", "argument --guidance: must be a finite number, got 'nan'"),
        ("--guidance", "inf", "argument --guidance: must be a finite number, got 'inf'"),
        ("--eta", "nan", "argument --eta: must be a finite number"),
        ("--eta", "-inf", "argument --eta: must be a finite number"),
        ("--eta", "-0.5", "--eta must be >= 0"),
        ("--fps", "nan", "argument --fps: must be a finite number"),
        ("--fps", "0", "argument --fps: must be a finite number > 0, got 0"),
    ],
)
def test_walt_sample_refuses_non_finite_settings_while_parsing(tmp_path, capsys, option, value, error):
    """Refused before anything is read: the model named here does not even exist."""
    args = [
        "sample",
        "--model",
        str(tmp_path / "missing.ckpt"),
        "--output",
        str(tmp_path / "out"),
        f"{option}={value}",
    ]
    assert main_exit(args) == 2
    assert error in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("option", ["--guidance", "--eta"])
def test_walt_evaluate_refuses_non_finite_settings_while_parsing(tmp_path, capsys, option):
    assert main_exit(["evaluate", "fvd2048_16f", "--model", str(tmp_path), option, "nan"]) == 2
    assert f"argument {option}: must be a finite number" in capsys.readouterr().err


# ---- no pickled code runs, whatever TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD says ------------------------------------


@pytest.fixture
def malicious(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A checkpoint whose unpickling runs ``touch <marker>``, with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 set."""
    marker, path = tmp_path / "payload_ran", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    return path, marker


def test_the_payload_is_real_for_a_loader_that_leaves_weights_only_unset(malicious):
    path, marker = malicious
    with pytest.warns(UserWarning, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        torch.load(path)
    assert marker.exists()


@pytest.mark.parametrize(
    "load",
    [
        read_checkpoint,
        BaseDiffusionModule.load_from_checkpoint,
        TokenizerModule.load_from_checkpoint,
        lambda path: AtomicCheckpointIO().load_checkpoint(path),  # what resuming reads with
        Pipeline.from_pretrained,
    ],
    ids=["read_checkpoint", "BaseDiffusionModule", "TokenizerModule", "resume", "Pipeline"],
)
def test_no_loader_runs_a_checkpoints_pickled_code(malicious, load):
    path, marker = malicious
    with pytest.raises(
        (CheckpointError, ModelFileError), match=re.escape(f"{path} is not a readable walt checkpoint")
    ):
        load(path)
    assert not marker.exists()


def test_walt_fit_resume_runs_no_pickled_code(malicious, trained, monkeypatch):
    """`walt fit --ckpt_path`: WaltCLI reads the file first, with walt's reader, before LightningCLI's read for
    hyperparameters; the resume's own read is AtomicCheckpointIO's (above)."""
    path, marker = malicious
    monkeypatch.setattr(sys, "argv", ["walt"])
    with pytest.raises(CheckpointError, match=re.escape(f"{path} is not a readable walt checkpoint: Trying to "
                                                        "load unsupported GLOBAL")):  # fmt: skip
        WaltCLI(args=["fit", "--config", str(trained["config"]), "--trainer.max_steps", "3",
                      "--ckpt_path", str(path)])  # fmt: skip
    assert not marker.exists()


def _bad_checkpoints(folder: Path, marker: Path) -> dict[str, tuple[Path, str]]:
    """Files given as --ckpt_path, each with what walt must say about it."""
    files: dict[str, tuple[Path, str]] = {}
    path = folder / "malicious.ckpt"  # a real PyTorch archive whose unpickling would run `touch <marker>`
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, path)
    files["malicious"] = path, "is not a readable walt checkpoint: Trying to load unsupported GLOBAL"
    path = folder / "raw-malicious.ckpt"  # the same payload as a bare pickle (torch's pre-zip format)
    path.write_bytes(pickle.dumps(Payload(marker), protocol=2))
    files["raw-malicious"] = path, "is not a readable walt checkpoint: Trying to load unsupported GLOBAL"
    path = (
        folder / "random.ckpt"
    )  # random bytes that start as a pickle does: torch fails deep in its unpickler
    path.write_bytes(b"\x80\x02" + torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
                     .to(torch.uint8).numpy().tobytes())  # fmt: skip
    files["random-bytes"] = path, "is not a readable walt checkpoint"
    path = folder / "empty.ckpt"
    path.write_bytes(b"")
    files["empty"] = path, r"is an empty file \(0 bytes\), not a checkpoint"
    good = {"state_dict": {"w": torch.linspace(-1, 1, 4096)}}
    good["walt_integrity"] = {"weights_sha256": weights_sha256(good["state_dict"])}
    path = folder / "truncated.ckpt"
    torch.save(good, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    files["truncated"] = path, "is not a checkpoint: its .* bytes are neither a PyTorch archive nor a pickle"
    path = folder / "flipped.ckpt"  # one bit of one weight flipped, the file's structure whole
    torch.save(good, path)
    raw = bytearray(path.read_bytes())
    at = raw.find(good["state_dict"]["w"].numpy().tobytes()) + 4 * 1000 + 1
    raw[at] ^= 0x04
    path.write_bytes(bytes(raw))
    assert not torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], good["state_dict"]["w"])
    files["flipped-byte"] = path, "is corrupt: its weights do not match the hash written with them"
    return files


@pytest.mark.parametrize(
    ("command", "case"),
    [
        ("fit", "malicious"),
        ("fit", "random-bytes"),
        ("fit", "empty"),
        ("fit", "flipped-byte"),
        ("validate", "raw-malicious"),
        ("validate", "truncated"),
        ("test", "malicious"),
    ],
)
def test_walt_refuses_a_bad_ckpt_path_in_one_line_naming_the_file(tmp_path, command, case):
    """`walt fit/validate/test --ckpt_path <file>` on a file that is not a sound checkpoint exits 1 with one line
    naming the file and what is wrong with it: no Python traceback (torch's UnpicklingError, IndexError or
    EOFError), no payload run (even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), nothing built or written."""
    write_tiny_latents(tmp_path)
    config = yaml.safe_load((ROOT / "configs/base/quickstart.yaml").read_text())
    config["trainer"].update(max_steps=2, logger=False, enable_progress_bar=False)
    config_path = cpu_sized_config(config, tmp_path, "base.yaml")
    marker = tmp_path / "payload_ran"
    path, message = _bad_checkpoints(tmp_path, marker)[case]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "walt", command, "--config", str(config_path), "--ckpt_path", str(path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert re.fullmatch(f"walt {command}: {re.escape(str(path))} {message}.*", lines[-1]), done.stderr
    assert len(lines) == 1, done.stderr  # the error alone: no warning or log line around it
    assert not marker.exists() and not (tmp_path / "run").exists()
