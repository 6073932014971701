"""walt.pipeline: models that describe themselves, exports, per-sample seeds and the `walt sample` / `walt export`
commands, on a real `walt fit` checkpoint of the quickstart base config (2-layer backbone, tiny tokenizer)."""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import cpu_sized_config, main_exit, write_tiny_latents
from walt.cli import WaltCLI, main
from walt.data import read_video
from walt.pipeline import ModelFileError, Pipeline

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """Two steps of `walt fit` (quickstart base config, CPU-sized), run through the CLI with a command-line
    override of the backbone, which the README's old `--config` recipe could not sample."""
    folder = tmp_path_factory.mktemp("fit")
    write_tiny_latents(folder)  # 8 latents of 2 of the 8 classes, with the class names in index.json
    config = yaml.safe_load((ROOT / "configs/base/quickstart.yaml").read_text())
    config["model"]["init_args"].update(sample_steps=4, num_log_samples=0)
    config["trainer"].update(max_steps=2, check_val_every_n_epoch=None, limit_val_batches=0)
    path = cpu_sized_config(config, folder, "base.yaml", self_conditioning=True)
    old = sys.argv
    sys.argv = ["walt"]
    try:
        cli = WaltCLI(args=["fit", "--config", str(path), "--model.init_args.backbone.init_args.hidden_size", "48",
                            "--trainer.enable_progress_bar", "false"])  # fmt: skip
    finally:
        sys.argv = old
    return {"folder": folder, "config": path, "ckpt": folder / "run/checkpoints/last.ckpt", "cli": cli}


def test_a_checkpoint_describes_itself_and_samples_without_its_yaml(trained):
    """The checkpoint sits at the stable <default_root_dir>/checkpoints/last.ckpt and carries everything to
    rebuild the model: the overridden width, the tokenizer, class names, sampling defaults, the training record."""
    ckpt = trained["ckpt"]
    description = torch.load(ckpt, map_location="cpu", weights_only=True)["walt_model"]
    assert description["backbone"]["init_args"]["hidden_size"] == 48
    assert len(description["class_names"]) == 8 and description["class_names"][1] == "red circle moving right"
    assert description["sampling"]["steps"] == 4 and description["training"]["global_step"] == 2
    assert "hidden_size: 48" in description["training"]["config"]
    pipe = Pipeline.from_pretrained(ckpt)
    videos = pipe.generate(labels=["red circle moving right", 0], seeds=[3, 4], progress=False)
    assert videos.dtype == torch.uint8 and videos.shape == (2, 17, 32, 32, 3)
    live = Pipeline.from_pretrained(ckpt, weights="live")
    assert live.info["weights"] == "live" and pipe.info["weights"] == "ema"
    assert not torch.equal(
        live.generate(labels=[1], progress=False), pipe.generate(labels=[1], progress=False)
    )


@pytest.mark.parametrize("decoder", [True, False])
def test_compile_compiles_the_denoiser_and_by_default_the_decoder_in_place(trained, decoder):
    """Pipeline.compile() (walt sample --compile) compiles the backbone and, unless told not to, the tokenizer's
    decoder (its GPU test: tests/test_gpu.py), each in place: the same modules, the same state-dict keys."""
    pipe = Pipeline.from_pretrained(trained["ckpt"])
    backbone, decoder_module = pipe.backbone, pipe.tokenizer.decoder
    keys = list(pipe.backbone.state_dict()) + list(pipe.tokenizer.state_dict())
    pipe.compile(decoder=decoder)
    assert pipe.backbone is backbone and pipe.tokenizer.decoder is decoder_module
    assert backbone._compiled_call_impl is not None
    assert (decoder_module._compiled_call_impl is not None) == decoder
    assert pipe.tokenizer.encoder._compiled_call_impl is None
    assert list(pipe.backbone.state_dict()) + list(pipe.tokenizer.state_dict()) == keys


def test_export_then_load_gives_bit_identical_samples(trained, tmp_path):
    out = tmp_path / "model"
    assert main_exit(["export", "--checkpoint", str(trained["ckpt"]), "--output", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "backbone.safetensors", "model.json", "tokenizer.safetensors",
    ]  # fmt: skip
    assert "8 classes (red circle moving left" in (out / "README.md").read_text()
    kwargs = dict(labels=[0, 1, 1], seeds=[5, 6, 7], steps=3, guidance=2.0, eta=0.5, progress=False)
    from_ckpt = Pipeline.from_pretrained(trained["ckpt"]).generate(**kwargs, output="float")
    from_folder = Pipeline.from_pretrained(out).generate(**kwargs, output="float")
    assert torch.equal(from_ckpt, from_folder)
    # saved again from the loaded pipeline: the same files' content
    again = Pipeline.from_pretrained(out).save_pretrained(tmp_path / "again")
    assert json.loads((again / "model.json").read_text()) == json.loads((out / "model.json").read_text())


def test_an_exported_folder_and_its_files_get_the_umasks_mode(trained, tmp_path):
    """Not mkdtemp's 0700 and safetensors' 0600: a model folder others on the machine may read, as mkdir and open
    would make it."""
    old = os.umask(0o022)
    try:
        out = Pipeline.from_pretrained(trained["ckpt"]).save_pretrained(tmp_path / "model")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        p.name: 0o644 for p in out.iterdir()
    }


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_per_sample_seeds_give_the_same_video_at_any_batch_size(trained, eta):
    """Sample k's noise (initial and per step) comes from seed k alone: batches of 1 and of 4 agree."""
    pipe = Pipeline.from_pretrained(trained["ckpt"])
    kwargs = dict(
        labels=[0, 1, 0, 1], seeds=[10, 11, 12, 13], steps=3, eta=eta, progress=False, output="latent"
    )
    whole = pipe.generate(**kwargs, batch_size=4)
    single = pipe.generate(**kwargs, batch_size=1)
    torch.testing.assert_close(whole, single, rtol=0, atol=1e-5)  # kernels at another batch size: rounding
    alone = pipe.generate(labels=[1], seeds=[13], steps=3, eta=eta, progress=False, output="latent")
    torch.testing.assert_close(whole[3:], alone, rtol=0, atol=1e-5)
    assert not torch.allclose(whole[0], whole[2])  # same class, other seed: another video


def test_samples_across_two_processes_equal_one_process(trained, tmp_path):
    """Two gloo processes each generate their share of the seeds (every other one) and gather them: the same
    videos as one process."""
    script = tmp_path / "gen.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from walt.pipeline import Pipeline\n"
        "dist.init_process_group('gloo'); rank, world = dist.get_rank(), dist.get_world_size()\n"
        "seeds = list(range(6))[rank::world]\n"
        f"pipe = Pipeline.from_pretrained({str(trained['ckpt'])!r})\n"
        "videos = pipe.generate(labels=[s % 2 for s in seeds], seeds=seeds, steps=3, eta=1.0, progress=False,"
        " output='latent')\n"
        "parts = [None] * world; dist.all_gather_object(parts, videos)\n"
        "if rank == 0: torch.save(parts, sys.argv[1])\n"
        "dist.destroy_process_group()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path / "p.pt"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = torch.load(tmp_path / "p.pt")
    gathered = torch.stack([parts[s % 2][s // 2] for s in range(6)])
    one = Pipeline.from_pretrained(trained["ckpt"]).generate(
        labels=[s % 2 for s in range(6)],
        seeds=list(range(6)),
        steps=3,
        eta=1.0,
        progress=False,
        output="latent",
    )
    torch.testing.assert_close(gathered, one, rtol=0, atol=1e-5)  # kernels at another batch size: rounding


class Payload:
    """Unpickling this runs ``touch <path>``: a stand-in for malicious code."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("name", ["last.ckpt", "backbone.safetensors"])
def test_a_malicious_pickle_posing_as_a_model_file_is_refused_unrun(trained, tmp_path, name):
    marker = tmp_path / "payload_ran"
    model = tmp_path / "model"
    if name.endswith(".safetensors"):
        Pipeline.from_pretrained(trained["ckpt"]).save_pretrained(model)
        target = model / name
    else:
        target = tmp_path / name
    target.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    with pytest.raises(ModelFileError, match="not"):
        Pipeline.from_pretrained(model if name.endswith(".safetensors") else target)
    assert not marker.exists()


def test_walt_sample_from_a_model_records_how_each_file_was_made(trained, tmp_path, capsys):
    out = tmp_path / "samples"
    args = ["sample", "--model", str(trained["ckpt"]), "--output", str(out), "--class", "red circle moving right",
            "--num-samples", "2", "--steps", "2", "--sampler", "ddim", "--eta", "0.5", "--seed", "7", "--device", "cpu"]  # fmt: skip
    assert main_exit(args) == 0
    index = json.loads((out / "samples.json").read_text())
    assert [e["seed"] for e in index] == [7, 8] and {e["class_name"] for e in index} == {
        "red circle moving right"
    }
    assert all(e["steps"] == 2 and e["eta"] == 0.5 and e["sampler"] == "ddim" for e in index)
    assert read_video(out / index[0]["file"]).shape == (17, 32, 32, 3)
    # the same seed regenerates the same file; a second run never mixes into the old folder
    with pytest.raises(SystemExit, match="not empty"):
        main(args)
    assert main_exit([*args, "--overwrite"]) == 0
    # bad values are refused with the fix
    with pytest.raises(SystemExit, match="unknown class 'purple'"):
        main([*args[:-1], "cpu", "--overwrite", "--class", "purple"])
    capsys.readouterr()
    assert main_exit([*args, "--overwrite", "--guidance", "nan"]) == 2  # refused while parsing
    assert "argument --guidance: must be a finite number, got 'nan'" in capsys.readouterr().err


def test_walt_sample_with_first_block_caching_says_and_records_how_many_passes_it_reused(
    trained, tmp_path, capsys
):
    out = tmp_path / "cached"
    args = ["sample", "--model", str(trained["ckpt"]), "--output", str(out), "--num-samples", "2", "--steps", "3",
            "--cache-threshold", "1e9", "--device", "cpu"]  # fmt: skip
    assert main_exit(args) == 0
    assert "first-block cache: 2 of 3 passes reused" in capsys.readouterr().err
    index = json.loads((out / "samples.json").read_text())
    assert all(e["cache_threshold"] == 1e9 and e["cache_stats"] == {"full": 1, "cached": 2} for e in index)


def test_a_guidance_interval_guides_only_the_steps_inside_it(trained, tmp_path, capsys):
    """(0, 1] holds every DDIM step: the same samples as guiding everywhere. An interval that holds none is
    guidance 1, the conditional model. One that holds some is neither. walt sample records it."""
    pipe = Pipeline.from_pretrained(trained["ckpt"])
    kwargs = dict(labels=[0, 1], seeds=[5, 6], steps=4, output="latent", progress=False)
    everywhere = pipe.generate(**kwargs, guidance=3.0)
    assert torch.equal(pipe.generate(**kwargs, guidance=3.0, guidance_interval=(0.0, 1.0)), everywhere)
    nowhere = pipe.generate(**kwargs, guidance=3.0, guidance_interval=(0.0, 0.1))  # steps at t = 1 .. 0.25
    assert torch.equal(nowhere, pipe.generate(**kwargs, guidance=1.0))
    first = pipe.generate(**kwargs, guidance=3.0, guidance_interval=(0.9, 1.0))  # the step at t = 1 only
    assert not torch.equal(first, everywhere) and not torch.equal(
        first, nowhere
    )  # (a tiny model: small effects)
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        pipe.generate(**kwargs, guidance=3.0, guidance_interval=(0.8, 0.3))
    out = tmp_path / "interval"
    assert main_exit(["sample", "--model", str(trained["ckpt"]), "--output", str(out), "--num-samples", "1",
                      "--steps", "2", "--guidance", "2", "--guidance-interval", "0.3", "0.8", "--device", "cpu"]) == 0  # fmt: skip
    assert json.loads((out / "samples.json").read_text())[0]["guidance_interval"] == [0.3, 0.8]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fps", "0"], "argument --fps: must be a finite number > 0, got 0"),
        (["--steps", "0"], "argument --steps: must be >= 1, got 0"),
        (["--num-samples", "-3"], "argument --num-samples: must be >= 1, got -3"),
        (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["--extend", "-1"], "argument --extend: must be >= 0, got -1"),
        (["--context", "missing.mp4"], "--context missing.mp4: no such file"),
        (["--cache-threshold", "-0.1"], "argument --cache-threshold: must be a finite number >= 0, got -0.1"),
        (
            ["--guidance", "2", "--guidance-interval", "0.8", "0.2"],
            "--guidance-interval: a guidance interval needs",
        ),
        (["--guidance-interval", "0.2", "0.8"], "--guidance-interval without --guidance"),
    ],
)
def test_walt_sample_refuses_out_of_range_values_while_parsing(tmp_path, capsys, extra, message):
    """Before the model is even looked for (it does not exist here), let alone sampled from: --fps 0 used to
    fail only once the videos were generated, and --steps 0 was recorded as the model's default."""
    args = ["sample", "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "out"), *extra]
    assert main_exit(args) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_walt_sample_refuses_context_for_a_model_without_context_frames_before_sampling(trained, tmp_path):
    context = tmp_path / "context.mp4"
    context.write_bytes(b"never read")
    args = [
        "sample",
        "--model",
        str(trained["ckpt"]),
        "--output",
        str(tmp_path / "out"),
        "--context",
        str(context),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert (
        exit_info.value.code
        == "walt sample: --context given but the model was not trained with context frames"
    )


def test_walt_sample_overwrites_what_a_killed_run_left_but_nothing_else(trained, tmp_path):
    """A killed run leaves videos and a hidden temporary file but no samples.json: --overwrite replaces them
    (it used to refuse that folder as "not walt samples"); a folder with a file of another kind stays refused."""
    out = tmp_path / "samples"
    out.mkdir()
    (out / "sample_000_class0.mp4").write_bytes(b"a finished video")
    (out / ".sample_001_class1.mp4.0badc0de.tmp").write_bytes(b"half a video")
    args = [
        "sample",
        "--model",
        str(trained["ckpt"]),
        "--output",
        str(out),
        "--num-samples",
        "1",
        "--steps",
        "1",
    ]
    assert main_exit([*args, "--device", "cpu", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.gif", "sample_000_class0.mp4", "samples.json"]
    (out / "samples.json").unlink()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="holds files that are not walt samples"):
        main([*args, "--device", "cpu", "--overwrite"])


def test_a_refused_walt_sample_creates_no_folder_and_keeps_the_earlier_samples(trained, tmp_path):
    """A setting refused after the model has loaded (a class it does not have) used to leave an empty output
    folder behind, and with --overwrite it had already removed the earlier run's samples."""
    base = [
        "sample",
        "--model",
        str(trained["ckpt"]),
        "--num-samples",
        "1",
        "--steps",
        "1",
        "--device",
        "cpu",
    ]
    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit, match="unknown class 'purple'"):
        main([*base, "--output", str(fresh), "--class", "purple"])
    assert not fresh.exists()
    kept = tmp_path / "kept"
    assert main_exit([*base, "--output", str(kept)]) == 0
    before = {p.name: p.read_bytes() for p in kept.iterdir()}
    with pytest.raises(SystemExit, match="unknown class 'purple'"):
        main([*base, "--output", str(kept), "--overwrite", "--class", "purple"])
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before


def test_walt_sample_errors_are_one_line_without_a_traceback(trained, tmp_path):
    """As the command runs, in its own process: a class the model does not have."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        "--model",
        str(trained["ckpt"]),
        "--output",
        str(tmp_path / "out"),
        "--class",
        "purple",
        "--device",
        "cpu",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "walt", "sample", *args], env=env, capture_output=True, text=True
    )
    assert done.returncode == 1
    [line] = [
        ln for ln in done.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln
    ]
    assert line.startswith("walt sample: unknown class 'purple'; known classes: red circle moving left")


def test_the_cli_lists_what_works(capsys):
    assert main_exit(["--version"]) == 0 and capsys.readouterr().out.startswith("walt ")
    assert main_exit(["--help"]) == 0
    listing = capsys.readouterr().out
    assert "export" in listing and "predict" not in listing
    assert main_exit(["predict"]) == 2 and "walt sample" in capsys.readouterr().err


def test_walt_test_reports_the_test_loss(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["walt"])
    config = yaml.safe_load(trained["config"].read_text())
    config["data"]["init_args"]["test"] = config["data"]["init_args"]["val"]
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = WaltCLI(args=["test", "--config", str(path), "--ckpt_path", str(trained["ckpt"]),
                        "--model.init_args.backbone.init_args.hidden_size", "48"])  # fmt: skip
    assert cli.trainer.callback_metrics["test/loss"] > 0


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A freshly built model predicts zeros (zero-initialized outputs): random weights everywhere make every
    input (labels, low-res video) matter, which is what plumbing tests need."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return module.eval().requires_grad_(False)  # as loaded models are: kernels differ with requires_grad


def _tiny_cascade():
    from walt.pipeline import CascadePipeline, SuperResolution
    from walt.tokenizer import CausalVAE, presets
    from walt.transformer import WALT

    small = dict(in_channels=4, depth=2, hidden_size=32, num_heads=2, num_classes=2)
    base = Pipeline(
        _perturbed(WALT(input_size=(2, 2, 2), self_conditioning=True, **small), 0),
        _perturbed(CausalVAE(**presets["tiny"], variational=False), 1),
        class_names=["left", "right"], sample_steps=3,
    )  # fmt: skip
    sr = Pipeline(
        _perturbed(WALT(input_size=(2, 4, 4), patch_size=2, lowres=True, **small), 2),
        _perturbed(CausalVAE(**presets["tiny"], variational=False), 3),
        sample_steps=2, super_resolution=SuperResolution(spatial_factor=2, aug_level=0.2),
    )  # fmt: skip
    return CascadePipeline([base, sr], [{"guidance": 2.0}, {"eta": 1.0}])


def test_cascade_passes_labels_and_seeds_to_every_stage_and_exports_as_one_folder(tmp_path):
    """The cascade equals running its stages by hand: the base at its settings, then the SR stage on the base's
    videos with the same labels and seeds offset per stage; saved and loaded as one folder, it gives the same
    videos; labels change the SR stage's output (they reach it)."""
    from walt.pipeline import CascadePipeline
    from walt.pipeline.pipeline import STAGE_SEED_STRIDE

    cascade = _tiny_cascade()
    base, sr = cascade.stages
    out = cascade.generate(labels=["right", 0], seeds=[4, 5], output="float", progress=False)
    low = base.generate(labels=[1, 0], seeds=[4, 5], guidance=2.0, output="float", progress=False)
    by_hand = sr.generate(labels=[1, 0], lowres=low, seeds=[4 + STAGE_SEED_STRIDE, 5 + STAGE_SEED_STRIDE],
                          eta=1.0, output="float", progress=False)  # fmt: skip
    assert out.shape == (2, 3, 5, 32, 32) and torch.equal(out, by_hand)
    other = sr.generate(labels=[0, 1], lowres=low, seeds=[4 + STAGE_SEED_STRIDE, 5 + STAGE_SEED_STRIDE],
                        eta=1.0, output="float", progress=False)  # fmt: skip
    assert not torch.allclose(other, by_hand)
    folder = cascade.save_pretrained(tmp_path / "cascade")
    loaded = CascadePipeline.from_pretrained(folder)
    assert loaded.stage_settings == [{"guidance": 2.0}, {"eta": 1.0}]
    assert torch.equal(loaded.generate(labels=[1, 0], seeds=[4, 5], output="float", progress=False), out)
    with pytest.raises(ModelFileError, match="is a cascade"):
        Pipeline.from_pretrained(folder)


def test_cascade_yaml_names_each_stage_model_and_errors_name_the_fix(tmp_path):
    from walt.pipeline import CascadePipeline

    cascade = _tiny_cascade()
    for i, stage in enumerate(cascade.stages):
        stage.save_pretrained(tmp_path / f"s{i}")
    good = {
        "stages": [
            {"model": str(tmp_path / "s0"), "guidance": 2.0},
            {"model": str(tmp_path / "s1"), "eta": 1.0},
        ]
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(good))
    loaded = CascadePipeline.from_pretrained(tmp_path / "c.yaml")
    assert torch.equal(
        loaded.generate(labels=[1], seeds=[0], output="float", progress=False),
        cascade.generate(labels=[1], seeds=[0], output="float", progress=False),
    )
    for stages, message in (
        ([{"model": str(tmp_path / "s0"), "stepz": 3}], "unknown keys"),
        ([{"model": str(tmp_path / "s0"), "aug_level": 0.1}], "stage 0 is the base model"),
        ([{"model": str(tmp_path / "s1")}], "starts with a base model"),
        ([{"steps": 3}], "needs 'model'"),
    ):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"stages": stages}))
        with pytest.raises(ModelFileError, match=message):
            CascadePipeline.from_pretrained(tmp_path / "bad.yaml")


def test_generate_refuses_bad_values_before_any_work():
    base = _tiny_cascade().stages[0]
    for kwargs, message in (
        (dict(guidance=float("nan")), "guidance must be a finite number"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(sampler="euler"), "unknown sampler 'euler'"),
        (dict(num_frames=8), "1 \\+ 4k"),
        (dict(labels=[0, 1], seeds=[1, 2, 3]), "counts disagree"),
        (dict(labels=[5]), "outside 0..1"),
        (dict(labels=["up"]), "unknown class 'up'; known classes: left, right"),
        (dict(prompts=["a"]), "not text-conditional"),
        (dict(context=torch.zeros(5, 16, 16, 3, dtype=torch.uint8)), "not trained with context frames"),
        (dict(height=20), "multiple of 8"),
    ):
        with pytest.raises(ValueError, match=message):
            base.generate(progress=False, **kwargs)


def test_load_from_checkpoint_rebuilds_the_training_module_without_its_yaml(trained):
    """Lightning's own entry point works too: the module is rebuilt from the description, EMA included."""
    from walt.lightning import BaseDiffusionModule

    module = BaseDiffusionModule.load_from_checkpoint(trained["ckpt"])
    assert module.backbone.hidden_size == 48 and module.ema is not None and module.sample_steps == 4
    state = torch.load(trained["ckpt"], map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    assert module.class_names[1] == "red circle moving right"
    kwargs = dict(labels=[1], seeds=[2], steps=2, progress=False, output="float")
    assert torch.equal(
        module.pipeline().generate(**kwargs), Pipeline.from_pretrained(trained["ckpt"]).generate(**kwargs)
    )


def test_a_wrapped_part_is_described_as_what_it_wraps():
    """Under FSDP the backbone is a wrapper whose `.module` is the WALT: checkpoints still describe the WALT."""
    from walt.pipeline.parts import describe_part
    from walt.transformer import WALT

    class Wrapper(torch.nn.Module):  # FSDP's wrappers expose the wrapped module as `.module`
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    net = WALT(in_channels=4, depth=1, hidden_size=16, num_heads=2, input_size=(2, 2, 2))
    assert describe_part("backbone", Wrapper(net)) == describe_part("backbone", net)
    with pytest.raises(TypeError, match="cannot be saved as the backbone"):
        describe_part("backbone", torch.nn.Linear(2, 2))


def test_a_cascade_caches_per_stage_and_walt_sample_counts_every_stage(tmp_path):
    """cache_threshold is a stage setting: it survives saving the cascade, only the stage that sets it caches,
    and the counts walt sample prints and records add up over the stages; one threshold for a whole cascade is
    refused by walt evaluate, whose JSON would otherwise claim it."""
    from walt.metrics.generated import GenerationSettings, evaluate_model
    from walt.pipeline import CascadePipeline
    from walt.sample import _cache_stats

    cascade = _tiny_cascade()
    cascade.stage_settings[1]["cache_threshold"] = 1e9
    loaded = CascadePipeline.from_pretrained(cascade.save_pretrained(tmp_path / "cascade"))
    assert loaded.stage_settings[1] == {"eta": 1.0, "cache_threshold": 1e9}
    loaded.generate(labels=[1, 0], seeds=[4, 5], output="float", progress=False)
    base, sr = loaded.stages
    assert base.cache_stats == {"full": 0, "cached": 0} and sr.cache_stats == {"full": 1, "cached": 1}
    assert _cache_stats(loaded) == {"full": 1, "cached": 1} and _cache_stats(base) is None
    with pytest.raises(ValueError, match="a cascade sets cache_threshold per stage"):
        evaluate_model("fvd2048_16f", loaded, "unused", settings=GenerationSettings(cache_threshold=0.1))


def test_a_cascade_checks_each_stages_guidance_interval_before_any_stage_samples():
    """A stage setting read from YAML or JSON is a list; a wrong one is refused when the cascade is built, naming
    the stage, not after the base stage has sampled."""
    from walt.pipeline import CascadePipeline

    cascade = _tiny_cascade()
    stages = cascade.stages
    CascadePipeline(stages, [{"guidance": 2.0, "guidance_interval": [0.2, 0.8]}, {}])  # accepted
    with pytest.raises(ValueError, match=r"stage 1: a guidance interval needs 0 <= lo < hi <= 1"):
        CascadePipeline(stages, [{}, {"guidance": 2.0, "guidance_interval": [0.8, 0.2]}])
    with pytest.raises(ValueError, match="stage 0: guidance_interval with guidance 1 guides nowhere"):
        CascadePipeline(stages, [{"guidance_interval": [0.2, 0.8]}, {}])
    with pytest.raises(ValueError, match="stage 1: a guidance interval is two diffusion times"):
        CascadePipeline(stages, [{}, {"guidance": 2.0, "guidance_interval": 0.5}])


def test_a_guidance_distilled_model_refuses_a_guidance_interval_with_the_fix():
    from walt.tokenizer import CausalVAE, presets
    from walt.transformer import WALT

    backbone = WALT(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=(2, 4, 4), num_classes=3,
                    guidance_input=True)  # fmt: skip
    pipe = Pipeline(backbone, CausalVAE(**presets["tiny"]))
    with pytest.raises(ValueError, match=r"takes w as an input: leave out the interval"):
        pipe.generate(labels=[0], guidance=2.0, guidance_interval=(0.2, 0.8), progress=False)
