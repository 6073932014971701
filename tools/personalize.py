"""The personalization study, stage ``personalize`` of tools/moving_digits.py: LoRA against full fine-tuning.

  python tools/moving_digits.py personalize --out runs/md        # after the base stage; one H200: ~6 minutes
  python tools/moving_digits.py personalize --out /tmp/md --smoke --base-model <model>   # CPU, tiny: the path
  python tools/moving_digits.py personalize --out /tmp/md --base-model <model> --fine-tune-only \
      --personalize-steps 12 --device cpu          # the two fine-tunings' cost alone, on any machine

1. The trained MovingDigits base model is fine-tuned on 8 clips of a subject it never saw: scikit-image's horse
   silhouette bouncing beside a handwritten digit (walt.data.MovingSubject), as a new class ("horse", label 10).
   Twice, on the same clips, steps and batch: a rank-8 LoRA adapter on the attention and MLP layers of every block
   (configs/lora/moving_digits_personalize.yaml: AdamW 1e-3, everything else frozen) and full fine-tuning (every
   weight, AdamW 1e-4). Both are `walt fit` runs of the base config with the fine-tuning config over it.
2. The base model (before), the base model with the adapter and the fully fine-tuned model (after) are measured:
   - recognition of the new subject: --subject-samples samples of the new class (the base model has no such
     class: its null label, what it draws when asked for nothing in particular), scored by an object classifier
     trained on real frames only (walt.metrics.digits.DigitClassifier with 11 outputs: the ten digits and the
     subject, independent presence sigmoids). A sample shows the subject when it is among the classifier's two
     most likely objects (every clip shows two), the rule of the digit accuracy. Its rate on real held-out subject
     clips, and on their reconstructions by the model's tokenizer (which never saw the subject either: the
     ceiling for samples), and its false alarms on real test clips are reported;
   - the base skill kept: fvd2048_16f of samples of the classes 0-9 against the original test split (the
     evaluate stage's protocol: --labels data, sample k with seed k), their digit accuracy (top 2), and how often
     the subject shows up in them;
   - adapter file size, trainable parameters, median seconds per training step and peak GPU memory of each run
     (from the runs' finetune.json), and sampling seconds per video (the adapter unmerged and merged).
   Results: <out>/personalize.json, <out>/personalize.md (the table), <out>/personalize.png (new-class samples).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import Dataset

from walt.data import MovingDigits, MovingSubject, to_uint8

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "configs" / "lora" / "moving_digits_personalize.yaml"
SUBJECT = "horse"
SUBJECT_LABEL = 10  # the class after the ten digits
# Below this share of the tokenizer's reconstructions of real subject clips recognized, a sample's score says more
# about the classifier than about the model: the study says so instead of reporting it as a result.
RECOGNIZABLE = 0.5


# ---- the two fine-tuning runs -------------------------------------------------------------------------------


def overlay(base: dict, over: dict) -> dict:
    """``over`` laid over ``base`` as `walt fit --config base --config over` does: mappings merge, except a
    mapping that names another class_path, which replaces the old one with its arguments; other values replace."""
    merged = dict(base)
    for key, value in over.items():
        old = merged.get(key)
        if (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("class_path", old.get("class_path")) == old.get("class_path")
        ):
            merged[key] = overlay(old, value)
        else:
            merged[key] = value
    return merged


def write_config(args: argparse.Namespace, configs: dict[str, Path], base_model: Path, method: str) -> Path:
    """The base config with the personalization config over it, for ``method`` ("lora" or "full"), pointed at
    ``base_model`` and ``<out>/personalize/<method>`` (and shrunk with --smoke)."""
    cfg = overlay(yaml.safe_load(configs["base"].read_text()), yaml.safe_load(OVERLAY.read_text()))
    resolution = yaml.safe_load(configs["latents"].read_text())["data"]["init_args"]["train"]["init_args"][
        "resolution"
    ]
    steps = args.personalize_steps
    every = steps if args.smoke else max(1, steps // 3)  # validation (loss, videos) and checkpoints
    cfg["trainer"].update(
        default_root_dir=str(args.out / "personalize" / method), max_steps=steps, val_check_interval=every,
        enable_progress_bar=False,
    )  # fmt: skip
    cfg["checkpoint"] = {"every_n_train_steps": every}
    callback = cfg["trainer"]["callbacks"][0]["init_args"]
    callback["init_from"] = str(base_model)
    model = cfg["model"]["init_args"]
    if method == "lora":
        callback["rank"] = args.lora_rank
        model["optimizer"]["init_args"]["lr"] = args.lora_lr
    else:
        cfg["trainer"]["callbacks"] = [{
            "class_path": "walt.lightning.FineTune",
            "init_args": {"init_from": str(base_model), "new_classes": callback["new_classes"]},
        }]  # fmt: skip
        model["optimizer"]["init_args"]["lr"] = args.full_lr
    data = cfg["data"]["init_args"]
    data["train"]["init_args"]["resolution"] = data["val"]["init_args"]["resolution"] = resolution
    if args.smoke:
        model.update(num_log_samples=2, warmup_steps=1)
        data["val"]["init_args"]["num_samples"] = 8
    if args.fine_tune_only:  # the cost alone: no validation loss or videos
        cfg["trainer"]["limit_val_batches"] = 0
        model["num_log_samples"] = 0
    path = args.out / "configs" / f"personalize_{method}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fine_tune(args: argparse.Namespace, config: Path, root: Path, run) -> dict:
    """One `walt fit` run (kept when its finetune.json exists, unless --force): its record and wall time."""
    record = root / "finetune.json"
    if args.force or not record.exists():
        tic = time.perf_counter()
        run("fit", "--config", str(config))
        (root / "wall_seconds.json").write_text(json.dumps({"walt_fit_seconds": time.perf_counter() - tic}))
    wall = root / "wall_seconds.json"
    return {**json.loads(record.read_text()), **(json.loads(wall.read_text()) if wall.exists() else {})}


# ---- the object classifier ----------------------------------------------------------------------------------


class Objects(Dataset):
    """Real clips for the object classifier: MovingDigits clips (digits 0-9) and subject clips (label 10 and a
    digit), one subject clip for every four digit clips."""

    def __init__(self, clips: int, resolution: int) -> None:
        self.parts = [
            MovingDigits("train", clips, 17, resolution, seed=2),
            MovingSubject(
                SUBJECT, max(1, clips // 4), 17, resolution, seed=3
            ),  # other clips than the training 8
        ]

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def _find(self, index: int) -> tuple[Dataset, int]:
        for part in self.parts:
            if index < len(part):
                return part, index
            index -= len(part)
        raise IndexError(index)

    def __getitem__(self, index: int) -> dict:
        part, i = self._find(index)
        return part[i]

    def digits_of(self, index: int) -> list[int]:
        part, i = self._find(index)
        return part.digits_of(i)


def object_classifier(args: argparse.Namespace, resolution: int):
    from walt.metrics.digits import train_digit_classifier

    data = Objects(args.classifier_clips, resolution)
    # Degraded frames: the silhouette is drawn crisper than the digits, and a classifier of clean frames learns
    # that crispness, which no decoded frame has (it read 0 % of the subject in the tokenizer's reconstructions).
    return train_digit_classifier(
        data, steps=args.classifier_steps, device=args.device, num_classes=SUBJECT_LABEL + 1, progress=False,
        augment=True,
    )  # fmt: skip


def shows_subject(classifier, videos: torch.Tensor) -> float:
    """Share of clips (N, 3, T, H, W) whose two most likely objects include the subject."""
    from walt.metrics.digits import clip_digit_scores

    top = clip_digit_scores(classifier, videos).topk(2, dim=1).indices
    return (top == SUBJECT_LABEL).any(dim=1).float().mean().item()


# ---- the study ----------------------------------------------------------------------------------------------


def personalize(args: argparse.Namespace, configs: dict[str, Path], helpers) -> dict:
    """Runs the study (see the module docstring); ``helpers`` is tools/moving_digits.py (its Reference, measure,
    generate, clips...)."""
    h = helpers
    base_model = Path(args.base_model) if args.base_model else h.newest_checkpoint(args.out / "base")
    runs = {}
    for method in ("lora", "full"):
        root = args.out / "personalize" / method
        runs[method] = fine_tune(args, write_config(args, configs, base_model, method), root, h.walt)
        h.log(f"{method} fine-tuning: {runs[method]}")

    if args.fine_tune_only:
        result = {"subject": SUBJECT, "training_clips": 8, "steps": args.personalize_steps,
                  "base_model": str(base_model), "runs": runs}  # fmt: skip
        (args.out / "personalize.md").write_text(cost_table(result))
        return result
    ref = h.Reference(args, configs)
    resolution = ref.videos.shape[-1]
    grown = copy.copy(ref)  # the same test clips, named with the new class too: the fine-tuned models have 11
    grown.dataset = copy.copy(ref.dataset)
    grown.dataset.classes = [*ref.dataset.classes, SUBJECT]
    classifier = object_classifier(args, resolution)
    held_out, _ = h.clips(MovingSubject(SUBJECT, args.subject_samples, 17, resolution, seed=4), args.workers)
    ceiling = {
        "real_subject_clips_recognized": shows_subject(classifier, held_out),
        "real_test_clips_with_subject": shows_subject(classifier, ref.videos),
        "real_test_digit_accuracy_top2": h.top2_accuracy(classifier, ref.videos, ref.labels),
    }
    h.log(f"object classifier on real clips: {ceiling}")

    from walt.pipeline import Pipeline

    dtype = None if torch.device(args.device).type == "cpu" else torch.bfloat16
    full_checkpoint = h.newest_checkpoint(args.out / "personalize" / "full")
    models = {
        "base": lambda: Pipeline.from_pretrained(base_model, device=args.device, dtype=dtype),
        "lora": lambda: Pipeline.from_pretrained(base_model, device=args.device, dtype=dtype).load_adapter(
            runs["lora"]["adapter"]
        ),
        "full": lambda: Pipeline.from_pretrained(
            full_checkpoint, device=args.device, dtype=dtype, weights="live"
        ),
    }
    rows, subject_videos = {}, {}
    n = args.subject_samples
    for name, load in models.items():
        pipe = load()
        judge = ref if name == "base" else grown
        row, videos = h.measure(pipe, judge, classifier, args, name, args.steps, args.sampler)
        row["subject_in_base_class_samples"] = shows_subject(classifier, videos)
        label = -1 if name == "base" else pipe.class_index(SUBJECT)  # the base model's best guess: no class
        tic = time.perf_counter()
        subject_videos[name] = h.generate(pipe, torch.full((n,), label), args, args.steps, args.sampler)
        h.synchronize(args.device)
        row["subject_seconds_per_video"] = (time.perf_counter() - tic) / n
        row["subject_recognized"] = shows_subject(classifier, subject_videos[name])
        row["new_class_label"] = label
        if name == "lora":
            row.update(merged_sampling(pipe, h, args, label, subject_videos[name]))
        if name == "base":  # what the decoder, trained on digits only, lets through of the subject
            reconstructions = h.reconstruct(pipe.tokenizer, held_out, args.device)
            ceiling["reconstructed_subject_clips_recognized"] = shows_subject(classifier, reconstructions)
            if ceiling["reconstructed_subject_clips_recognized"] < RECOGNIZABLE:
                h.log(f"warning: {unrecognizable(ceiling)}")
        row["backbone_parameters"] = sum(p.numel() for p in pipe.backbone.parameters())
        rows[name] = row
        h.log(f"{name}: {row}")
    picture(subject_videos, args.out / "personalize.png")
    result = {
        "subject": SUBJECT,
        "training_clips": 8,
        "steps": args.personalize_steps,
        "base_model": str(base_model),
        "classifier_on_real_clips": ceiling,
        "recognition_valid": ceiling["reconstructed_subject_clips_recognized"] >= RECOGNIZABLE,
        "models": rows,
        "runs": runs,
        "num_samples": len(ref.labels),
        "subject_samples": n,
        "sample_steps": args.steps,
        "sampler": args.sampler,
        "seeds": h.SEEDS + "; new-class samples: seeds 0 .. subject_samples - 1",
    }
    (args.out / "personalize.md").write_text(table(result))
    return result


def unrecognizable(ceiling: dict) -> str:
    return (
        f"the object classifier recognizes {100 * ceiling['real_subject_clips_recognized']:.1f} % of real subject "
        f"clips but {100 * ceiling['reconstructed_subject_clips_recognized']:.1f} % of their tokenizer "
        "reconstructions, so the 'new subject recognized' figures measure the classifier, not the models; "
        "judge personalize.png by eye"
    )


def merged_sampling(pipe, h, args: argparse.Namespace, label: int, unmerged: torch.Tensor) -> dict:
    """The same new-class samples with the adapter merged: time per video, and how far they are from unmerged."""
    pipe.merge_adapters()
    h.generate(
        pipe, torch.full((min(len(unmerged), args.batch_size),), label), args, 1, args.sampler
    )  # warm-up
    tic = time.perf_counter()
    merged = h.generate(pipe, torch.full((len(unmerged),), label), args, args.steps, args.sampler)
    h.synchronize(args.device)
    seconds = (time.perf_counter() - tic) / len(unmerged)
    pipe.unmerge_adapters()
    return {
        "merged_subject_seconds_per_video": seconds,
        "merged_vs_unmerged_max_abs_pixel": (merged - unmerged).abs().max().item(),
        "merged_vs_unmerged_mean_abs_pixel": (merged - unmerged).abs().mean().item(),
    }


def picture(videos: dict[str, torch.Tensor], path: Path, per_row: int = 4) -> None:
    """One row per model (base, LoRA, full): first, middle and last frame of its first new-class samples."""
    rows = []
    for clips in videos.values():
        tiles = [to_uint8(v[:, [0, v.shape[1] // 2, -1]]).numpy() for v in clips[:per_row]]  # (3, H, W, 3)
        rows.append(np.concatenate([np.concatenate(list(t), axis=1) for t in tiles], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def memory(run: dict) -> str:
    """A run's peak memory: the GPU's allocations, or on a CPU the process's resident memory and how much of it
    training added (optimizer states, activations) over what the process held before."""
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    if run.get("peak_memory_bytes") is not None:
        return f"{gib(run['peak_memory_bytes'])} (GPU)"
    peak, before = run.get("peak_process_memory_bytes"), run.get("peak_process_memory_before_training_bytes")
    if peak is None or before is None:
        return "n/a"
    return f"{gib(peak)} process, +{gib(peak - before)} in training (CPU)"


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.1f} ms"


def cost_rows(runs: dict) -> list[tuple[str, str, str]]:
    """(what, LoRA, full fine-tuning): what each run trained, shares, took and held."""
    r = runs
    mb = lambda b: f"{b / 1e6:.1f} MB"
    backbone_bytes = 4 * r["full"]["backbone_parameters"]
    return [
        ("trainable parameters", f"{r['lora']['trainable_parameters']:,}", f"{r['full']['trainable_parameters']:,}"),
        ("what is shared", f"adapter {mb(r['lora']['adapter_bytes'])}", f"model {mb(backbone_bytes)} (float32)"),
        ("training step (median)", ms(r["lora"]["seconds_per_step"]), ms(r["full"]["seconds_per_step"])),
        ("training time (steps)", *(f"{r[k]['train_seconds']:.1f} s ({r[k]['steps']})" for k in ("lora", "full"))),
        ("peak memory in training", memory(r["lora"]), memory(r["full"])),
    ]  # fmt: skip


def cost_table(result: dict) -> str:
    """The markdown table of a --fine-tune-only run: the two fine-tunings' costs."""
    lines = [
        f"Fine-tuning cost: a new class ({result['subject']}) from {result['training_clips']} clips, "
        f"{result['steps']} steps on {result['runs']['lora']['device']}; no samples were measured.",
        "",
        "| | LoRA | full fine-tuning |",
        "|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in cost_rows(result["runs"])),
        "",
    ]
    return "\n".join(lines)


def table(result: dict) -> str:
    """The markdown table of personalize.json."""
    m, r = result["models"], result["runs"]
    pct = lambda x: f"{100 * x:.1f} %"
    rows = [
        ("new subject recognized (top 2)", *(pct(m[k]["subject_recognized"]) for k in ("base", "lora", "full"))),
        ("FVD, classes 0-9 vs the test split", *(f"{m[k]['fvd2048_16f']:.1f}" for k in ("base", "lora", "full"))),
        ("digit accuracy, classes 0-9 (top 2)", *(pct(m[k]["digit_accuracy_top2"]) for k in ("base", "lora", "full"))),
        ("subject in class 0-9 samples", *(pct(m[k]["subject_in_base_class_samples"]) for k in ("base", "lora", "full"))),
        *(("", *row) for row in cost_rows(r)),
        ("sampling, per video (the FVD samples)", *(ms(m[k]["seconds_per_video"]) for k in ("base", "lora", "full"))),
        ("new-class samples, per video", ms(m["base"]["subject_seconds_per_video"]),
         f"{ms(m['lora']['subject_seconds_per_video'])}, merged {ms(m['lora']['merged_subject_seconds_per_video'])}",
         ms(m["full"]["subject_seconds_per_video"])),
    ]  # fmt: skip
    c = result["classifier_on_real_clips"]
    lines = [
        f"Personalization: a new class ({result['subject']}, label {SUBJECT_LABEL}) from {result['training_clips']} "
        f"clips, {result['steps']} steps; {result['num_samples']} samples per FVD row, {result['subject_samples']} "
        f"new-class samples ({result['sampler']}, {result['sample_steps']} steps).",
        "",
        "| | base model (before) | LoRA | full fine-tuning |",
        "|---|---|---|---|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        f"Object classifier on real clips: {pct(c['real_subject_clips_recognized'])} of held-out subject clips "
        f"recognized, {pct(c['reconstructed_subject_clips_recognized'])} of their tokenizer reconstructions (the "
        f"ceiling for samples), {pct(c['real_test_clips_with_subject'])} of test clips (digits only) taken for "
        f"the subject, digit accuracy {pct(c['real_test_digit_accuracy_top2'])}. The base model has no class "
        "for the subject: its column shows its null-label samples. Merged and unmerged adapter samples differ by "
        f"at most {m['lora']['merged_vs_unmerged_max_abs_pixel']:.2g} (pixels in [-1, 1]"
        + (
            f"; {m['lora']['merged_vs_unmerged_mean_abs_pixel']:.2g} on average)."
            if "merged_vs_unmerged_mean_abs_pixel" in m["lora"]
            else ")."
        ),
        "",
    ]
    if not result.get("recognition_valid", True):
        lines += [f"**The recognition row is not a result:** {unrecognizable(c)}.", ""]
    return "\n".join(lines)
