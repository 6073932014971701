"""A learning-rate cooldown against a constant rate, same run otherwise: the MovingDigits tokenizer recipe.

Each variant is `walt fit` of the study's tokenizer config (tools/moving_digits.py writes it; ``--smoke`` shrinks
it to CPU size: 16 channels, 32x32 clips, batch 8), from the same seed, for the same number of steps, validated at
the end on the test split with the EMA weights. Only the rate schedule differs: constant, or
`walt.lightning.LearningRateCooldown(fraction)` (linear to 0 over the last part of the run).

    python benchmarks/cooldown.py --steps 600 --fractions 0,0.3 --out outputs/cooldown   # CPU, ~10 minutes a run
    python benchmarks/cooldown.py --gpu --seconds 600 --fractions 0,0.2 \
        --tokenizer-config configs/moving_digits/tokenizer_gan.yaml --out outputs/cooldown_gpu   # the real recipe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # the MovingDigits study writes the configs and runs `walt`
import moving_digits as study  # noqa: E402


def run_variant(args: argparse.Namespace, fraction: float) -> dict:
    out = args.out / f"fraction_{fraction:g}"
    config = study.write_configs(
        out, smoke=not args.gpu, accelerator="gpu" if args.gpu else "cpu", tokenizer=args.tokenizer_config,
        cooldown=fraction or None,
    )["tokenizer"]  # fmt: skip
    cfg = yaml.safe_load(config.read_text())
    trainer, data = cfg["trainer"], cfg["data"]["init_args"]
    if not args.gpu:  # one validation, at the end, on more clips than the smoke run's
        trainer.update(
            max_steps=args.steps, val_check_interval=args.steps, limit_val_batches=args.val_batches
        )
        data["val"]["init_args"]["num_samples"] = args.val_batches * data["batch_size"]
    trainer["log_every_n_steps"] = 10
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tic = time.perf_counter()
    study.timed_fit(config, args.seconds if args.gpu else None)
    curves = study.scalars(out / "tokenizer")
    final = {
        tag.removeprefix("val/"): values[-1][1] for tag, values in curves.items() if tag.startswith("val/")
    }
    steps = curves["train/rec"][-1][0] + 1 if "train/rec" in curves else None
    return {"fraction": fraction, "seconds": time.perf_counter() - tic, "batches": steps, **final}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--fractions", default="0,0.3", help="cooldown fractions, comma-separated; 0 = constant rate"
    )
    p.add_argument("--steps", type=int, default=600, help="CPU: training steps of each run")
    p.add_argument("--val-batches", type=int, default=8, help="CPU: validation batches of 8 clips")
    p.add_argument(
        "--gpu", action="store_true", help="the config at full size on a GPU, bounded by --seconds"
    )
    p.add_argument("--seconds", type=float, default=600.0, help="GPU: training time of each run")
    p.add_argument("--tokenizer-config", type=Path, default=ROOT / "configs/moving_digits/tokenizer.yaml")
    args = p.parse_args()
    fractions = [float(f) for f in args.fractions.split(",")]
    if any(not 0 <= f <= 1 for f in fractions):
        p.error(f"--fractions must lie in [0, 1], got {args.fractions}")
    rows = []
    for fraction in fractions:
        rows.append(run_variant(args, fraction))
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "cooldown.json").write_text(
            json.dumps({"command": " ".join(sys.argv), "runs": rows}, indent=2)
        )
    print("| cooldown | " + " | ".join(k for k in rows[0] if k not in ("fraction",)) + " |")
    for row in rows:
        values = " | ".join(
            f"{v:.4g}" if isinstance(v, float) else str(v) for k, v in row.items() if k != "fraction"
        )
        print(f"| {row['fraction']:g} | {values} |")


if __name__ == "__main__":
    main()
