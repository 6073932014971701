"""`walt serve` without a browser: the form follows the model, good values give an MP4, bad values are refused
with a message (and the server goes on), concurrent requests wait in the queue. The page in a real browser is
tests/test_serve_browser.py."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._tiny_models import tiny_pipeline
from walt.data import read_video, write_video
from walt.serve import BadValue, Form, VideoServer, load_adapters, parse_adapter, serve_main


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> VideoServer:
    return VideoServer(tiny_pipeline(), tmp_path_factory.mktemp("videos"), max_steps=50, name="tiny")


def test_the_form_shows_only_what_the_model_takes():
    classes = Form.of(tiny_pipeline())
    assert classes.classes[1] == ("red circle moving right", "1") and classes.classes[-1][1] == "-1"
    assert not classes.text and not classes.context and classes.guidance
    assert (classes.frames, classes.height, classes.width, classes.steps) == (17, 32, 32, 2)
    text = Form.of(tiny_pipeline(classes=False, text=True))
    assert text.classes is None and text.text and not text.context and text.guidance
    context = Form.of(tiny_pipeline(classes=False, context=True))
    assert context.context and not context.text and context.classes is None
    unconditional = Form.of(tiny_pipeline(classes=False))
    assert not unconditional.guidance and "nothing (unconditional)" in unconditional.summary()


@pytest.mark.parametrize(
    "kind, shown",
    [
        (dict(), ["class", "steps", "guidance", "seed", "sampler", "eta"]),
        (dict(classes=False, text=True), ["prompt", "steps", "guidance", "seed", "sampler", "eta"]),
        (dict(classes=False, context=True), ["context", "context-frames", "steps", "guidance", "seed", "sampler", "eta"]),
        (dict(classes=False), ["steps", "seed", "sampler", "eta"]),
    ],
)  # fmt: skip
def test_the_page_has_an_input_for_each_thing_the_model_takes_and_no_other(tmp_path, kind, shown):
    pytest.importorskip("gradio")
    from walt.serve import build_page

    config = build_page(VideoServer(tiny_pipeline(**kind), tmp_path)).get_config_file()
    ids = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
    inputs = [ids[i].removeprefix("walt-") for i in config["dependencies"][0]["inputs"]]
    assert inputs == shown


def test_a_generation_gives_a_playable_mp4_named_after_its_settings(server):
    first = server.generate(label="red circle moving right", steps=2, seed=3, guidance=2.0)
    assert first.path.name == "walt_red_circle_moving_right_seed3.mp4"
    assert "class 'red circle moving right', seed 3, 2 ddim steps, guidance 2" in first.description
    frames = read_video(first.path)
    assert frames.shape == (17, 32, 32, 3) and frames.dtype == np.uint8
    again = server.generate(label="1", steps=2.0, seed=3.0, guidance=2)  # as the page sends numbers
    assert again.path != first.path and again.path.read_bytes() == first.path.read_bytes()
    other = server.generate(label=0, steps=2, seed=3, guidance=2.0, sampler="dpmpp_2m")
    assert other.path.read_bytes() != first.path.read_bytes()
    assert server.generate(label="-1", steps=1).path.name == "walt_unconditional_seed0.mp4"
    assert server.generate(label=0, steps=1, seed=2**62 + 1).path.name.endswith(f"_seed{2**62 + 1}.mp4")


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(steps=0), "steps must be a whole number from 1 to 50, got 0"),
        (dict(steps=51), "steps must be a whole number from 1 to 50, got 51"),
        (dict(steps=2.5), "steps must be a whole number"),
        (dict(steps=""), "steps: give a whole number"),
        (dict(guidance=-1.0), "guidance must be a number >= 0 (1 = no guidance), got -1.0"),
        (dict(guidance=float("nan")), "guidance must be a number >= 0"),
        (dict(seed=-1), "seed must be a whole number from 0"),
        (dict(seed=None), "seed: give a whole number"),
        (dict(label="3"), "class index 3 is outside 0..2 (-1 = unconditional)"),
        (dict(label=7.0), "class index 7 is outside 0..2"),
        (dict(label="purple square"), "unknown class 'purple square'; known classes: red circle moving left"),
        (dict(label=""), "choose a class"),
        (dict(sampler="euler"), "unknown sampler 'euler': choose one of ddim, ddpm, dpmpp_2m"),
        (dict(eta=-0.5), "eta must be a number >= 0"),
        (dict(sampler="dpmpp_2m", eta=0.5), "dpmpp_2m is deterministic"),
    ],
)
def test_bad_values_are_refused_with_a_message_and_the_server_goes_on(server, values, message):
    good = dict(label="1", steps=1, seed=0)
    with pytest.raises(BadValue) as refused:
        server.generate(**{**good, **values})
    assert message in str(refused.value)
    assert server.generate(**good).path.is_file()


def test_a_text_model_refuses_an_empty_prompt(tmp_path):
    server = VideoServer(tiny_pipeline(classes=False, text=True), tmp_path)
    for empty in ("", "   ", None):
        with pytest.raises(BadValue, match="the prompt is empty"):
            server.generate(prompt=empty, steps=1)
    made = server.generate(prompt="a red circle moving right", steps=1, guidance=3.0)
    assert made.path.name == "walt_a_red_circle_moving_right_seed0.mp4"
    assert "prompt 'a red circle moving right'" in made.description


def test_a_context_model_checks_the_clip_it_is_given(tmp_path):
    server = VideoServer(tiny_pipeline(classes=False, context=True), tmp_path / "videos")
    clip = write_video(tmp_path / "clip.mp4", np.full((3, 32, 32, 3), 128, np.uint8))
    with pytest.raises(BadValue, match="the context has 3 frames, fewer than context_frames=5"):
        server.generate(context=str(clip), context_frames=5, steps=1)
    with pytest.raises(BadValue, match=r"context_frames must be 1 \+ 4j"):
        server.generate(context=str(clip), context_frames=2, steps=1)
    with pytest.raises(BadValue, match="is a still image"):
        server.generate(context=str(_png(tmp_path / "photo.mp4")), context_frames=1, steps=1)
    made = server.generate(context=str(clip), context_frames=1, steps=1)
    assert "1 context frames of clip.mp4" in made.description
    assert server.generate(steps=1).path.is_file()  # the context is optional


def test_a_super_resolution_stage_is_refused(tmp_path):
    from walt.pipeline import SuperResolution
    from walt.tokenizer import CausalVAE, presets
    from walt.transformer import WALT

    sr = tiny_pipeline(classes=False)
    sr.backbone = WALT(in_channels=4, depth=1, hidden_size=32, num_heads=2, input_size=(2, 4, 4), lowres=True)
    sr.tokenizer = CausalVAE(**presets["tiny"], variational=False)
    sr.super_resolution = SuperResolution()
    with pytest.raises(ValueError, match="this is a super-resolution stage"):
        VideoServer(sr, tmp_path)


def test_adapters_are_loaded_in_order_with_their_scales():
    assert parse_adapter("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert parse_adapter("style.safetensors") == ("style.safetensors", 1.0)
    assert parse_adapter("runs:3/adapter") == ("runs:3/adapter", 1.0)  # a colon inside the path

    class Loads:
        def __init__(self) -> None:
            self.loaded: list[tuple[str, float]] = []

        def load_adapter(self, path: str, scale: float = 1.0) -> None:
            self.loaded.append((path, scale))

    pipeline = Loads()
    load_adapters(pipeline, [("a", 0.5), ("b", 1.0)])
    assert pipeline.loaded == [("a", 0.5), ("b", 1.0)]
    with pytest.raises(SystemExit, match="needs adapter support"):
        load_adapters(object(), [("a", 1.0)])


def test_a_real_adapter_adds_its_class_to_the_page_and_changes_the_video(tmp_path):
    """--adapter through the real Pipeline.load_adapter (walt.lora): the adapter's new class is offered and
    generates; at scale 0 an old class's video is the base model's, at scale 1 it is not."""
    pytest.importorskip("peft")
    from tests.test_lora import trained_adapter
    from walt.lora import LoRASpec, write_adapter

    tensors, description = trained_adapter(tiny_pipeline().backbone, LoRASpec(rank=4, new_classes=("horse",)))
    path = write_adapter(tmp_path / "horse.safetensors", tensors, description)
    videos = {}
    for scale in (0.0, 1.0):
        pipeline = tiny_pipeline()
        load_adapters(pipeline, [(str(path), scale)])
        server = VideoServer(pipeline, tmp_path / f"videos{scale}", max_steps=50, name="tiny")
        assert ("horse", str(len(pipeline.class_names) - 1)) in Form.of(pipeline).classes
        assert server.generate(label="horse", steps=2, seed=0).path.is_file()
        videos[scale] = read_video(server.generate(label="red circle moving right", steps=2, seed=0).path)
    base = VideoServer(tiny_pipeline(), tmp_path / "base", max_steps=50, name="tiny")
    plain = read_video(base.generate(label="red circle moving right", steps=2, seed=0).path)
    assert np.array_equal(videos[0.0], plain) and not np.array_equal(videos[1.0], plain)


def test_walt_serve_refuses_bad_options_in_one_line(tmp_path, capsys):
    pytest.importorskip("gradio")
    with pytest.raises(SystemExit, match="walt serve: no model at"):
        serve_main(["--model", str(tmp_path / "missing")])
    for option, message in (
        (["--port", "70000"], "argument --port: must be <= 65535, got 70000"),
        (["--device", "gpu"], "argument --device: not a device: 'gpu'"),
        (["--adapter", "a.safetensors:inf"], "the scale of 'a.safetensors:inf' must be a finite number"),
    ):
        with pytest.raises(SystemExit):
            serve_main(["--model", str(tmp_path), *option])
        assert message in capsys.readouterr().err


def test_the_page_runs_one_generation_at_a_time_and_a_full_queue_says_so(server):
    """Through Gradio itself (its Python client, no browser), with a queue of 1: while one user's video is being
        made, the next user waits in the queue (not on the model) and a third is told the queue is full; then both
        get their videos. A refused value comes back as its message, escaped (Gradio shows messages as HTML), and so
    does a failure inside the model; the page goes on serving."""
    pytest.importorskip("gradio")
    from gradio_client import Client
    from gradio_client.utils import Status

    from walt.serve import build_page

    started, release = threading.Event(), threading.Event()
    generate = server.pipeline.generate

    def held(*args, **kwargs) -> torch.Tensor:
        started.set()
        release.wait(timeout=120)
        return generate(*args, **kwargs)

    page = build_page(server, queue_size=1)
    port = _free_port()
    page.launch(server_port=port, prevent_thread_lock=True, quiet=True)
    server.pipeline.generate = held
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False)
        # the page's inputs in order: class, steps, guidance, seed, sampler, eta
        first = client.submit("1", 2, 1.0, 0, "ddim", 0.0, api_name="/generate")
        assert started.wait(timeout=60)
        second = client.submit("1", 2, 1.0, 1, "ddim", 0.0, api_name="/generate")
        _wait_for(lambda: second.status().code == Status.IN_QUEUE)
        third = client.submit("1", 2, 1.0, 2, "ddim", 0.0, api_name="/generate")
        with pytest.raises(Exception, match="Queue is full"):
            third.result(timeout=60)
        assert second.status().code == Status.IN_QUEUE  # still waiting: the model is busy with the first
        release.set()
        for seed, job in enumerate((first, second)):
            video, mp4, made = job.result(timeout=120)
            video = (
                video["video"] if isinstance(video, dict) else video
            )  # the client's form varies by version
            assert Path(video).read_bytes()[4:8] == b"ftyp" and Path(mp4).suffix == ".mp4"
            assert f"seed {seed}" in made
        with pytest.raises(Exception, match=r"unknown class '&lt;b&gt;x&lt;/b&gt;'"):
            client.predict("<b>x</b>", 2, 1.0, 0, "ddim", 0.0, api_name="/generate")
        server.pipeline.generate = _fails
        with pytest.raises(Exception, match="generation failed: RuntimeError: out of memory"):
            client.predict("0", 1, 1.0, 0, "ddim", 0.0, api_name="/generate")
        server.pipeline.generate = generate
        assert client.predict("0", 1, 1.0, 0, "ddim", 0.0, api_name="/generate")[2].startswith("class")
    finally:
        release.set()
        server.pipeline.generate = generate
        page.close()


def _fails(*args, **kwargs):
    raise RuntimeError("out of memory")


def _wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path, format="PNG")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
