"""FP8 training (walt.transformer.float8, DiffusionModule(float8=...)): which linears convert, that checkpoints keep
their keys, and that a machine without FP8 tensor cores is refused before the first step, in one line."""

from __future__ import annotations

import builtins

import lightning as L
import pytest
import torch
from torch import nn

from walt.lightning import DiffusionModule
from walt.pipeline import Pipeline
from walt.tokenizer import CausalVAE, presets
from walt.transformer import WALT
from walt.transformer.float8 import convert_to_float8, float8_linear_names

pytest.importorskip("torchao")


def hide_torchao(monkeypatch) -> None:
    """Imports of torchao fail from here on, as where it is not installed."""
    real_import = builtins.__import__

    def no_torchao(name, *args, **kwargs):
        if name.startswith("torchao"):
            raise ImportError("No module named 'torchao'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchao)


def backbone(**kwargs) -> WALT:
    torch.manual_seed(0)
    return WALT(in_channels=4, depth=3, hidden_size=32, num_heads=2, input_size=(2, 4, 4), **kwargs)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_exactly_the_blocks_attention_and_mlp_linears_convert_and_the_keys_stay(recipe):
    from torchao.float8.float8_linear import Float8Linear

    model = backbone(num_classes=3)
    keys = set(model.state_dict())
    convert_to_float8(model, recipe)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    expected = sorted(
        f"blocks.{i}.{leaf}" for i in range(3) for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert converted == expected == sorted(float8_linear_names(model))
    assert set(model.state_dict()) == keys  # checkpoints load into an unconverted model and back
    # token counts (the weight gradient's inner dimension) need not be multiples of 16: images, small grids
    assert all(m.config.pad_inner_dim for m in model.modules() if isinstance(m, Float8Linear))
    unconverted = [m for n, m in model.named_modules() if type(m) is nn.Linear]
    assert unconverted and not any(n in expected for n, m in model.named_modules() if type(m) is nn.Linear)


def test_misaligned_linears_stay_in_high_precision():
    model = backbone(mlp_ratio=4.5)  # fc1: 32 -> 144, a multiple of 16; 40 would not be
    assert "blocks.0.mlp.fc1" in float8_linear_names(model)
    odd = backbone(mlp_ratio=1.25)  # 32 -> 40
    names = float8_linear_names(odd)
    assert "blocks.0.mlp.fc1" not in names and "blocks.0.attn.qkv" in names


def test_an_unknown_recipe_and_a_missing_torchao_are_refused_with_the_fix(monkeypatch):
    with pytest.raises(ValueError, match="unknown float8 recipe 'e5m2'; choose one of tensorwise, rowwise"):
        DiffusionModule(backbone(), float8="e5m2")
    hide_torchao(monkeypatch)
    with pytest.raises(ImportError, match=r"pip install 'walt\[fp8\]'"):
        convert_to_float8(backbone(), "tensorwise")


def test_a_cpu_run_is_refused_before_the_first_step(tmp_path):
    module = DiffusionModule(backbone(), float8="tensorwise", ema_decay=None, num_log_samples=0)
    assert module.float8 == "tensorwise"
    trainer = L.Trainer(accelerator="cpu", max_steps=1, default_root_dir=tmp_path, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    data = torch.utils.data.DataLoader([{"latent": torch.randn(4, 2, 4, 4)} for _ in range(2)], batch_size=2)
    with pytest.raises(ValueError, match=r"FP8 tensor cores .* this run is on cpu: train without float8"):
        trainer.fit(module, data)
    assert trainer.global_step == 0


def test_fp8_sampling_refuses_a_cpu_an_unknown_recipe_and_a_missing_torchao_with_the_fix(monkeypatch):
    from walt.transformer.float8 import quantize_float8_inference

    pipe = Pipeline(backbone(), CausalVAE(**presets["tiny"]))
    with pytest.raises(ValueError, match=r"this run is on cpu: sample without FP8 \(no --float8"):
        pipe.quantize_float8("rowwise")
    assert pipe._float8 is None and type(pipe.backbone.blocks[0].attn.qkv) is nn.Linear  # nothing changed
    with pytest.raises(ValueError, match="unknown float8 recipe 'fp4'; choose one of tensorwise, rowwise"):
        quantize_float8_inference(backbone(), "fp4")
    hide_torchao(monkeypatch)
    with pytest.raises(ImportError, match=r"FP8 sampling needs torchao: pip install 'walt\[fp8\]'"):
        quantize_float8_inference(backbone(), "rowwise")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cascade", "c", "--float8", "rowwise", "--bf16"], "--float8 applies to one model"),
        (["--model", "m", "--float8", "e4m3", "--bf16"], "invalid choice: 'e4m3'"),
        (["--model", "m", "--float8", "rowwise"], "--float8 runs under bfloat16 autocast: add --bf16"),
        (
            ["--model", "m", "--float8", "rowwise", "--bf16", "--adapter", "a.safetensors"],
            "merge the adapters",
        ),
    ],
)
def test_walt_sample_float8_refusals_are_one_line_while_parsing(tmp_path, capsys, extra, message):
    from walt.sample import sample_main

    with pytest.raises(SystemExit):
        sample_main([*extra, "--output", str(tmp_path / "s")])
    assert message in capsys.readouterr().err


def test_walt_sample_float8_on_a_cpu_is_refused_in_one_line_before_sampling(tmp_path, capsys):
    from walt.sample import sample_main

    model = tmp_path / "model"
    Pipeline(backbone(num_classes=3), CausalVAE(**presets["tiny"])).save_pretrained(model)
    with pytest.raises(
        SystemExit, match=r"walt sample: FP8 matmuls need .* this run is on cpu: sample without FP8"
    ):
        sample_main(["--model", str(model), "--float8", "rowwise", "--bf16", "--device", "cpu",
                     "--output", str(tmp_path / "s")])  # fmt: skip
    assert not (tmp_path / "s").exists()


def test_quantized_linears_read_their_input_in_the_autocast_dtype():
    """Under autocast the modulated LayerNorm hands the qkv projection float32; the FP8 weight's matmul would
    return that dtype, so the hook casts the input first, and leaves it alone without autocast."""
    from walt.transformer.float8 import _autocast_input

    x = torch.randn(2, 8)
    with torch.autocast("cpu", torch.bfloat16):
        assert _autocast_input(nn.Linear(8, 8), (x,))[0].dtype == torch.bfloat16
    assert _autocast_input(nn.Linear(8, 8), (x,))[0] is x


def test_a_quantized_pipeline_refuses_adapters_a_second_quantization_and_saving(monkeypatch, tmp_path):
    """The state after quantize_float8 on an FP8 GPU (the device check and torchao's conversion, which need one,
    are replaced here; the GPU test runs the real ones)."""
    import walt.transformer.float8 as float8

    monkeypatch.setattr(float8, "check_float8_device", lambda device, fix="": None)
    monkeypatch.setattr(float8, "quantize_float8_inference", lambda model, recipe, layers: model)
    pipe = Pipeline(backbone(num_classes=3), CausalVAE(**presets["tiny"]))
    with pytest.raises(
        ValueError, match=r"bfloat16 autocast: place the pipeline with to\(device, torch.bfloat16\)"
    ):
        pipe.quantize_float8("rowwise")
    pipe.autocast_dtype = torch.bfloat16
    pipe.quantize_float8("rowwise")
    with pytest.raises(ValueError, match="already quantized to FP8"):
        pipe.quantize_float8("tensorwise")
    with pytest.raises(ValueError, match="load and merge adapters before quantizing"):
        pipe.load_adapter(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="save the pipeline before quantizing it"):
        pipe.save_pretrained(tmp_path / "model")


def test_float8_layers_picks_which_linears_convert_and_refuses_other_names():
    from torchao.float8.float8_linear import Float8Linear

    module = DiffusionModule(
        backbone(), float8="tensorwise", float8_layers=["mlp.fc1", "mlp.fc2"], ema_decay=None
    )
    converted = sorted(n for n, m in module.backbone.named_modules() if isinstance(m, Float8Linear))
    assert converted == sorted(f"blocks.{i}.mlp.{fc}" for i in range(3) for fc in ("fc1", "fc2"))
    assert module.float8_layers == ("mlp.fc1", "mlp.fc2")
    for bad in (["mlp.fc3"], []):
        with pytest.raises(
            ValueError, match=r"float8 layers must be some of attn\.qkv, attn\.proj, mlp\.fc1, mlp\.fc2"
        ):
            DiffusionModule(backbone(), float8="tensorwise", float8_layers=bad)
