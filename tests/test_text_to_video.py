"""Text-to-video: text conditioning in BaseDiffusionModule, guidance over text, configs, `walt sample --prompt`,
and a tiny model trained on synthetic captions that follows its prompt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import cpu_sized_config, train_in_a_loop
from walt.cli import WaltCLI, main
from walt.conditioning import Conditioning, MiniLMTextEncoder, T5TextEncoder
from walt.data import LatentShards, SyntheticVideos, collate_items, read_video
from walt.data.synthetic import read_colour_and_motion
from walt.diffusion import concat_conditioning, guided, null_conditioning
from walt.lightning import BaseDiffusionModule
from walt.pipeline import Pipeline
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


def text_backbone(text_dim: int, **kwargs) -> WALT:
    args = dict(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=(2, 2, 2), text_dim=text_dim)
    return WALT(**{**args, **kwargs})


def randomised(module: BaseDiffusionModule) -> BaseDiffusionModule:
    """Every path of the backbone (zero-initialised ones too) does something, as in a trained model."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.normal_(0, 0.1)
    if module.ema is not None:
        module.ema.module.load_state_dict(module.backbone.state_dict())
    return module.eval()


def test_a_text_backbone_needs_a_matching_encoder(minilm, tiny_t5):
    with pytest.raises(ValueError, match="no text_encoder was given"):
        BaseDiffusionModule(text_backbone(384))
    with pytest.raises(ValueError, match="gives 16-d tokens but the backbone has text_dim=384"):
        BaseDiffusionModule(text_backbone(384), text_encoder=T5TextEncoder(str(tiny_t5)))
    with pytest.raises(ValueError, match="no text_dim"):
        BaseDiffusionModule(text_backbone(None, num_classes=3), text_encoder=minilm)
    labels_only = BaseDiffusionModule(
        text_backbone(None, num_classes=3), tokenizer=CausalVAE(**presets["tiny"])
    )
    with pytest.raises(ValueError, match="not text-conditional"):
        labels_only.pipeline().generate(prompts=["a red circle"], steps=1, progress=False)


def test_captions_reach_the_backbone_and_dropout_gives_the_null_prompt(minilm):
    m = BaseDiffusionModule(text_backbone(384), text_encoder=minilm, text_dropout=0.0)
    z = torch.randn(3, 4, 2, 2, 2)
    captions = ["a red circle moving left", "", "a blue circle"]
    cond = m.conditioner({"caption": captions}, z, train=True, generator=None)
    tokens, mask = minilm.encode(captions)
    assert torch.equal(cond.text, tokens) and torch.equal(cond.text_mask, mask) and not mask[1].any()
    m.conditioner.text_dropout = 1.0
    dropped = m.conditioner({"caption": captions}, z, train=True, generator=None)
    assert not dropped.text_mask.any()
    kept = m.conditioner({"caption": captions}, z, train=False, generator=None)  # no dropout outside training
    assert torch.equal(kept.text_mask, mask)
    with pytest.raises(KeyError, match="needs batches with 'caption'"):
        m.conditioner({}, z, train=True, generator=None)
    assert not any(
        k.startswith("text_encoder") for k in m.state_dict()
    )  # the encoder stays out of checkpoints


@torch.no_grad()
def test_the_null_prompt_is_the_guidance_null_condition_and_guidance_batches_both_passes(minilm):
    tokenizer = CausalVAE(**presets["tiny"])  # only for the module's pipeline; nothing is decoded here
    m = randomised(BaseDiffusionModule(text_backbone(384), tokenizer, text_encoder=minilm, ema_decay=None))
    x, t = torch.randn(2, 4, 2, 2, 2), torch.tensor([0.3, 0.8])
    tokens, mask = minilm.encode(["a red circle moving left", "a green square"])
    cond = Conditioning(text=tokens, text_mask=mask)
    empty_tokens, empty_mask = minilm.encode(["", ""])
    empty = Conditioning(text=empty_tokens, text_mask=empty_mask)
    # The empty prompt, the guidance null condition and dropped captions are one condition: no text token.
    torch.testing.assert_close(
        m.backbone(x, t, empty), m.backbone(x, t, null_conditioning(cond)), rtol=0, atol=1e-6
    )
    assert not torch.allclose(m.backbone(x, t, cond), m.backbone(x, t, empty), atol=1e-3)
    # Prompts of different lengths are padded with masked tokens so both passes run as one batch.
    both = concat_conditioning(cond, empty)
    assert both.text.shape == (4, tokens.shape[1], 384) and not both.text_mask[2:].any()
    w = 3.0
    expected = m.backbone(x, t, empty) + w * (m.backbone(x, t, cond) - m.backbone(x, t, empty))
    torch.testing.assert_close(guided(m.backbone, w)(x, t, cond), expected, rtol=0, atol=1e-5)
    # Sampling with prompts (through the module's pipeline): deterministic, and the prompt changes the result.
    pipe = m.pipeline()
    kwargs = dict(guidance=2.0, steps=3, seeds=[0, 1], output="latent", progress=False)
    prompts = ["a red circle moving left", "a green square"]
    a = pipe.generate(prompts=prompts, **kwargs)
    b = pipe.generate(prompts=prompts, **kwargs)
    c = pipe.generate(prompts=["", ""], **kwargs)
    assert a.shape == (2, 4, 2, 2, 2) and torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)
    with pytest.raises(ValueError, match="the sample counts disagree"):
        pipe.generate(prompts=["a red circle"], seeds=[0, 1], steps=1, progress=False)
    with pytest.raises(ValueError, match="the model is text-to-video: give prompts"):
        pipe.generate(seeds=[0, 1], steps=1, progress=False)


# ---- configs and the command line -------------------------------------------------------------------------


def _captioned_latents(folder: Path) -> list[str]:
    """A `walt encode`-style folder of tiny-tokenizer latents with captions; returns the captions."""
    vae = CausalVAE(**presets["tiny"], variational=False)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(folder / "vae.safetensors"))
    videos = SyntheticVideos(
        num_samples=8, num_frames=17, resolution=32, shapes=["circle"], motions=["left", "right"]
    )
    items = [videos[i] for i in range(8)]
    batch = collate_items(items)
    with torch.no_grad():
        latents = vae.encode(batch["video"])  # (8, 4, 5, 4, 4)
    save_file(
        {"latents": latents.contiguous()},
        str(folder / "shard-00000.safetensors"),
        metadata={"captions": json.dumps(batch["caption"])},
    )
    index = {"shards": [{"file": "shard-00000.safetensors", "num_samples": 8}]}
    (folder / "index.json").write_text(json.dumps(index))
    return batch["caption"]


def _runnable_here(config_path: Path, tmp_path: Path, t5: Path) -> Path:
    """The config shrunk to run on a CPU, with its data, tokenizer and (for T5) text encoder made here."""
    _captioned_latents(tmp_path)
    config = yaml.safe_load(config_path.read_text())
    encoder = config["model"]["init_args"]["conditioner"]["text_encoder"]
    if encoder["class_path"].endswith("T5TextEncoder"):
        encoder["init_args"]["path"] = str(t5)
    encoder["init_args"]["cache_dir"] = str(tmp_path / "text_cache")
    text_dim = 16 if encoder["class_path"].endswith("T5TextEncoder") else 384
    return cpu_sized_config(config, tmp_path, config_path.name, text_dim=text_dim)


@pytest.mark.parametrize("config", sorted((ROOT / "configs/text").glob("*.yaml")), ids=lambda p: p.name)
def test_every_text_config_runs_a_fast_dev_run(config, tmp_path, tiny_t5, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["walt"])
    runnable = _runnable_here(config, tmp_path, tiny_t5)
    args = [
        "fit",
        "--config",
        str(runnable),
        "--trainer.fast_dev_run",
        "true",
        "--trainer.enable_progress_bar",
        "false",
    ]
    WaltCLI(args=args)
    assert list((tmp_path / "text_cache").rglob("*.safetensors"))  # the captions went through the cache


def test_text_quickstart_trains_and_walt_sample_writes_a_video_per_prompt(tmp_path, tiny_t5, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["walt"])
    config = _runnable_here(ROOT / "configs/text/quickstart.yaml", tmp_path, tiny_t5)
    assert [LatentShards(tmp_path)[i]["caption"] for i in range(8)] == _captioned_latents(tmp_path)
    WaltCLI(
        args=[
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            "2",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    ckpt = tmp_path / "run/checkpoints/last.ckpt"  # it records its text encoder: no YAML needed to sample
    (tmp_path / "prompts.txt").write_text("a green circle moving left\n\n  a blue circle moving right  \n")
    out = tmp_path / "samples"
    common = ["sample", "--model", str(ckpt), "--steps", "2", "--device", "cpu"]
    args = [
        *common,
        "--output",
        str(out),
        "--guidance",
        "3",
        "--prompt",
        "a red circle moving left",
        "--prompt",
        "",
    ]
    with pytest.raises(SystemExit) as done:
        main([*args, "--prompts-file", str(tmp_path / "prompts.txt")])
    assert done.value.code == 0
    index = json.loads((out / "samples.json").read_text())
    assert [e["prompt"] for e in index] == [
        "a red circle moving left",
        "",
        "a green circle moving left",
        "a blue circle moving right",
    ]
    assert sorted(p.name for p in out.glob("*.mp4")) == [f"sample_{i:03d}.mp4" for i in range(4)]
    assert read_video(out / "sample_003.mp4").shape == (17, 32, 32, 3) and (out / "grid.gif").is_file()
    assert all(e["guidance"] == 3.0 and e["steps"] == 2 for e in index)
    with pytest.raises(SystemExit, match="the model is text-to-video: give --prompt"):
        main([*common, "--output", str(tmp_path / "none")])
    with pytest.raises(SystemExit, match="prompts file not found"):
        main([*common, "--output", str(tmp_path / "none"), "--prompts-file", str(tmp_path / "missing.txt")])


# ---- following the prompt ---------------------------------------------------------------------------------
# A tiny WALT learns text-to-video on 16x16 synthetic clips of 5 frames. To stay within seconds on a CPU it
# denoises the pixels themselves (the "latent" is the clip: an identity tokenizer) with 4x4 patches, so 80
# tokens per clip; the conditioning is the real thing: MiniLM tokens of the caption through cross-attention,
# null-text dropout, and classifier-free guidance at sampling time. Samples are read back with the same
# colour/motion reader the demo uses, which reads every real clip of this data correctly.

COLOURS = ["red", "green", "blue", "yellow"]


def pixel_clips(num_samples: int = 1024) -> tuple[torch.Tensor, list[str]]:
    """SyntheticVideos clips (N, 3, 5, 16, 16), rendered once, standing as their own latents, and captions."""
    videos = SyntheticVideos(
        num_samples=num_samples,
        num_frames=5,
        resolution=16,
        shapes=["circle"],
        colors=COLOURS,
        motions=["left", "right"],
    )
    items = [videos[i] for i in range(num_samples)]
    return torch.stack([it["video"] for it in items]), [it["caption"] for it in items]


def train_on_captions(encoder: MiniLMTextEncoder, steps: int, batch_size: int = 32) -> BaseDiffusionModule:
    """The module's own loss and optimizer schedule, run in a plain loop (no Trainer overhead)."""
    clips, captions = pixel_clips()
    torch.manual_seed(0)
    backbone = WALT(
        in_channels=3,
        depth=2,
        hidden_size=96,
        num_heads=4,
        patch_size=4,
        input_size=(5, 16, 16),
        text_dim=384,
    )
    module = BaseDiffusionModule(
        backbone,
        text_encoder=encoder,
        optimizer=lambda p: torch.optim.AdamW(p, lr=5e-3, weight_decay=0.0),
        warmup_steps=20,
        ema_decay=None,
        self_condition_prob=0.0,
        text_dropout=0.1,
    )
    batch = lambda rows: {"latent": clips[rows], "caption": [captions[i] for i in rows]}
    train_in_a_loop(module, batch, len(clips), steps, batch_size)
    return module.eval()


def prompt_following(module: BaseDiffusionModule, guidance: float) -> dict[str, int]:
    """How many of 16 samples (2 per prompt) show the colour, the motion and both that their prompt asks for."""
    asked = [(c, m) for c in COLOURS for m in ("left", "right")] * 2
    prompts = [f"a {c} circle moving {m}" for c, m in asked]
    # The clip is its own latent: a pipeline without a tokenizer, which output="latent" never calls.
    pipe = Pipeline(module.sampling_backbone, None, module.schedule, module.text_encoder)
    z = pipe.generate(prompts=prompts, guidance=guidance, steps=10, output="latent", progress=False)
    assert z.shape == (len(prompts), 3, 5, 16, 16)
    seen = [read_colour_and_motion(video, COLOURS) for video in z]
    return {
        "colour": sum(s[0] == a[0] for s, a in zip(seen, asked)),
        "motion": sum(s[1] == a[1] for s, a in zip(seen, asked)),
        "both": sum(s == a for s, a in zip(seen, asked)),
    }


def test_a_tiny_model_trained_on_captions_follows_the_prompt_colour(minilm):
    """After 500 steps the prompt's colour is shown far above chance (4 of 16).

    500 steps gave 16 of 16 for each of five seeds. 250 steps gave 5 to 15: too early, and so sensitive that the
    last bits of a cached caption embedding (batched with other captions by an earlier test) flipped the result.
    Motion is not asserted: this pixel-space toy does not learn it even in 2500 steps (about 5 of 16, chance
    8); the text quickstart on real tokenizer latents measures colour and motion (benchmarks/RESULTS.md).
    """
    counts = prompt_following(train_on_captions(minilm, steps=500), guidance=3.0)
    print("prompt following after 500 steps, guidance 3:", counts)
    # P(>= 10 of 16 | chance 1/4) < 0.001.
    assert counts["colour"] >= 10, counts
