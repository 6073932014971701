"""Seeded training losses of walt's diffusion configs, for comparing two versions of the code step for step.

Each case takes a config from ``--configs`` (the ``configs/`` folder of the checkout whose code runs), shrinks
the model to CPU size (2 layers x 32, the tiny tokenizer with fixed random weights) and its data to a few clips,
trains it for ``--steps`` seeded steps through ``walt fit``'s own CLI class, and records every step's loss (as
a float and as its exact hex). Run it once with each checkout's code and configs; equal hex strings mean the
two versions train bit-identically:

    PYTHONPATH=<old checkout> python benchmarks/refactor_parity.py --configs <old checkout>/configs \\
        --out benchmarks/refactor_parity/before.json
    PYTHONPATH=. python benchmarks/refactor_parity.py --configs configs --out benchmarks/refactor_parity/after.json \\
        --teacher <the first run's work folder>/base/checkpoints/last.ckpt --compare benchmarks/refactor_parity/before.json

The distillation case's teacher is the base case's checkpoint; ``--teacher`` gives another (the first run's, so
both versions distill the same file, and the second reads a checkpoint the first wrote). Only APIs that every
version has are used here: the ``walt fit`` CLI class, the tokenizer, the datasets and ``write_weights``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from safetensors.torch import save_file

CASES = {  # name -> (config under --configs, what the backbone adds, data)
    "base": ("moving_digits/base.yaml", {}, "digits"),
    "frame_prediction": ("base/k600_frame_prediction.yaml", {}, "digits"),
    "text": ("text/quickstart.yaml", {}, "captions"),
    "sr": ("sr/tiny.yaml", {"input_size": [5, 4, 4]}, "pixels"),
    "distill": ("moving_digits/distill.yaml", {}, "digits"),
    "progressive": ("moving_digits/distill.yaml", {}, "digits"),  # round 2: the distill case is its teacher
}
TINY_TOKENIZER = dict(latent_channels=4, channels=8, multipliers=[1, 1, 2, 2], num_res_blocks=1,
                      temporal_downsample=[True, True, False], num_groups=4, variational=False)  # fmt: skip


class LossLog(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def write_latents(folder: Path, vae, dataset, num_clips: int) -> None:
    """A `walt encode`-style folder of ``num_clips`` clips of ``dataset`` (labels, captions when it has them)."""
    from walt.checkpoint import write_weights

    folder.mkdir(parents=True)
    write_weights(vae.state_dict(), folder / "vae.safetensors", {"role": "tokenizer"})
    items = [dataset[i] for i in range(num_clips)]
    with torch.no_grad():
        latents = vae.encode(torch.stack([it["video"] for it in items]))
    tensors = {"latents": latents.contiguous(), "labels": torch.tensor([it["label"] for it in items])}
    captions = [it["caption"] for it in items if "caption" in it]
    metadata = {"captions": json.dumps(captions)} if captions else None
    save_file(tensors, str(folder / "shard-00000.safetensors"), metadata=metadata)
    index = {"shards": [{"file": "shard-00000.safetensors", "num_samples": num_clips}], "classes": []}
    (folder / "index.json").write_text(json.dumps(index))


def make_data(work: Path) -> dict[str, Path]:
    from walt.data import MovingDigits, SyntheticVideos
    from walt.tokenizer import CausalVAE

    torch.manual_seed(0)
    vae = CausalVAE(**TINY_TOKENIZER).eval()
    digits = MovingDigits(num_samples=16, num_frames=17, resolution=64, label="first")
    circles = SyntheticVideos(num_samples=16, num_frames=17, resolution=32, shapes=["circle"],
                              colors=["red", "green", "blue", "yellow"], motions=["left", "right"])  # fmt: skip
    write_latents(work / "digits", vae, digits, 16)
    write_latents(work / "captions", vae, circles, 16)
    return {
        "digits": work / "digits",
        "captions": work / "captions",
        "vae": work / "digits" / "vae.safetensors",
    }


def find(node, key: str):
    """Every dict in ``node`` (nested dicts and lists) that has ``key``."""
    if isinstance(node, dict):
        if key in node:
            yield node
        for value in node.values():
            yield from find(value, key)
    elif isinstance(node, list):
        for value in node:
            yield from find(value, key)


def cpu_config(
    source: Path,
    case: str,
    data: dict[str, Path],
    run: Path,
    steps: int,
    teacher: Path | None,
) -> Path:
    name, backbone, kind = CASES[case]
    config = yaml.safe_load((source / name).read_text())
    model = config["model"]["init_args"]
    model["backbone"]["init_args"].update(
        in_channels=4, depth=2, hidden_size=32, num_heads=2, gradient_checkpointing=False, **backbone
    )
    if kind != "pixels":
        model["backbone"]["init_args"]["input_size"] = [5, 8, 8] if kind == "digits" else [5, 4, 4]
    for part in find(config, "tokenizer"):
        if isinstance(part["tokenizer"], dict) and "init_args" in part["tokenizer"]:
            part["tokenizer"]["init_args"] = dict(TINY_TOKENIZER)
    for part in find(config, "tokenizer_weights"):
        part["tokenizer_weights"] = str(data["vae"])
    for part in find(config, "compile"):
        part["compile"] = False
    for part in find(config, "cache_dir"):
        part["cache_dir"] = str(run.parent / "text_cache")
    if case == "progressive":  # a progressive round to 4 steps, in either version's terms
        for part in find(config, "stage"):
            part.update(stage="progressive", student_steps=4)
        for part in find(config, "objective"):
            part["objective"] = {"class_path": "walt.diffusion.ProgressiveDistillation",
                                 "init_args": {**part["objective"]["init_args"], "student_steps": 4}}  # fmt: skip
    if teacher is not None:
        for part in find(config, "teacher_checkpoint"):  # the flat argument of the old module
            part["teacher_checkpoint"] = str(teacher)
        for part in find(config, "teacher"):  # a walt.lightning.Teacher
            if isinstance(part["teacher"], dict):
                part["teacher"]["init_args"]["checkpoint"] = str(teacher)
    loader = config["data"]["init_args"]
    for split in ("train", "val"):
        if not loader.get(split):
            continue
        if kind == "pixels":
            loader[split]["init_args"].update(num_samples=16, resolution=32)
        else:
            loader[split] = {"class_path": "walt.data.LatentShards", "init_args": {"root": str(data[kind])}}
    loader.update(batch_size=4, num_workers=0)
    trainer = config["trainer"]
    for key in ("max_time", "val_check_interval", "max_epochs", "gradient_clip_val"):
        trainer.pop(key, None)
    trainer.update(accelerator="cpu", devices=1, precision="32-true", max_steps=steps, logger=False,
                   limit_val_batches=0, num_sanity_val_steps=0, check_val_every_n_epoch=1,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(run))  # fmt: skip
    config["checkpoint"] = {"every_n_train_steps": 10_000}
    path = run.parent / f"{case}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def train(config: Path) -> list[float]:
    from walt.cli import WaltCLI

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both it and args hold arguments
    try:
        cli = WaltCLI(args=["--config", str(config)], run=False)
    finally:
        sys.argv = argv
    log = LossLog()
    cli.trainer.callbacks.append(log)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return log.losses


def plot(theirs: dict, mine: dict, labels: tuple[str, str], path: Path) -> None:
    """Both runs' loss curves, a panel per case: the other run's as a thick line, this one's thin on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in mine["cases"] if c in theirs["cases"]]
    fig, axes = plt.subplots(1, len(cases), figsize=(3 * len(cases), 2.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for run, label, width in ((theirs, labels[0], 4), (mine, labels[1], 1.2)):
            losses = run["cases"][case]["losses"]
            ax.plot(range(1, len(losses) + 1), losses, label=label, linewidth=width)
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("training loss", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--configs", type=Path, default=Path("configs"), help="the configs/ folder of the code run"
    )
    p.add_argument("--out", type=Path, required=True, help="JSON file for the losses")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    p.add_argument(
        "--teacher", type=Path, help="the distillation teacher (default: this run's base checkpoint)"
    )
    p.add_argument(
        "--progressive-teacher", type=Path, help="the progressive round's (default: this run's distill)"
    )
    p.add_argument("--work", type=Path, help="work folder (default: a temporary one, kept and printed)")
    p.add_argument("--compare", type=Path, help="a JSON file of another run: report where the losses differ")
    p.add_argument(
        "--plot", type=Path, help="with --compare: a PNG of both runs' loss curves, a panel per case"
    )
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="walt_parity_"))
    torch.set_num_threads(1)
    data = make_data(work / "data")
    import walt

    record = {"walt_version": walt.__version__, "steps": args.steps, "torch": torch.__version__, "cases": {}}
    try:
        record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True, cwd=Path(walt.__file__).parent, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pass
    for case in args.cases.split(","):
        teacher = {
            "distill": args.teacher or work / "base",
            "progressive": args.progressive_teacher or work / "distill",
        }
        teacher = {
            k: v if v.suffix == ".ckpt" else v / "checkpoints" / "last.ckpt" for k, v in teacher.items()
        }
        config = cpu_config(args.configs, case, data, work / case, args.steps, teacher.get(case))
        start = time.perf_counter()
        losses = train(config)
        record["cases"][case] = {
            "config": CASES[case][0],
            "seconds": round(time.perf_counter() - start, 1),
            "losses": losses,
            "hex": [x.hex() for x in losses],
        }
        print(f"{case}: {len(losses)} steps, first {losses[0]:.6f}, last {losses[-1]:.6f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"work folder: {work}")
    if args.compare is not None:
        other = json.loads(args.compare.read_text())["cases"]
        for case, mine in record["cases"].items():
            theirs = other.get(case, {}).get("hex")
            same = sum(a == b for a, b in zip(mine["hex"], theirs or []))
            print(f"{case}: {same} of {len(mine['hex'])} losses bit-identical to {args.compare}")
        if args.plot is not None:
            other = json.loads(args.compare.read_text())
            plot(
                other,
                record,
                (other.get("commit", args.compare.stem), record.get("commit", "this run")),
                args.plot,
            )


if __name__ == "__main__":
    main()
