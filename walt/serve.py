"""``walt serve``: a web page that generates videos from a trained model (Gradio).

    walt serve --model models/quickstart                      # http://127.0.0.1:7860
    walt serve --model models/ucf101 --device cuda --bf16 --host 0.0.0.0 --port 8080
    walt serve --model models/base --adapter adapters/style.safetensors:0.8

The page shows only what the model takes, as its model folder describes it: a class (by name or index) for a
class-conditional model, a prompt for a text-to-video model, a context image or clip for a model trained with
context frames; then steps, guidance, seed and sampler. Each generation gives one video, shown in the page and
offered as an MP4. A bad value (0 steps, negative guidance, a class the model does not have, an empty prompt, a
context clip too short) is refused with a message in the page; the server keeps serving.

Generations wait in one queue and run one at a time on the one model (``--queue-size`` bounds the waiting
line; a user who arrives when it is full is told so). Needs the ``serve`` extra: ``pip install 'walt[serve]'``.
"""

from __future__ import annotations

import argparse
import atexit
import html
import math
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from walt.checks import int_at_least
from walt.diffusion import SAMPLERS
from walt.pipeline import ModelFileError, Pipeline

__all__ = [
    "BadValue",
    "Form",
    "Result",
    "VideoServer",
    "build_page",
    "load_adapters",
    "parse_adapter",
    "serve_main",
]

UNCONDITIONAL = "-1"  # the class choice that samples without a class (the null label)
CONTEXT_TYPES = [".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif", ".png", ".jpg", ".jpeg", ".bmp", ".webp"]
MAX_SEED = 2**63 - 1


class BadValue(ValueError):
    """A setting the page refuses, with the message shown to the user."""


@dataclass(frozen=True)
class Form:
    """What a model takes, hence which inputs the page shows."""

    classes: list[tuple[str, str]] | None  # (shown name, value) per class; None: not class-conditional
    text: bool  # a prompt (text-to-video)
    context: bool  # a context image or clip (frame prediction, image-to-video)
    guidance: bool  # classifier-free guidance applies (some conditioning to guide by)
    steps: int  # the model's own number of sampling steps
    frames: int
    height: int
    width: int
    fps: float

    @classmethod
    def of(cls, pipeline: Pipeline) -> Form:
        backbone = pipeline.backbone
        classes = None
        if backbone.num_classes is not None:
            names = pipeline.class_names or [f"class {i}" for i in range(backbone.num_classes)]
            classes = [(name, str(i)) for i, name in enumerate(names)] + [("unconditional", UNCONDITIONAL)]
        t, h, w = backbone.input_size
        space, time_ = pipeline.tokenizer.spatial_factor, pipeline.tokenizer.temporal_factor
        return cls(
            classes=classes,
            text=backbone.text_dim is not None,
            context=bool(backbone.context_frames),
            guidance=backbone.num_classes is not None
            or backbone.text_dim is not None
            or bool(backbone.context_frames)
            or bool(backbone.guidance_input),
            steps=pipeline.sample_steps,
            frames=1 + time_ * (t - 1),
            height=h * space,
            width=w * space,
            fps=pipeline.fps,
        )

    def summary(self) -> str:
        takes = []
        if self.classes is not None:
            takes.append(f"{len(self.classes) - 1} classes")
        if self.text:
            takes.append("a prompt")
        if self.context:
            takes.append("a context image or clip")
        conditioning = " and ".join(takes) if takes else "nothing (unconditional)"
        return (
            f"{self.frames} frames of {self.height}x{self.width} at {self.fps:g} fps; takes {conditioning}; "
            f"{self.steps} sampling steps by default"
        )


@dataclass(frozen=True)
class Result:
    """One generated video: its MP4 file and a line saying how it was made."""

    path: Path
    description: str


class VideoServer:
    """The page's logic without the page: checks a form's values, generates one video, writes its MP4.

    Args:
        pipeline: the model to generate with (on its device).
        folder: where the MP4 files go (each in its own sub-folder; files older than ``keep_s`` are removed).
        max_steps: the most sampling steps one generation may ask for.
        name: the model's name, shown in the page.
        adapters: ``(path, scale)`` of the adapters loaded into the model, shown in the page.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        folder: str | Path,
        max_steps: int = 1000,
        name: str = "walt model",
        adapters: Sequence[tuple[str, float]] = (),
        keep_s: float = 3600.0,
    ) -> None:
        if pipeline.super_resolution is not None:
            raise ValueError(
                "walt serve generates with a base model; this is a super-resolution stage (it upsamples "
                "given videos)"
            )
        self.pipeline = pipeline
        self.form = Form.of(pipeline)
        self.folder = Path(folder)
        self.max_steps = max_steps
        self.name = name
        self.adapters = list(adapters)
        self.keep_s = keep_s
        self._lock = threading.Lock()  # one generation at a time on the model, even past the page's queue
        self._count = 0

    def generate(
        self,
        label: Any = None,
        prompt: Any = None,
        context: Any = None,
        context_frames: Any = 1,
        steps: Any = None,
        guidance: Any = 1.0,
        seed: Any = 0,
        sampler: Any = "ddim",
        eta: Any = 0.0,
    ) -> Result:
        """One video from the form's values (as the page sends them: numbers may be floats or None). Raises
        :class:`BadValue` with the message for the user when a value is refused."""
        form = self.form
        steps = _integer("steps", form.steps if steps is None else steps, 1, self.max_steps)
        seed = _integer("seed", seed, 0, MAX_SEED)
        guidance = _number("guidance", guidance if form.guidance else 1.0, "a number >= 0 (1 = no guidance)")
        eta = _number("eta", eta, "a number >= 0 (0 = deterministic DDIM)")
        if sampler not in SAMPLERS:
            raise BadValue(f"unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
        kwargs: dict[str, Any] = dict(seeds=[seed], steps=steps, guidance=guidance, eta=eta, sampler=sampler)
        described = []
        if form.classes is not None:
            index = self._class_index(label)
            kwargs["labels"] = [index]
            described.append("unconditional" if index < 0 else f"class {self._class_name(index)!r}")
        if form.text:
            if not isinstance(prompt, str) or not prompt.strip():
                raise BadValue("the prompt is empty: describe the video to generate")
            kwargs["prompts"] = [prompt.strip()]
            described.append(f"prompt {prompt.strip()!r}")
        if form.context and context:
            kwargs["context"] = str(context)
            kwargs["context_frames"] = _integer("context frames", context_frames, 1, 10**6)
            described.append(f"{kwargs['context_frames']} context frames of {Path(str(context)).name}")
        return self._run(kwargs, described)

    def _run(self, kwargs: dict[str, Any], described: list[str]) -> Result:
        from walt.data import VideoReadError, write_video

        with self._lock:
            start = time.perf_counter()
            try:
                video = self.pipeline.generate(**kwargs, progress=False)[0]  # uint8 (T, H, W, 3)
            except (ValueError, FileNotFoundError, VideoReadError) as err:  # the pipeline's checks
                raise BadValue(str(err)) from None
            seconds = time.perf_counter() - start
            self._count += 1
            path = self._new_file(kwargs)
            write_video(path, video.numpy(), fps=self.pipeline.fps)
        settings = (
            f"seed {kwargs['seeds'][0]}, {kwargs['steps']} {kwargs['sampler']} steps"
            + (f", guidance {kwargs['guidance']:g}" if self.form.guidance else "")
            + (f", eta {kwargs['eta']:g}" if kwargs["eta"] else "")
        )
        T, H, W = video.shape[:3]
        where = self.pipeline.device.type
        line = f"{', '.join([*described, settings])}: {T} frames of {H}x{W} in {seconds:.1f} s on {where}"
        return Result(path, line)

    def _class_index(self, label: Any) -> int:
        if label is None or (isinstance(label, str) and not label.strip()):
            raise BadValue("choose a class")
        if isinstance(label, float) and label.is_integer():
            label = int(label)
        try:
            return self.pipeline.class_index(label.strip() if isinstance(label, str) else label)
        except (ValueError, TypeError) as err:
            raise BadValue(str(err)) from None

    def _class_name(self, index: int) -> str:
        return self.pipeline.class_names[index] if self.pipeline.class_names else str(index)

    def _new_file(self, kwargs: dict[str, Any]) -> Path:
        """A fresh sub-folder per video, so a download keeps a readable name; old videos are removed."""
        now = time.time()
        for old in self.folder.iterdir() if self.folder.is_dir() else []:
            if old.is_dir() and now - old.stat().st_mtime > self.keep_s:
                shutil.rmtree(old, ignore_errors=True)
        if "labels" in kwargs:
            index = kwargs["labels"][0]
            tag = "unconditional" if index < 0 else self._class_name(index)
        elif "prompts" in kwargs:
            tag = kwargs["prompts"][0]
        else:
            tag = "sample"
        tag = re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_")[:40] or "sample"
        folder = self.folder / f"{self._count:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"walt_{tag}_seed{kwargs['seeds'][0]}.mp4"

    def header(self) -> str:
        lines = [f"## walt: {html.escape(self.name)}", "", html.escape(self.form.summary())]
        if self.adapters:
            listed = ", ".join(f"{html.escape(Path(p).name)} (scale {s:g})" for p, s in self.adapters)
            lines += ["", f"Adapters: {listed}"]
        lines += ["", f"Running on {self.pipeline.device}; generations wait in one queue, one at a time."]
        return "\n".join(lines)


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if value is None or isinstance(value, bool) or value == "":
        raise BadValue(f"{name}: give a whole number from {low} to {high}")
    try:
        number = value if isinstance(value, int) else float(value)  # ints kept whole: seeds past 2**53
    except (TypeError, ValueError):
        raise BadValue(f"{name} must be a whole number from {low} to {high}, got {value!r}") from None
    if not math.isfinite(number) or not float(number).is_integer() or not low <= number <= high:
        raise BadValue(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(number)


def _number(name: str, value: Any, what: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise BadValue(f"{name} must be {what}, got {value!r}") from None
    if not math.isfinite(number) or number < 0:
        raise BadValue(f"{name} must be {what}, got {value!r}")
    return number


# ---- the page ---------------------------------------------------------------------------------------------


def build_page(server: VideoServer, queue_size: int = 16):
    """The Gradio page (a ``gr.Blocks``) of ``server``, its queue set: one generation at a time, at most
    ``queue_size`` waiting."""
    gr = _gradio()
    form = server.form
    inputs: dict[str, Any] = {}
    with gr.Blocks(title=f"walt: {server.name}", analytics_enabled=False, delete_cache=(600, 3600)) as page:
        gr.Markdown(server.header())
        with gr.Row():
            with gr.Column():
                if form.classes is not None:
                    inputs["label"] = gr.Dropdown(
                        form.classes, value=form.classes[0][1], label="class", allow_custom_value=True,
                        info="a class name or index", elem_id="walt-class",
                    )  # fmt: skip
                if form.text:
                    inputs["prompt"] = gr.Textbox(
                        label="prompt",
                        lines=2,
                        placeholder="a red circle moving right",
                        elem_id="walt-prompt",
                    )
                if form.context:
                    inputs["context"] = gr.File(
                        label="context: an image or a clip whose first frames are given (optional)",
                        file_types=CONTEXT_TYPES, type="filepath", elem_id="walt-context",
                    )  # fmt: skip
                    inputs["context_frames"] = gr.Number(
                        1, precision=0, label="context frames (1, 5, 9, ...: 1 for an image)",
                        elem_id="walt-context-frames",
                    )  # fmt: skip
                inputs["steps"] = gr.Number(
                    form.steps, precision=0, label=f"steps (1 to {server.max_steps})", elem_id="walt-steps"
                )
                if form.guidance:
                    inputs["guidance"] = gr.Number(
                        1.0, label="guidance (1 = none, higher follows the condition more)",
                        elem_id="walt-guidance",
                    )  # fmt: skip
                inputs["seed"] = gr.Number(0, precision=0, label="seed", elem_id="walt-seed")
                inputs["sampler"] = gr.Dropdown(
                    list(SAMPLERS), value="ddim", label="sampler", elem_id="walt-sampler"
                )
                with gr.Accordion("more settings", open=False):
                    inputs["eta"] = gr.Number(
                        0.0, label="eta (DDIM noise; 0 = deterministic)", elem_id="walt-eta"
                    )
                button = gr.Button("Generate", variant="primary", elem_id="walt-generate")
            with gr.Column():
                video = gr.Video(
                    label="video", interactive=False, autoplay=True, loop=True, buttons=["download"],
                    elem_id="walt-video",
                )  # fmt: skip
                mp4 = gr.File(label="MP4", interactive=False, elem_id="walt-mp4")
                made = gr.Markdown(elem_id="walt-made")
        names = list(inputs)

        def generate(*values):
            try:
                result = server.generate(**dict(zip(names, values)))
            except BadValue as err:
                raise gr.Error(html.escape(str(err), quote=False), print_exception=False) from None
            except Exception as err:  # the app keeps serving; the traceback goes to the server's log
                traceback.print_exc()
                if isinstance(err, torch.cuda.OutOfMemoryError):
                    torch.cuda.empty_cache()
                raise gr.Error(
                    html.escape(f"generation failed: {type(err).__name__}: {err}", quote=False),
                    print_exception=False,
                ) from None
            return str(result.path), str(result.path), html.escape(result.description, quote=False)

        button.click(generate, inputs=list(inputs.values()), outputs=[video, mp4, made], api_name="generate")
    page.queue(default_concurrency_limit=1, max_size=queue_size)
    return page


def _gradio():
    try:
        import gradio
    except ImportError:
        raise SystemExit("walt serve needs Gradio: pip install 'walt[serve]'") from None
    return gradio


# ---- the command ------------------------------------------------------------------------------------------


def parse_adapter(text: str) -> tuple[str, float]:
    """``PATH`` or ``PATH:SCALE`` -> (path, scale); scale 1 when not given."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            value = float(scale)
        except ValueError:
            return text, 1.0  # a colon inside the path
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"the scale of {text!r} must be a finite number")
        return path, value
    return text, 1.0


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="walt serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="a model folder (walt export) or a walt fit checkpoint")
    p.add_argument("--adapter", action="append", default=[], type=parse_adapter, metavar="PATH[:SCALE]",
                   help="an adapter to load into the model (Pipeline.load_adapter), scale 1 unless given; repeatable")  # fmt: skip
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="run the networks under bfloat16 autocast (GPU)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int_at_least(1), default=7860, help="port to listen on")
    p.add_argument("--share", action="store_true", help="also publish the page through a Gradio share link")
    p.add_argument("--queue-size", type=int_at_least(1), default=16,
                   help="generations that may wait at once; more are refused with a message")  # fmt: skip
    p.add_argument(
        "--max-steps", type=int_at_least(1), default=1000, help="the most steps a user may ask for"
    )
    args = p.parse_args(list(argv))
    if args.port > 65535:
        p.error(f"argument --port: must be <= 65535, got {args.port}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"argument --device: not a device: {args.device!r} (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"argument --device: {args.device} asked for, but PyTorch sees no CUDA device")
    return args


def load_adapters(pipeline: Pipeline, adapters: Sequence[tuple[str, float]]) -> None:
    """``pipeline.load_adapter(path, scale=scale)`` for each adapter, in order."""
    if adapters and not hasattr(pipeline, "load_adapter"):
        raise SystemExit(
            "walt serve: --adapter needs adapter support (Pipeline.load_adapter, LoRA adapters), which this "
            "version of walt does not have"
        )
    for path, scale in adapters:
        try:
            pipeline.load_adapter(path, scale=scale)
        except (FileNotFoundError, ModelFileError, ValueError) as err:
            raise SystemExit(f"walt serve: --adapter {path}: {err}") from None


def serve_main(argv: Sequence[str]) -> int:
    args = _parse_args(argv)
    gr = _gradio()
    dtype = torch.bfloat16 if args.bf16 else None
    try:
        pipeline = Pipeline.from_pretrained(args.model, device=args.device, dtype=dtype)
    except (FileNotFoundError, ModelFileError, ValueError) as err:
        raise SystemExit(f"walt serve: {err}") from None
    load_adapters(pipeline, args.adapter)
    folder = Path(tempfile.mkdtemp(prefix="walt-serve-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    name = Path(args.model).name if Path(args.model).is_dir() else Path(args.model).stem
    try:
        server = VideoServer(pipeline, folder, args.max_steps, name, args.adapter)
    except ValueError as err:
        raise SystemExit(f"walt serve: {err}") from None
    page = build_page(server, args.queue_size)
    print(f"walt serve: {name} on {pipeline.device}: {server.form.summary()}", flush=True)
    # System fonts: the default theme's web fonts would be fetched from the internet, which clusters often
    # cannot reach (the page then waits for them).
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    # max_file_size: a context clip is a few seconds of video; a bigger upload is refused before it is read.
    page.launch(
        server_name=args.host, server_port=args.port, share=args.share, theme=theme, max_file_size="50mb"
    )
    return 0


if __name__ == "__main__":
    sys.exit(serve_main(sys.argv[1:]))
