"""`walt evaluate PROTOCOL --model`: generating and scoring in one command, on a UCF-101-shaped tree of AVI
files and a K600-shaped tree, with a tiny model (2-layer backbone, tiny tokenizer, random weights: the
protocol's machinery is under test, not the model's quality)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from _gloo import EVALUATE, run_two_processes, subprocess_env
from safetensors.torch import save_file

from walt.data import Kinetics600, read_video, to_uint8
from walt.metrics import evaluate_main, get_protocol
from walt.metrics import generated as gen
from walt.metrics.evaluate import select_units
from walt.pipeline import Pipeline
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT


def _tiny_model(folder: Path, **backbone) -> Path:
    torch.manual_seed(0)
    vae = CausalVAE(**presets["tiny"], variational=False)
    net = WALT(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=(5, 4, 4), **backbone)
    return Pipeline(net.eval(), vae.eval()).save_pretrained(folder)


def _dataset_yaml(path: Path, class_path: str, **init_args) -> Path:
    args = ", ".join(f"{k}: {v}" for k, v in init_args.items())
    path.write_text(f"dataset:\n  class_path: {class_path}\n  init_args: {{{args}}}\n")
    return path


def _ucf_yaml(path: Path, ucf_root: Path) -> Path:
    """The real side as configs/eval/ucf101_real.yaml gives it: 16 frames from the start, all splits."""
    settings = dict(root=ucf_root, split="all", num_frames=16, resolution=32, offset="start")
    return _dataset_yaml(path, "walt.data.UCF101", **settings)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ucf_root) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate_model")
    return {
        "model": _tiny_model(root / "model", num_classes=3),  # the UCF tree's 3 classes
        "real": _ucf_yaml(root / "ucf.yaml", ucf_root),
        "cache": root / "cache",
        "root": root,
    }


def _args(setup, *extra: str, batch: int = 1, num_fake: int = 3) -> list[str]:
    return [
        "fvd2048_16f", "--model", str(setup["model"]), "--real", str(setup["real"]), "--num-real", "4",
        "--num-fake", str(num_fake), "--batch-size", str(batch), "--steps", "2", "--cache-dir",
        str(setup["cache"]), "--no-progress", "--device", "cpu", *extra,
    ]  # fmt: skip


def _run(args: list[str], capsys) -> dict:
    assert evaluate_main(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def one_thread():
    """Float results on a CPU depend on the thread count; the runs compared here all use one, as the
    subprocesses (OMP_NUM_THREADS=1) do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(setup) -> dict:
    """One uninterrupted run in this process (batch size 1, 3 samples, one thread): the number to give."""
    out = setup["root"] / "reference.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert evaluate_main(_args(setup, "--output", str(out))) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_a_model_is_scored_and_the_json_says_how(setup, tmp_path, capsys):
    out = tmp_path / "fvd.json"
    result = _run(_args(setup, "--output", str(out), "--save-samples", "2", batch=2), capsys)
    assert json.loads(out.read_text()) == result
    assert result["protocol"] == "fvd2048_16f" and np.isfinite(result["value"]) and result["value"] > 0
    assert result["counts"] == {"real": 4, "fake": 3} and result["standard"] is False
    assert result["full_rank"] is False and len(result["warnings"]) == 2  # 4 and 3 samples < 400 dims
    generation = result["generation"]
    assert generation["steps"] == 2 and generation["sampler"] == "ddim" and generation["guidance"] == 1.0
    assert generation["labels"] == "data" and generation["seeds"] == "sample k has seed 0 + k"
    identity = gen.model_identity(gen.load_generator(setup["model"]))
    assert result["model"]["weights_sha256"] == identity and result["world_size"] == 1
    assert str(setup["model"]) in result["model"]["path"] and result["seconds"] > 0
    samples = Path(result["samples_dir"])
    assert sorted(p.name for p in samples.iterdir()) == ["grid.gif", "sample_000000.mp4", "sample_000001.mp4"]
    assert read_video(samples / "sample_000000.mp4").shape == (17, 32, 32, 3)
    assert not (tmp_path / "fvd.json.parts").exists()  # the finished run leaves no partial features


def test_the_same_command_twice_gives_the_same_number(setup, reference, capsys, one_thread):
    assert _run(_args(setup), capsys)["value"] == reference["value"]


def test_labels_follow_the_real_clips_of_the_seeded_selection(setup):
    """--labels data: sample k has the class of the k-th real clip the protocol selects (cycling), so the
    samples have the real split's class frequencies; --labels uniform: k mod num_classes."""
    from walt.metrics.evaluate import load_dataset_config

    real = load_dataset_config(setup["real"])
    generator = gen.load_generator(setup["model"])
    protocol = get_protocol("fvd2048_16f")
    plan = gen._plan(protocol, generator, real, 30, gen.GenerationSettings(seed=5))
    order = select_units(len(real), len(real), 5, "", "")
    assert plan.labels == [real[order[k % len(real)]]["label"] for k in range(30)]
    assert np.bincount(plan.labels[: len(real)]).tolist() == [4, 4, 4]  # the tree has 4 clips per class
    uniform = gen._plan(protocol, generator, real, 7, gen.GenerationSettings(labels="uniform"))
    assert uniform.labels == [0, 1, 2, 0, 1, 2, 0] and uniform.seeds == list(range(7))


def test_two_processes_give_the_same_number(setup, reference, tmp_path):
    """As under torchrun (2 CPU processes, gloo): each generates its own share; the number is identical."""
    run_two_processes(EVALUATE, _args(setup, "--output", str(tmp_path / "two.json")))
    result = json.loads((tmp_path / "two.json").read_text())
    assert result["value"] == reference["value"] and result["world_size"] == 2  # exact


def test_a_killed_evaluation_resumes_to_the_same_number(
    setup, reference, tmp_path, capsys, monkeypatch, one_thread
):
    """kill -9 after the first batch's features are saved; started again, the run loads them, generates only
    the rest, and gives the uninterrupted run's number."""
    work = tmp_path / "work"
    args = _args(setup, "--work-dir", str(work))
    proc = subprocess.Popen([sys.executable, "-c", EVALUATE, *args], env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(work.glob("batch-*.npy")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in work.glob("batch-*.npy"))
    assert proc.returncode == -signal.SIGKILL and done, proc.stderr.read()
    generated = []
    real_generate = gen._generate
    monkeypatch.setattr(gen, "_generate", lambda *a: generated.extend(a[3]) or real_generate(*a))
    assert _run(args, capsys)["value"] == reference["value"]
    assert len(generated) == 3 - len(done)  # batch size 1: one sample per saved batch was not regenerated
    assert not work.exists()


def test_a_work_dir_of_another_evaluation_is_refused(setup, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "identity.json").write_text('{"protocol": "another"}')
    assert evaluate_main(_args(setup, "--work-dir", str(work))) == 1
    assert "holds the features of another evaluation" in capsys.readouterr().err


def test_frame_prediction_continues_the_first_frames_of_each_real_clip(k600_root, tmp_path):
    """fvd_k600_pred: sample k is given the first 5 frames of the k-th real clip of a seeded order; decoded,
    its first 5 frames are the tokenizer's round trip of that context (the causal decoder's first frames
    depend on the given latent frames only)."""
    model = _tiny_model(tmp_path / "model", context_frames=True)
    real = Kinetics600(k600_root, split="val", num_frames=16, resolution=32, offset="start")
    generator = gen.load_generator(model)
    protocol = get_protocol("fvd_k600_pred")
    plan = gen._plan(protocol, generator, real, 2, gen.GenerationSettings(steps=2))
    assert sorted(plan.context_units) == [0, 1]
    settings = gen.GenerationSettings(steps=2)
    clips = gen._generate(protocol, generator, plan, [0, 1], settings, 2, [], gen._Timer("cpu"))
    assert [c.shape for c in clips] == [(1, 16, 32, 32, 3)] * 2  # the protocol's 16-frame clip
    for k, clip in enumerate(clips):
        context = real[plan.context_units[k]]["video"][None, :, :5]  # (1, 3, 5, 32, 32)
        with torch.no_grad():
            round_trip = generator.tokenizer.decode(generator.tokenizer.encode(context))  # (1, 3, 5, 32, 32)
        expected = to_uint8(round_trip[0]).numpy()  # (5, 32, 32, 3)
        assert np.abs(clip[0, :5].astype(int) - expected.astype(int)).max() <= 1


def test_models_a_protocol_cannot_score_are_refused_before_any_work(setup, k600_root, tmp_path, capsys):
    unconditional = _tiny_model(tmp_path / "plain")
    k600 = _dataset_yaml(tmp_path / "k.yaml", "walt.data.Kinetics600", root=k600_root, split="val",
                         num_frames=16, resolution=32, offset="start")  # fmt: skip
    shapes = _dataset_yaml(tmp_path / "s.yaml", "walt.data.SyntheticVideos", num_samples=4, num_frames=16,
                           resolution=32)  # fmt: skip
    cases = [
        (["fvd_k600_pred", "--model", str(unconditional), "--real", str(k600)], "not trained with context"),
        ([*_args(setup)[:3], "--real", str(setup["root"])], "--labels uniform"),  # a folder has no classes
        (
            ["fvd2048_16f", "--model", str(setup["model"]), "--real", str(shapes)],
            "has 48 classes and the model 3",
        ),
    ]
    for args, message in cases:
        assert evaluate_main([*args, "--num-real", "2", "--num-fake", "2", "--no-cache"]) == 1, args
        assert message in capsys.readouterr().err


def test_a_tokenizer_is_scored_on_reconstructions_of_the_real_clips(ucf_root, tmp_path, capsys):
    """rfvd2048_16f: the real side is the protocol's selection of real clips, the generated side the
    tokenizer's reconstructions of the same clips; PSNR and SSIM are those of the same clips."""
    from walt.metrics.evaluate import load_dataset_config
    from walt.metrics.pixel import psnr, ssim

    torch.manual_seed(0)
    vae = CausalVAE(**presets["tiny"], variational=False)  # what `walt encode` writes: weights + vae.yaml
    folder = tmp_path / "latents"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "vae.safetensors"))
    (folder / "vae.yaml").write_text(
        yaml.safe_dump({"class_path": "walt.tokenizer.CausalVAE", "init_args": vae.init_args})
    )
    settings = dict(root=ucf_root, split="all", num_frames=17, resolution=32, offset="start")
    real = _dataset_yaml(tmp_path / "ucf17.yaml", "walt.data.UCF101", **settings)
    args = ["rfvd2048_16f", "--model", str(folder), "--real", str(real), "--num-real", "3", "--batch-size", "2",
            "--no-cache", "--no-progress", "--device", "cpu"]  # fmt: skip
    result = _run(args, capsys)
    assert result["counts"] == {"real": 3, "fake": 3} and np.isfinite(result["value"])
    assert result["value"] > 0  # an untrained tokenizer does not reconstruct
    dataset = load_dataset_config(real)
    clips = torch.stack([dataset[i]["video"] for i in select_units(len(dataset), 3, 0, "", "")])
    with torch.no_grad():
        rec = vae.decode(vae.encode(clips)).clamp(-1, 1)
    pixel = result["pixel_metrics"]
    assert pixel["clips"] == 3
    assert pixel["psnr"] == pytest.approx(psnr(rec, clips).mean().item(), rel=1e-5)
    assert pixel["ssim"] == pytest.approx(
        ssim(rec, clips).mean().item(), rel=1e-5, abs=1e-6
    )  # SSIM near 0: a relative tolerance alone is too tight
    sixteen = _dataset_yaml(tmp_path / "ucf16.yaml", "walt.data.UCF101", **{**settings, "num_frames": 16})
    assert evaluate_main([*args[:4], str(sixteen), *args[5:]]) == 1
    assert "num_frames 1 + 4k" in capsys.readouterr().err


def test_fid_frames_scores_the_first_16_frames_of_each_generated_video(setup, capsys, monkeypatch):
    """fid_frames with a model: 16 frames = the first 16 frames of one generated 17-frame video, against the 16
    frames of one real clip."""
    args = _args(setup, "--labels", "uniform", num_fake=16)
    args[0] = "fid_frames"
    args[args.index("--num-real") + 1] = "16"
    seen = []
    real_generate = gen._generate
    monkeypatch.setattr(gen, "_generate", lambda *a: seen.extend(a[3]) or real_generate(*a))
    result = _run(args, capsys)
    assert result["counts"] == {"real": 16, "fake": 16} and result["metric"] == "FID"
    assert seen == [0] and result["generation"]["num_frames"] == 17 and np.isfinite(result["value"])


def test_first_block_caching_reaches_the_sampler_and_the_json_says_so(
    setup, reference, capsys, one_thread, monkeypatch
):
    """--cache-threshold 0 is the reference number; a threshold that caches every step after the first reaches
    Pipeline.generate (this untrained model's blocks are still the identity, so its samples are the same)."""
    off = _run(_args(setup, "--cache-threshold", "0"), capsys)
    assert off["value"] == reference["value"] and off["generation"]["cache_threshold"] == 0.0
    stats, generate = [], Pipeline.generate

    def spy(self, *args, **kwargs):
        videos = generate(self, *args, **kwargs)
        stats.append(dict(self.cache_stats))
        return videos

    monkeypatch.setattr(Pipeline, "generate", spy)
    on = _run(_args(setup, "--cache-threshold", "1e9"), capsys)
    assert on["generation"]["cache_threshold"] == 1e9 and on["value"] == reference["value"]
    assert stats and all(s == {"full": 1, "cached": 1} for s in stats)  # 2 steps per batch


def test_a_guidance_interval_reaches_the_sampler_and_the_json_says_so(setup, capsys, one_thread, monkeypatch):
    seen, generate = [], Pipeline.generate

    def spy(self, *args, **kwargs):
        seen.append((kwargs["guidance"], kwargs["guidance_interval"]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "generate", spy)
    result = _run(_args(setup, "--guidance", "2", "--guidance-interval", "0.25", "0.75"), capsys)
    assert result["generation"]["guidance_interval"] == [0.25, 0.75] and np.isfinite(result["value"])
    assert seen and all(s == (2.0, (0.25, 0.75)) for s in seen)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--guidance-interval", "0.2", "0.8"], "--guidance-interval without --guidance"),
        (
            ["--guidance", "2", "--guidance-interval", "0.8", "0.2"],
            "--guidance-interval: a guidance interval needs",
        ),
    ],
)
def test_a_guidance_interval_that_cannot_act_is_refused_while_parsing(tmp_path, capsys, extra, message):
    """Before any model or real clip is read (neither exists here)."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["fvd2048_16f", "--model", str(tmp_path / "m"), "--real", str(tmp_path / "r"), *extra])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
