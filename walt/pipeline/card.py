"""The model card (README.md) of a model folder: what the model is, how it was trained, what it scored."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["model_card"]


def model_card(description: dict[str, Any]) -> str:
    """Markdown from a model description (see walt.pipeline.files)."""
    backbone = description["backbone"]["init_args"]
    tokenizer = description["tokenizer"]["init_args"]
    kind = "super-resolution stage" if description.get("kind") == "super_resolution" else "base model"
    conditioning = _conditioning(description, backbone)
    lines = [
        f"# walt {kind}",
        "",
        f"A W.A.L.T-style latent video diffusion {kind} made with walt {description.get('walt_version', '?')}.",
        "",
        "| | |",
        "|---|---|",
        f"| denoiser | WALT, {backbone.get('depth')} layers x {backbone.get('hidden_size')} wide, "
        f"{backbone.get('num_heads')} heads, patch {backbone.get('patch_size')}, windows {backbone.get('windows')} |",
        f"| latent grid it was trained on | {backbone.get('in_channels')} x {' x '.join(map(str, backbone.get('input_size', [])))} |",
        f"| tokenizer | causal 3D autoencoder, {tokenizer.get('latent_channels')} latent channels, base width "
        f"{tokenizer.get('channels')} |",
        f"| conditioning | {conditioning} |",
        f"| schedule | {description['schedule']['class_path'].rsplit('.', 1)[-1]} |",
        f"| default sampling | {description.get('sampling', {}).get('steps')} steps, "
        f"{description.get('sampling', {}).get('fps')} fps |",
        f"| weights | {description.get('weights', 'ema')} |",
    ]
    training = description.get("training") or {}
    if training:
        lines += ["", "## Training", ""]
        for key in ("global_step", "epoch", "data"):
            if key in training:
                lines.append(f"- {key.replace('_', ' ')}: {json.dumps(training[key])}")
        if training.get("config"):
            lines += [
                "",
                "<details><summary>training config</summary>",
                "",
                "```yaml",
                training["config"].rstrip(),
                "```",
                "</details>",
            ]
    metrics = description.get("metrics") or {}
    lines += ["", "## Metrics", ""]
    lines += [f"- {name}: {value}" for name, value in metrics.items()] or [
        "None recorded yet (`walt evaluate`)."
    ]
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from walt.pipeline import Pipeline",
        "",
        'pipe = Pipeline.from_pretrained("path/to/this/folder", device="cuda")',
        f"videos = pipe.generate({_example_arguments(description, backbone)})  # uint8 (N, T, H, W, 3)",
        "```",
        "",
        "or `walt sample --model path/to/this/folder --output samples/`.",
        "",
    ]
    return "\n".join(lines)


def _conditioning(description: dict[str, Any], backbone: dict[str, Any]) -> str:
    parts = []
    if backbone.get("num_classes") is not None:
        names = description.get("class_names") or []
        parts.append(
            f"{backbone['num_classes']} classes"
            + (f" ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else "")
        )
    if backbone.get("text_dim") is not None:
        encoder = description.get("text_encoder") or {}
        parts.append(f"text ({encoder.get('identity', encoder.get('class_path', '?'))})")
    if backbone.get("context_frames"):
        parts.append("context frames (frame prediction, image-to-video)")
    if backbone.get("lowres"):
        parts.append(f"low-res video ({json.dumps(description.get('super_resolution'))})")
    if backbone.get("guidance_input"):
        parts.append("guidance scale as input (guidance-distilled)")
    return ", ".join(parts) or "unconditional"


def _example_arguments(description: dict[str, Any], backbone: dict[str, Any]) -> str:
    if backbone.get("lowres"):
        return "lowres=low_res_videos"
    if backbone.get("text_dim") is not None:
        return 'prompts=["a prompt"], guidance=5.0'
    if backbone.get("num_classes") is not None:
        return "labels=[0, 1], seeds=[0, 1]"
    return "seeds=[0, 1]"
