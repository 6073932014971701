"""The walt command: every YAML under configs/ parses through the real CLI parser; placeholders say so."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jsonargparse
import pytest
import yaml
from torch.utils.data import Dataset

import walt.pipeline.files
from walt.cli import EXTRA_COMMANDS, LIGHTNING_COMMANDS, WaltCLI
from walt.pipeline import SuperResolution, load_cascade

CONFIGS = sorted(Path(__file__).resolve().parents[1].joinpath("configs").rglob("*.yaml"))
PLACEHOLDER_MODEL = "lightning.pytorch.demos.boring_classes.BoringModel"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    # LightningCLI warns when both args= and pytest's own command line are present.
    monkeypatch.setattr(sys, "argv", ["walt"])


def test_there_are_configs():
    assert CONFIGS, "configs/ holds no YAML files"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_config_parses(config, capsys, monkeypatch):
    """Parsing validates class paths and every init argument's type without building anything."""
    content = yaml.safe_load(config.read_text())
    if "dataset" in content:  # a dataset for `walt evaluate`, not a training config
        parser = jsonargparse.ArgumentParser(exit_on_error=False)
        parser.add_argument("--dataset", type=Dataset)
        assert parser.parse_object(content).dataset.class_path.startswith("walt.data.")
        return
    if "stages" in content:  # a cascade for `walt sample --cascade`: each stage is a model some config trains
        _check_cascade(config, monkeypatch)
        return
    args = ["--config", str(config)]
    if set(content) <= {"trainer"}:  # a trainer fragment (configs/distributed): combined with a full config
        args = ["--config", str(config.parents[1] / "base/quickstart.yaml"), *args]
    elif "model" in content and "class_path" not in content["model"]:  # an overlay on another config
        args = [*_overlaid(config), *args]
    elif "model" not in content:
        args += ["--model", PLACEHOLDER_MODEL]  # data-only fragments are combined with a model config
    with pytest.raises(SystemExit) as exit_info:
        WaltCLI(args=[*args, "--print_config"], run=False)
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"].startswith("walt.")
    # Every run checkpoints periodically (walt.lightning.PeriodicCheckpoint), and only it writes last.ckpt.
    assert printed["checkpoint"]["every_n_train_steps"] or printed["checkpoint"]["train_time_interval"]
    callbacks = printed["trainer"].get("callbacks") or []
    assert not any(c.get("init_args", {}).get("save_last") for c in callbacks)


def _overlaid(config: Path) -> list[str]:
    """The --config arguments an overlay goes over, read from the `walt fit` command its comments show."""
    root = config.parents[1].parent
    mine = re.escape(str(config.relative_to(root)))
    for line in config.read_text().splitlines():
        found = re.search(rf"walt fit ((?:--config \S+ )+)--config {mine}", line)
        if found:
            return [str(root / a) if a.endswith(".yaml") else a for a in found[1].split()]
    raise AssertionError(
        f"{config.name}: a model section without class_path, and no `walt fit` command naming it"
    )


def _check_cascade(config: Path, monkeypatch) -> None:
    """The cascade YAML goes through the real loader (its keys, per-stage settings and stage order checked), with
    each stage's model replaced by a stand-in: every stage must name the stable checkpoint
    (``<default_root_dir>/checkpoints/last.ckpt``) that `walt fit` of a config under configs/ writes, a base
    model first and super-resolution models after it."""
    trained_by = {}  # checkpoint path -> is the config's model a super-resolution module
    for other in CONFIGS:
        content = yaml.safe_load(other.read_text())
        root = (content.get("trainer") or {}).get("default_root_dir")
        if root and "model" in content:
            sr = "lowres" in (content["model"]["init_args"].get("conditioner") or {})
            trained_by[str(Path(root) / "checkpoints/last.ckpt")] = sr

    def stand_in(model, *args, **kwargs):
        assert str(model) in trained_by, (
            f"{config.name}: {model} is not the checkpoint any config's walt fit writes"
        )
        return SimpleNamespace(super_resolution=SuperResolution() if trained_by[str(model)] else None)

    monkeypatch.setattr(walt.pipeline.files, "load_model", stand_in)
    cascade = load_cascade(config)
    assert len(cascade.stages) == len(yaml.safe_load(config.read_text())["stages"]) >= 2


def test_a_bad_config_fails_while_parsing(tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs/data/ucf101.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("fold: 1", "fold: one"))
    with pytest.raises(SystemExit) as exit_info:
        WaltCLI(args=["--config", str(bad), "--model", PLACEHOLDER_MODEL], run=False)
    assert exit_info.value.code != 0
    assert "fold" in capsys.readouterr().err


def test_console_script_lists_every_command():
    walt = shutil.which("walt", path=str(Path(sys.executable).parent))
    assert walt is not None, "the walt console script is not installed"
    out = subprocess.run([walt, "--help"], capture_output=True, text=True, check=True).stdout
    for command in (*LIGHTNING_COMMANDS, *EXTRA_COMMANDS):
        assert f"  {command}" in out
    assert "predict" not in out  # generation is `walt sample`, not a predict loop
    module = subprocess.run([sys.executable, "-m", "walt", "nonsense"], capture_output=True, text=True)
    assert module.returncode == 2 and "unknown command 'nonsense'" in module.stderr
