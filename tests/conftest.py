"""Shared fixtures: small real video files and dataset trees written with PyAV."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from walt.checkpoint import write_weights
from walt.data import SyntheticVideos, write_video
from walt.tokenizer import CausalVAE, presets


def moving_bar(
    num_frames: int, height: int, width: int, colour: tuple[int, int, int], seed: int = 0
) -> np.ndarray:
    """A coloured vertical bar sliding right over a noisy background: uint8 (T, H, W, 3)."""
    rng = np.random.default_rng(seed)
    frames = np.full((num_frames, height, width, 3), 40, np.uint8)
    frames += rng.integers(0, 20, size=(1, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        x = (t * 2) % (width - 6)
        frames[t, :, x : x + 6] = colour
    return frames


def cpu_sized_config(config: dict, latents: Path, name: str, **backbone) -> Path:
    """A diffusion training config made to run on a CPU: a 2-layer backbone (``backbone`` adds options), the tiny
    tokenizer with its weights, and the data read from ``latents`` (a `walt encode`-style folder); written
    there as ``name``."""
    model = config["model"]["init_args"]
    model["backbone"]["init_args"].update(
        in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=[5, 4, 4], **backbone
    )
    model["tokenizer"]["init_args"] = {**presets["tiny"], "variational": False}
    model["tokenizer_weights"] = str(latents / "vae.safetensors")
    model["compile"] = False  # compiling a 2-layer model costs more than the test's steps
    for split in ("train", "val"):
        if config["data"]["init_args"].get(split):
            config["data"]["init_args"][split]["init_args"]["root"] = str(latents)
    config["data"]["init_args"].update(batch_size=4, num_workers=0)
    config["trainer"].update(
        accelerator="cpu", devices=1, precision="32-true", default_root_dir=str(latents / "run")
    )
    path = latents / name
    path.write_text(yaml.safe_dump(config))
    return path


def train_in_a_loop(
    module, batch: Callable[[list[int]], dict], num_items: int, steps: int, batch_size: int
) -> None:
    """``steps`` steps of a diffusion module's own loss, optimizer and learning-rate schedule in a plain loop (no
    Trainer overhead), each on ``batch(rows)`` for ``batch_size`` random rows of ``num_items``."""
    optimizers = module.configure_optimizers()
    optimizer, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    module.train()
    for _ in range(steps):
        rows = torch.randint(0, num_items, (batch_size,)).tolist()
        loss = module._loss(batch(rows), train=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()


def write_tiny_latents(folder: Path) -> None:
    """A `walt encode`-style folder: tiny-tokenizer latents of 17x32x32 synthetic circles, and its weights."""
    vae = CausalVAE(**presets["tiny"], variational=False)
    write_weights(vae.state_dict(), folder / "vae.safetensors", {"role": "tokenizer"})  # as walt encode does
    videos = SyntheticVideos(
        num_samples=8, num_frames=17, resolution=32, shapes=["circle"], motions=["left", "right"]
    )
    with torch.no_grad():
        latents = vae.encode(torch.stack([videos[i]["video"] for i in range(8)]))  # (8, 4, 5, 4, 4)
    labels = torch.tensor([videos[i]["label"] for i in range(8)])
    save_file({"latents": latents.contiguous(), "labels": labels}, str(folder / "shard-00000.safetensors"))
    index = {"shards": [{"file": "shard-00000.safetensors", "num_samples": 8}], "classes": videos.classes}
    (folder / "index.json").write_text(json.dumps(index))


UCF_CLASSES = ["ApplyEyeMakeup", "Basketball", "HandstandPushups"]


@pytest.fixture(scope="session")
def ucf_root(tmp_path_factory) -> Path:
    """A UCF-101 tree in the official layout: 3 classes, 2 groups x 2 clips each, XVID AVI files."""
    root = tmp_path_factory.mktemp("ucf")
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(UCF_CLASSES)))
    train, test = [], []
    for ci, cls in enumerate(UCF_CLASSES):
        # The real archive spells one class differently in file names than in classInd/folders.
        file_cls = "HandStandPushups" if cls == "HandstandPushups" else cls
        for g in (1, 8):
            for c in (1, 2):
                rel = f"{cls}/v_{file_cls}_g{g:02d}_c{c:02d}.avi"
                path = root / "UCF-101" / rel
                write_video(path, moving_bar(20, 48, 64, (200, 50 * ci, 30), seed=ci * 10 + g + c), fps=25)
                (train if g == 8 else test).append(rel)
    (lists / "trainlist01.txt").write_text(
        "".join(f"{r} {UCF_CLASSES.index(r.split('/')[0]) + 1}\n" for r in train)
    )
    (lists / "testlist01.txt").write_text("".join(f"{r}\n" for r in test))
    return root


K600_ROWS = [  # label, youtube_id, start, end, split, where the clip is written ("flat", "label" or None)
    ("playing drums", "aaaaaaaaaaa", 0, 10, "train", "flat"),
    ("playing drums", "bbbbbbbbbbb", 12, 22, "train", "label"),
    ("abseiling", "ccccccccccc", 5, 15, "train", "flat"),
    ("abseiling", "ddddddddddd", 30, 40, "train", None),  # annotated but never downloaded
    ("zumba", "eeeeeeeeeee", 1, 11, "train", "label"),
    ("zumba", "fffffffffff", 7, 17, "validate", "flat"),
    ("abseiling", "ggggggggggg", 3, 13, "validate", "flat"),
]


@pytest.fixture(scope="session")
def k600_root(tmp_path_factory) -> Path:
    """A Kinetics-600 tree: annotations/{train,validate}.csv, clips flat or in label folders, one missing."""
    root = tmp_path_factory.mktemp("k600")
    (root / "annotations").mkdir()
    by_split: dict[str, list[str]] = {}
    for i, (label, yid, start, end, split, where) in enumerate(K600_ROWS):
        by_split.setdefault(split, []).append(f"{label},{yid},{start},{end},{split}\n")
        if where is None:
            continue
        folder = root / split / (label if where == "label" else "")
        write_video(
            folder / f"{yid}_{start:06d}_{end:06d}.mp4", moving_bar(24, 64, 80, (50, 200, 90), seed=i), fps=10
        )
    for split, rows in by_split.items():
        (root / "annotations" / f"{split}.csv").write_text(
            "label,youtube_id,time_start,time_end,split\n" + "".join(rows)
        )
    return root


T5_WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "right", "up"]


def write_tiny_t5(folder: Path) -> Path:
    """A randomly initialised 16-d T5 encoder and a word-level tokenizer, saved as a user's T5 folder would be."""
    import transformers  # imported here: only the text tests pay for it
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T5_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(folder)
    config = transformers.T5Config(
        vocab_size=len(T5_WORDS), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2
    )
    torch.manual_seed(0)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> Path:
    """A local T5 folder (random 16-d weights), as a user would pass to walt.conditioning.T5TextEncoder."""
    return write_tiny_t5(tmp_path_factory.mktemp("t5"))


def main_exit(argv: list[str]) -> int:
    """`walt ARGV` in this process, as its exit status (the CLI ends in SystemExit)."""
    from walt.cli import main  # imported on use: most test files never need Lightning's CLI

    try:
        main(argv)
    except SystemExit as done:
        return int(done.code or 0)
    return 0
