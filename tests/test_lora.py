"""LoRA adapters (walt.lora, walt.lightning.LoRAFineTune, Pipeline.load_adapter): exact identity at
initialization, gradients on the adapter alone, file round trips, merging, base checks, and `walt fit` /
`walt sample` with an adapter, on a tiny model (2 blocks x 32) and the MovingDigits size for the file size."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("peft")

from tests.conftest import cpu_sized_config, main_exit
from walt.checkpoint import read_checkpoint
from walt.cli import WaltCLI, main
from walt.conditioning import Conditioning
from walt.lora import (
    AdapterError,
    LoRASpec,
    adapter_tensors,
    add_classes,
    base_identity,
    describe_adapter,
    inject_lora,
    read_adapter,
    target_modules,
    write_adapter,
)
from walt.lora.adapter import TRAINING_NAME
from walt.pipeline import Pipeline
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT

ROOT = Path(__file__).resolve().parents[1]
DIGITS = [str(d) for d in range(10)]
TINY = dict(in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=(5, 4, 4), num_classes=10)


def tiny_backbone(seed: int = 0, **kwargs) -> WALT:
    """A 2-block backbone with random weights everywhere (a new one predicts zeros: nothing to compare)."""
    torch.manual_seed(seed)
    model = WALT(**{**TINY, "self_conditioning": True, **kwargs})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_pipeline(seed: int = 0) -> Pipeline:
    torch.manual_seed(100)
    vae = CausalVAE(**presets["tiny"], variational=False).eval()
    return Pipeline(tiny_backbone(seed), vae, class_names=DIGITS, sample_steps=3)


def trained_adapter(backbone: WALT, spec: LoRASpec, seed: int = 1) -> tuple[dict, dict]:
    """An adapter for ``backbone`` as a run would leave it (random updates in place of trained ones): its
    tensors and description. ``backbone`` is left untouched."""
    import copy

    model = copy.deepcopy(backbone)
    base = base_identity(model, "tiny base")
    description = describe_adapter(spec, target_modules(model, spec.blocks, spec.layers), base)
    indices = add_classes(model, len(spec.new_classes)) if spec.new_classes else []
    inject_lora(model, description, TRAINING_NAME, indices)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return adapter_tensors(model, TRAINING_NAME, indices), description


def inputs(labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
    torch.manual_seed(3)
    n = len(labels)
    return torch.randn(n, 4, 5, 4, 4), torch.rand(n), Conditioning(labels=torch.tensor(labels))


SAMPLE = dict(labels=[3, -1, 7], seeds=[0, 1, 2], steps=3, output="latent", progress=False)


# ---- injection: identity, gradients, targets ----------------------------------------------------------------


@pytest.mark.parametrize("blocks", ["all", "spatial", "spatiotemporal"])
def test_lora_at_initialization_leaves_the_output_bit_identical(blocks):
    model = tiny_backbone()
    x, t, cond = inputs([3, -1, 7, 0])  # the null label too: it moves to the end of the grown table
    before = model(x, t, cond)
    spec = LoRASpec(rank=4, blocks=blocks, new_classes=("horse", "star"))
    description = describe_adapter(spec, target_modules(model, blocks, spec.layers), base_identity(model))
    inject_lora(model, description, TRAINING_NAME, add_classes(model, 2))
    model.train()  # dropout 0: training mode changes nothing either
    assert torch.equal(model(x, t, cond), before)
    new = model(*inputs([10, 11])[:2], Conditioning(labels=torch.tensor([10, 11])))
    null = model(*inputs([-1, -1])[:2], Conditioning(labels=torch.tensor([-1, -1])))
    assert torch.equal(new, null)  # an added class starts as the null label


def test_only_the_adapter_and_the_new_class_get_gradients():
    model = tiny_backbone()
    spec = LoRASpec(rank=4, new_classes=("horse",))
    description = describe_adapter(spec, target_modules(model, "all", spec.layers), base_identity(model))
    inject_lora(model, description, TRAINING_NAME, add_classes(model, 1))
    with torch.no_grad():  # B = 0 gives A no gradient: a step's worth of B makes every adapter weight matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    x, t, _ = inputs([10, 2])
    model(x, t, Conditioning(labels=torch.tensor([10, 2]))).square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n or "trainable_tokens" in n}
    assert len(trainable) == 2 * len(description["target_modules"]) + 1
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_target_modules_follow_blocks_and_layers():
    model = tiny_backbone(depth=4)  # windows alternate: blocks 0, 2 spatial (1 x H x W), 1, 3 spatiotemporal
    assert target_modules(model, "spatial", ["attn"]) == [
        "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.2.attn.qkv", "blocks.2.attn.proj",
    ]  # fmt: skip
    assert target_modules(model, "spatiotemporal", ["mlp"]) == [
        "blocks.1.mlp.fc1", "blocks.1.mlp.fc2", "blocks.3.mlp.fc1", "blocks.3.mlp.fc2",
    ]  # fmt: skip
    assert len(target_modules(model, "all", ["attn", "cross_attn", "mlp"])) == 16  # no cross-attention here
    text = WALT(**{**TINY, "num_classes": None}, text_dim=8)
    assert "blocks.1.cross_attn.qkv" in target_modules(text, "all", ["cross_attn"])
    image_only = WALT(**TINY, windows=[(1, -1, -1)])
    with pytest.raises(ValueError, match="no layer of the backbone matches"):
        target_modules(image_only, "spatiotemporal", ["attn"])
    with pytest.raises(ValueError, match="blocks must be one of"):
        LoRASpec(blocks="temporal")


def test_a_cross_attention_adapter_acts_on_the_text_tokens_merged_or_not():
    """The text keys and values go through the wrapped projection, so merging changes nothing."""
    torch.manual_seed(0)
    model = WALT(**{**TINY, "num_classes": None}, text_dim=8)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    tensors, description = trained_adapter(model, LoRASpec(rank=2, layers=("cross_attn",)))
    from walt.lora import AdapterSet

    adapters = AdapterSet(model, [])
    adapters.add(tensors, description, 1.0, "text", "in memory")
    x, t = torch.randn(2, 4, 5, 4, 4), torch.rand(2)
    cond = Conditioning(text=torch.randn(2, 3, 8), text_mask=torch.ones(2, 3, dtype=torch.bool))
    unmerged = model(x, t, cond)
    adapters.merge()
    torch.testing.assert_close(model(x, t, cond), unmerged, atol=1e-5, rtol=0)


def _compiled_and_eager(backend: str, device: str):
    """A LoRA backbone (with a trainable class row) compiled as BaseDiffusionModule(compile=True) compiles it,
    before the adapter goes in, and its eager twin with the same weights."""
    import copy

    model = tiny_backbone().to(device)
    model.compile(fullgraph=True, backend=backend)
    spec = LoRASpec(rank=4, new_classes=("horse",))
    description = describe_adapter(spec, target_modules(model, "all", spec.layers), base_identity(model))
    inject_lora(model, description, TRAINING_NAME, add_classes(model, 1))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    eager = copy.deepcopy(model)
    eager._compiled_call_impl = None  # the copy would call the compiled original otherwise
    return model, eager


def test_lora_traces_into_one_graph_forward_and_backward():
    """fullgraph=True fails on any graph break: PEFT's layers and trainable rows trace whole (aot_eager: the
    tracing without a compiler; the GPU test runs inductor)."""
    model, eager = _compiled_and_eager("aot_eager", "cpu")
    x, t, _ = inputs([10, 2])
    cond = Conditioning(labels=torch.tensor([10, 2]))
    for net in (model, eager):
        net(x, t, cond).square().mean().backward()
    assert torch.equal(model(x, t, cond), eager(x, t, cond))
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_lora_matches_eager_on_the_gpu():
    model, eager = _compiled_and_eager("inductor", "cuda")
    x, t, _ = inputs([10, 2])
    x, t, cond = x.cuda(), t.cuda(), Conditioning(labels=torch.tensor([10, 2]).cuda())
    with torch.autocast("cuda", torch.bfloat16):
        for net in (model, eager):
            net(x, t, cond).float().square().mean().backward()
        torch.testing.assert_close(model(x, t, cond).float(), eager(x, t, cond).float(), atol=2e-2, rtol=2e-2)
    grads = [(a.grad, b.grad) for a, b in zip(model.parameters(), eager.parameters()) if a.requires_grad]
    for a, b in grads:
        torch.testing.assert_close(a, b, atol=1e-2, rtol=5e-2)


# ---- the adapter file and the pipeline ----------------------------------------------------------------------


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    pipe = tiny_pipeline()
    tensors, description = trained_adapter(pipe.backbone, LoRASpec(rank=4, new_classes=("horse",)))
    path = write_adapter(tmp_path / "horse.safetensors", tensors, description)
    loaded = tiny_pipeline().load_adapter(path)
    assert loaded.adapters["horse"]["scale"] == 1.0 and loaded.class_names[-1] == "horse"
    first = loaded.generate(**{**SAMPLE, "labels": ["horse", 3, -1]})
    again = loaded.save_adapter(tmp_path / "again.safetensors")  # written back from the pipeline
    written, recorded = read_adapter(again)
    assert recorded == description and written.keys() == tensors.keys()
    assert all(torch.equal(written[k], tensors[k]) for k in tensors)
    second = tiny_pipeline().load_adapter(again).generate(**{**SAMPLE, "labels": ["horse", 3, -1]})
    assert torch.equal(first, second)
    assert not torch.equal(first, tiny_pipeline().generate(**{**SAMPLE, "labels": [-1, 3, -1]}))


def test_merged_samples_equal_unmerged_ones_within_float_rounding(tmp_path):
    """Merging adds s (alpha / r) B A into W: the same function, rounded differently. Stated tolerance: 1e-5
    absolute on the sampled latents (unit variance) after 3 DDIM steps, float32; measured about 2e-7."""
    pipe = tiny_pipeline()
    tensors, description = trained_adapter(pipe.backbone, LoRASpec(rank=4))
    pipe.load_adapter(write_adapter(tmp_path / "a.safetensors", tensors, description), scale=0.7)
    unmerged = pipe.generate(**SAMPLE)
    pipe.merge_adapters()
    torch.testing.assert_close(pipe.generate(**SAMPLE), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(AdapterError, match="while adapters are merged"):
        pipe.set_adapter_scale("a", 1.0)
    pipe.unmerge_adapters()
    torch.testing.assert_close(pipe.generate(**SAMPLE), unmerged, atol=1e-5, rtol=0)
    pipe.merge_and_unload()  # a plain model again: a model folder holds it
    assert pipe.adapters == {} and type(pipe.backbone.blocks[0].attn.qkv) is torch.nn.Linear
    reloaded = Pipeline.from_pretrained(pipe.save_pretrained(tmp_path / "merged"))
    torch.testing.assert_close(reloaded.generate(**SAMPLE), unmerged, atol=1e-5, rtol=0)


def test_several_adapters_add_up_and_a_zero_scale_is_no_adapter(tmp_path):
    base = tiny_pipeline()
    a = write_adapter(tmp_path / "a.safetensors", *trained_adapter(base.backbone, LoRASpec(rank=2), seed=1))
    b_spec = LoRASpec(rank=4, blocks="spatial", layers=("mlp",), new_classes=("horse",))
    b = write_adapter(tmp_path / "b.safetensors", *trained_adapter(base.backbone, b_spec, seed=2))
    both = tiny_pipeline().load_adapter(a).load_adapter(b, scale=0.5)
    assert both.adapters["b"]["scale"] == 0.5 and both.backbone.num_classes == 11
    only_a = tiny_pipeline().load_adapter(a).generate(**SAMPLE)
    assert not torch.equal(both.generate(**SAMPLE), only_a)
    both.set_adapter_scale("b", 0.0)  # its update off; its class stays
    assert torch.equal(both.generate(**SAMPLE), only_a)
    with pytest.raises(AdapterError, match="named 'a' is loaded already"):
        both.load_adapter(a)
    with pytest.raises(AdapterError, match="adds classes that exist already"):
        both.load_adapter(b, name="b2")


def test_wrong_base_missing_and_damaged_files_are_refused_in_one_line(tmp_path):
    base = tiny_pipeline()
    path = write_adapter(tmp_path / "a.safetensors", *trained_adapter(base.backbone, LoRASpec(rank=2)))
    other = tiny_pipeline(seed=5)
    with pytest.raises(AdapterError, match=r"trained on another base model \(tiny base") as err:
        other.load_adapter(path)
    assert "\n" not in str(err.value)
    assert other.adapters == {} and type(other.backbone.blocks[0].attn.qkv) is torch.nn.Linear  # untouched
    with pytest.raises(AdapterError, match="adapter not found"):
        base.load_adapter(tmp_path / "missing.safetensors")
    weights = base.save_pretrained(tmp_path / "model") / "backbone.safetensors"
    with pytest.raises(AdapterError, match="is not a walt adapter"):
        base.load_adapter(weights)
    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 0x10  # a bit of the last tensor
    (tmp_path / "damaged.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(AdapterError, match="is corrupt"):
        base.load_adapter(tmp_path / "damaged.safetensors")


def test_a_moving_digits_sized_adapter_is_a_few_megabytes(tmp_path):
    """The MovingDigits base model (12 x 512, 40M parameters: 160 MB in float32) with a rank-8 adapter on the
    attention and MLP of every block, plus one class."""
    model = WALT(in_channels=8, depth=12, hidden_size=512, num_heads=8, input_size=(5, 8, 8), num_classes=10,
                 self_conditioning=True)  # fmt: skip
    spec = LoRASpec(rank=8, layers=("attn", "mlp"), new_classes=("horse",))
    description = describe_adapter(spec, target_modules(model, "all", spec.layers), base_identity(model))
    inject_lora(model, description, TRAINING_NAME, add_classes(model, 1))
    path = write_adapter(tmp_path / "a.safetensors", adapter_tensors(model, TRAINING_NAME, [10]), description)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 12 * 8 * (512 + 3 * 512 + 512 + 512 + 512 + 2048 + 2048 + 512) + 512  # 786,944
    assert path.stat().st_size < 3.3e6  # 3.15 MB of float32 plus the header
    assert trainable < 0.02 * sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


# ---- walt fit and walt sample -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """The "trained" model: a tiny pipeline with random weights, as a model folder; its architecture is that
    of the CPU-sized quickstart config with 10 classes (the digits)."""
    folder = tmp_path_factory.mktemp("base")
    return tiny_pipeline().save_pretrained(folder / "model")


def lora_config(folder: Path, base: Path, max_steps: int, **callback) -> Path:
    """The quickstart base config made CPU-sized, fine-tuning ``base`` with LoRA on 4 MovingSubject clips."""
    config = yaml.safe_load((ROOT / "configs/base/quickstart.yaml").read_text())
    path = cpu_sized_config(config, folder, "lora.yaml", num_classes=10, self_conditioning=True)
    config = yaml.safe_load(path.read_text())
    config["data"]["init_args"].update(
        train={"class_path": "walt.data.MovingSubject", "init_args": {"num_samples": 4, "resolution": 32}},
        val=None,
    )
    config["model"]["init_args"].update(tokenizer_weights=None, ema_decay=None, warmup_steps=1, num_log_samples=0,
                                        sample_steps=3)  # fmt: skip
    config["model"]["init_args"]["conditioner"] = {"label_dropout": 0.0}
    config["trainer"].update(max_steps=max_steps, max_epochs=None, limit_val_batches=0, log_every_n_steps=1,
                             check_val_every_n_epoch=None, enable_progress_bar=False)  # fmt: skip
    config["trainer"]["callbacks"] = [{
        "class_path": "walt.lightning.LoRAFineTune",
        "init_args": {"init_from": str(base), "rank": 4, "new_classes": ["horse"], **callback},
    }]  # fmt: skip
    config["checkpoint"] = {"every_n_train_steps": 2}
    path.write_text(yaml.safe_dump(config))
    return path


def fit(*args: str) -> None:
    old = sys.argv
    sys.argv = ["walt"]
    try:
        WaltCLI(args=["fit", *args])
    finally:
        sys.argv = old


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, base_model) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    fit("--config", str(lora_config(folder, base_model, max_steps=4)))
    return folder / "run"


def test_walt_fit_trains_and_writes_only_the_adapter(lora_run, base_model):
    adapter = lora_run / "adapter.safetensors"
    tensors, description = read_adapter(adapter)
    assert description["new_classes"] == ["horse"] and description["rank"] == 4
    assert description["base"]["source"] == str(base_model) and description["training"]["steps"] == 4
    record = json.loads((lora_run / "finetune.json").read_text())
    assert record["method"] == "lora" and record["steps"] == 4
    assert record["trainable_parameters"] == sum(t.numel() for t in tensors.values())  # the optimizer's, too
    assert record["adapter_bytes"] == adapter.stat().st_size
    if sys.platform == "linux":  # a CPU run records the process's peak memory, before and after training
        assert (
            record["peak_process_memory_bytes"] >= record["peak_process_memory_before_training_bytes"] > 1e7
        )
    checkpoint = read_checkpoint(lora_run / "checkpoints/last.ckpt")
    (optimizer,) = checkpoint["optimizer_states"]  # what configure_optimizers handed over: the adapter alone
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(tensors)
    frozen = {
        k: v for k, v in checkpoint["state_dict"].items() if ".base_layer." in k and "blocks.0.attn.qkv" in k
    }
    base = Pipeline.from_pretrained(base_model).backbone.state_dict()
    assert torch.equal(
        frozen["backbone.blocks.0.attn.qkv.base_layer.weight"], base["blocks.0.attn.qkv.weight"]
    )
    assert tensors["blocks.0.attn.qkv.lora_B.weight"].abs().sum() > 0  # it trained
    # the base plus the file samples what the run's checkpoint samples (its base, its adapter), bit for bit
    from_file = Pipeline.from_pretrained(base_model).load_adapter(adapter)
    from_checkpoint = Pipeline.from_pretrained(lora_run / "checkpoints/last.ckpt")
    assert from_checkpoint.class_names == [*DIGITS, "horse"] == from_file.class_names
    kwargs = {**SAMPLE, "labels": ["horse", 3, -1]}
    assert torch.equal(from_file.generate(**kwargs), from_checkpoint.generate(**kwargs))


def test_a_killed_lora_fit_resumes_exactly(lora_run, base_model, tmp_path):
    """Two steps, then resumed to four from last.ckpt: the adapter of the run that never stopped."""
    config = lora_config(tmp_path, base_model, max_steps=2)
    fit("--config", str(config))
    fit(
        "--config",
        str(config),
        "--trainer.max_steps",
        "4",
        "--ckpt_path",
        str(tmp_path / "run/checkpoints/last.ckpt"),
    )
    resumed, _ = read_adapter(tmp_path / "run/adapter.safetensors")
    straight, _ = read_adapter(lora_run / "adapter.safetensors")
    assert resumed.keys() == straight.keys()
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_a_config_that_does_not_fit_the_model_or_keeps_an_ema_is_refused(base_model, tmp_path):
    from walt.pipeline import ModelFileError

    config = lora_config(tmp_path, base_model, max_steps=1)
    with pytest.raises(
        ModelFileError, match=r"does not fit the config's backbone: hidden_size=48 in the config, 32"
    ):
        fit("--config", str(config), "--model.init_args.backbone.init_args.hidden_size", "48")
    with pytest.raises(ValueError, match="ema_decay: null"):
        fit("--config", str(config), "--model.init_args.ema_decay", "0.99")


def test_walt_sample_with_an_adapter(lora_run, base_model, tmp_path):
    out = tmp_path / "samples"
    argv = ["sample", "--model", str(base_model), "--adapter", f"{lora_run / 'adapter.safetensors'}:0.5",
            "--class", "horse", "--num-samples", "2", "--steps", "2", "--output", str(out), "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code in (0, None)
    record = json.loads((out / "samples.json").read_text())
    assert record[0]["class_name"] == "horse" and record[0]["adapters"][0]["scale"] == 0.5
    with pytest.raises(SystemExit, match="adapter not found"):
        main([*argv[:3], "--adapter", str(tmp_path / "none.safetensors"), *argv[5:], "--overwrite"])


def test_walt_export_of_a_lora_checkpoint_writes_its_adapter_or_a_merged_model(lora_run, tmp_path, capsys):
    checkpoint = str(lora_run / "checkpoints/last.ckpt")
    assert main_exit(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "a.safetensors")]) == 0
    exported, _ = read_adapter(tmp_path / "a.safetensors")
    written, _ = read_adapter(lora_run / "adapter.safetensors")
    assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in written)
    assert main_exit(["export", "--checkpoint", checkpoint, "--output", str(tmp_path / "folder")]) == 1
    assert "--merge-adapters" in capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main_exit(["export", "--checkpoint", checkpoint, "--output", str(merged), "--merge-adapters"]) == 0
    kwargs = {**SAMPLE, "labels": ["horse", 3, -1]}
    unmerged = Pipeline.from_pretrained(checkpoint).generate(**kwargs)
    torch.testing.assert_close(
        Pipeline.from_pretrained(merged).generate(**kwargs), unmerged, atol=1e-5, rtol=0
    )
